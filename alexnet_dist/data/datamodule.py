"""The LightningDataModule: wiring only. It reads the manifest, makes each pass's EpochPlan for this
rank, builds the configured loader from it (through config.LOADERS), normalises the loader's uint8
batches on the training device, and writes the trace (data.trace)."""

from pathlib import Path

import lightning.pytorch as pl
import torch

from .. import locks
from ..config import Data, DType, plain
from ..config import Loader as LoaderSettings
from ..errors import ConfigError, DataError
from . import loader_choice, store
from .loader import Batch, Loader
from .manifest import Manifest
from .normalize import DeviceNormalize
from .plan import EpochPlan, make_plan, position
from .shard_cache import ShardCache
from .stats import read_mean_image, read_stats
from .trace import Trace
from .transforms import Augmentation
from .watch import Watch

CPU = torch.device("cpu")


def refuse_folder_being_written(root) -> None:
    """A local data folder that an alexnet-prepare is writing right now (it holds the folder's
    lock) is no data set yet: one line naming that command, before anything is read."""
    if store.is_remote(str(root)):
        return  # a bucket's writer holds the lock of its own staging folder (see docs/reliability.md)
    writer = locks.held_by(Path(root).expanduser() / locks.DATA_FOLDER)
    if writer is not None:
        raise DataError(
            f"data.root={root}: being written by alexnet-prepare ({locks.describe(writer)}); wait for it "
            "to end, then start the training"
        )


