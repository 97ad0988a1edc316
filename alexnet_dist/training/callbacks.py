"""Callbacks: training throughput (images/s and the share of step time spent waiting for data)."""
import time

import lightning.pytorch as pl


class Throughput(pl.Callback):
    """Images per second over all ranks, shown on the progress bar and logged.

    Data time is the gap between the end of one step and the start of the next (the loader's
    wait); compute time is the step itself. The first `skip` steps of each epoch (worker start-up,
    first-step allocation) are left out of the run's average.
    """

    def __init__(self, skip: int = 2):
        self.skip = skip
        self.images = 0
        self.seconds = 0.0
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
            data_wait = (self.start - self.last_end) / step
            pl_module.log("images_per_sec", images / step, prog_bar=True)
            pl_module.log("data_wait", data_wait)
            if batch_idx >= self.skip:
                self.images += images
                self.seconds += step
        self.last_end = end

    @property
    def images_per_sec(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0
