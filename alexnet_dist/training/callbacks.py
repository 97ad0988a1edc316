"""Callbacks: training throughput (images/s and the share of step time spent waiting for data),
and the report of images the loader skipped as undecodable."""

import sys
import time

import lightning.pytorch as pl
import torch.distributed as dist


class Throughput(pl.Callback):
    """Images per second over all ranks, step time and the share of it spent waiting for data,
    on the progress bar and logged (W&B included).

    Data time is the gap between the end of one step and the start of the next (the loader's
    wait); compute time is the step itself. The first `skip` steps of each epoch (worker start-up,
    first-step allocation) are left out of the run's averages.
    """

    def __init__(self, skip: int = 2):
        self.skip = skip
        self.images = 0
        self.seconds = 0.0
        self.waited = 0.0
        self.steps = 0
        self.last_end = None
        self.start = None

    def on_train_epoch_start(self, trainer, pl_module):
        self.last_end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        end = time.perf_counter()
        if self.last_end is not None:
            step = end - self.last_end
            images = len(batch[1]) * trainer.world_size
            wait = self.start - self.last_end
            pl_module.log("images_per_sec", images / step, prog_bar=True)
            pl_module.log("step_ms", 1000 * step, prog_bar=True)
            pl_module.log("data_wait", wait / step, prog_bar=True)
            if batch_idx >= self.skip:
                self.images += images
                self.seconds += step
                self.waited += wait
                self.steps += 1
        self.last_end = end

    @property
    def images_per_sec(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def data_wait(self) -> float:
        return self.waited / self.seconds if self.seconds else 0.0

    @property
    def step_ms(self) -> float:
        return 1000 * self.seconds / self.steps if self.steps else 0.0


class SkippedImages(pl.Callback):
    """Undecodable images the loaders skipped (loader.bad_images=skip): after every training and
    validation epoch the number of distinct ones over all ranks is logged as `skipped_images`
    (W&B included) and rank zero names the new ones on stderr."""

    def __init__(self):
        self.seen = set()

    def _report(self, trainer, pl_module):
        datamodule = trainer.datamodule
        mine = datamodule.skipped_images() if hasattr(datamodule, "skipped_images") else []
        everyone = [mine]
        if dist.is_available() and dist.is_initialized():
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
        new = sorted({where for rank in everyone for where in rank} - self.seen)
        self.seen.update(new)
        if new and trainer.is_global_zero:
            print(
                f"warning: skipped {len(new)} undecodable image(s): {'; '.join(new[:10])}"
                f"{' ...' if len(new) > 10 else ''} (re-create those shards with alexnet-prepare)",
                file=sys.stderr,
                flush=True,
            )
        pl_module.log("skipped_images", float(len(self.seen)))

    def on_train_epoch_end(self, trainer, pl_module):
        self._report(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._report(trainer, pl_module)