class ShardDataModule(pl.LightningDataModule):
    """Without a Trainer (evaluation, benchmarks, tests) batches go to `device` and this process is
    rank `rank` of `world`; with one, the Trainer's device and place count. `worker_signals` are
    ignored by loader worker processes (the preemption warning)."""

    def __init__(
        self,
        data: Data,
        loader: LoaderSettings,
        seed: int = 0,
        device: torch.device = CPU,
        worker_signals: tuple[int, ...] = (),
        rank: int = 0,
        world: int = 1,
    ):
        super().__init__()
        self.settings, self.loader_settings, self.seed = data, loader, seed
        self.device, self.worker_signals, self.place = device, worker_signals, (rank, world)
        refuse_folder_being_written(data.root)
        self.manifest = Manifest.read(data.root)  # fails early, before any model is built
        self.watch = Watch(self.manifest)  # what this run starts with: a change under it stops it
        if not (self.manifest.has("train") and self.manifest.has("val")):
            raise DataError(f"{self.manifest.path}: needs both a train and a val split")
        tars = [s.tar for split in self.manifest.data["splits"] for s in self.manifest.shards(split)]
        over_http = any(tar.startswith(("http://", "https://")) for tar in tars)
        self.loader_name = loader_choice.choose_loader(loader.name, over_http)  # a LOADERS name from here on
        # The colour noise's axes: from `alexnet-prepare stats` when it was run, else the paper's.
        stats = read_stats(self.manifest)
        self.augment = Augmentation.of(data, (stats["pca_std"], stats["pca_vectors"]) if stats else None)
        mean_image = self._mean_image() if data.mean_image else None
        # Normalisation constants on the 0-255 scale; by default the train split's own statistics.
        self.mean = [float(m) for m in data.mean or self.manifest.stat("mean") or [127.5] * 3]
        self.std = [float(s) for s in data.std or self.manifest.stat("std") or [64.0] * 3]
        self.normalize = DeviceNormalize(
            mean=self.mean,
            std=self.std,
            crop=data.crop,
            train_scale=data.train_scale,
            mean_image=mean_image,
            dtype=torch.bfloat16 if loader.dtype == DType.bfloat16 else torch.float32,
        )
        self.cache = ShardCache.of(data)  # remote tars on this node's disk (data.cache_dir), or None
        remote = [tar for tar in tars if store.is_remote(tar)]
        if self.cache is None and remote:
            loader_choice.notice(
                f"the shards are remote ({remote[0]}, ...): without a shard cache every sample is a request "
                "of its own and every epoch fetches the data again; give a node-local folder: "
                "data.cache_dir=/local/disk/path"
            )
        self.loaders: dict[str, Loader] = {}  # by mode, as last built
        self.saved_order = None  # the order a checkpoint was trained in (order_state)
        self.trace = None  # data.trace's writer, made with the first training loader
        self.first_train_batch = None  # (uint8 images, labels), for the run's pictures
        self.checked = False  # this rank's share of the shards, before its first loader

    def _mean_image(self) -> torch.Tensor:
        """The 2012 code's per-pixel mean (3, S, S), subtracted at each crop's own window."""
        size, data = self.manifest.stat("image_size"), self.settings
        if not size or size[0] != size[1] or data.val_resize not in (None, size[0]) or data.augment != "paper":
            raise ConfigError(
                "data.mean_image=true needs square shards (alexnet-prepare --resize S --center-crop), "
                "data.val_resize null or S, and data.augment=paper"
            )
        return torch.from_numpy(read_mean_image(self.manifest)).permute(2, 0, 1).float()

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    def world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer else self.place

    def training_device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer else self.device

    def plan(self, mode: str) -> EpochPlan:
        """This rank's plan for training, validation or the test (ten views where configured)."""
        split = "test" if mode == "test" and self.manifest.has("test") else ("train" if mode == "train" else "val")
        rank, world = self.world()
        batch = (
            self.settings.batch_size if mode == "train" else self.settings.val_batch_size or self.settings.batch_size
        )
        return make_plan(
            self.watch.stamped(self.manifest.shards(split)),
            mode,
            batch,
            rank,
            world,
            self.seed,
            f"{self.manifest.root}: {split}",
            partitions=self.settings.partitions,
            window=self.settings.shuffle_window,
        )

    def check_unchanged(self) -> None:
        """Stops (watch.DataChanged, one line) when the data is not as this run started with it."""
        self.watch.check()

    def steps_per_epoch(self) -> int:
        return self.plan("train").steps

    def position(self) -> tuple[int, int]:
        """(epoch, batches of it already trained on), from the trainer's global step: the one
        count a checkpoint always restores exactly."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        return position(trainer.global_step, trainer.num_training_batches, trainer.accumulate_grad_batches)

    def _loader(self, mode: str) -> Loader:
        plan, train = self.plan(mode), mode == "train"
        if not self.checked:
            self.manifest.check_share(plan.rank, plan.world)
            self.checked = True
        loader = loader_choice.build(
            self.loader_name,
            plan,
            self.augment,
            self.loader_settings,
            sample_format=self.manifest.sample_format,
            classes=self.manifest.classes,
            position=self.position if train else (lambda: (0, 0)),
            device=self.training_device(),
            min_side=self.manifest.min_side,
            worker_signals=self.worker_signals,
            cache=self.cache,
        )
        if train:
            self.check_order()
            if self.settings.trace and self.trace is None:
                self.trace = Trace(self.settings.trace, self.manifest.root, plan.rank, plan.world)
        self.loaders[mode] = loader
        return loader

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")

    def order_state(self) -> dict:
        """The checkpoint's "loader" part: what the order of samples depends on besides the
        data and the epoch (plan.py). With the global step, that is all a resume needs, on any
        number of processes the order allows."""
        s = self.settings
        return {
            "version": 4,
            "seed": self.seed,
            "batch_size": s.batch_size,
            "partitions": s.partitions,
            "shuffle_window": s.shuffle_window,
        }

    def checkpointed_order(self) -> dict:
        """order_state, for a checkpoint being written (on every rank): the trace is flushed with
        it, so the trace on disk holds every step the checkpoint does."""
        if self.trace is not None:
            self.trace.flush()
        return self.order_state()

    def teardown(self, stage: str) -> None:
        if self.trace is not None:
            self.trace.close()

    def restore_order(self, state) -> None:
        self.saved_order = state

    def check_order(self) -> None:
        """A run resumed mid-epoch continues that epoch's order, so it must be the same order."""
        saved, now = self.saved_order, self.order_state()
        if saved is None or saved == now or self.position()[1] == 0:
            return
        if not (isinstance(saved, dict) and saved.get("version") == 4):  # per-rank states of earlier releases
            self.saved_order = None
            loader_choice.warning(
                f"the checkpoint stopped in epoch {self.position()[0]} under an earlier order of samples; the rest of "
                "that epoch follows this release's order, so some of its samples may be trained twice or not at all"
            )
            return
        changed = ", ".join(f"data.{k}={saved[k]} (now {now[k]})" for k in now if k != "seed" and saved[k] != now[k])
        if saved["seed"] != now["seed"]:
            changed = ", ".join(filter(None, [changed, f"seed={saved['seed']} (now {now['seed']})"]))
        raise ConfigError(
            f"the checkpoint stopped mid-epoch in an order of samples made with {changed}; resume with those "
            "settings (they may change at an epoch's end)"
        )

    def description(self) -> dict:
        """The checkpoint's "data" part: what the network's inputs were, so that a checkpoint alone
        evaluates, exports and predicts the way its run validated. Mean and std on the 0-255 scale
        of RGB inputs; `mean_image` the 2012 code's per-pixel mean (3, S, S), or None; `storage`
        the manifest's record of how the images were stored (data/photos.py reads photos so)."""
        return {
            "classes": list(self.manifest.classes),
            "mean": self.mean,
            "std": self.std,
            "mean_image": self.normalize.mean_image.cpu() if self.normalize.mean_image is not None else None,
            "settings": plain(self.settings),
            "loader": self.loader_name,
            "storage": self.manifest.storage,  # how alexnet-prepare stored the images, or None
        }

    def skipped_images(self) -> list[str]:
        """Images this process's loaders skipped as undecodable, so far."""
        return [where for loader in self.loaders.values() for where in loader.skipped]

    def augmented_batch(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The uint8 crops of the first training batch of this process and their labels (for the
        run's pictures), or None before training."""
        return self.first_train_batch

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int):
        if batch.shifts is not None and self.first_train_batch is None:
            self.first_train_batch = (batch.images, batch.labels)
        trainer = self.trainer
        if self.trace is not None and batch.shifts is not None and trainer is not None and trainer.training:
            # transferred just before it is trained: global_step is the step it is trained in
            self.trace.write(trainer.current_epoch, trainer.global_step, batch.keys)
        return self.normalize(batch.images, batch.labels, batch.shifts, batch.windows)
