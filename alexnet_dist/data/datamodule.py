"""The LightningDataModule: reads the manifest, splits the global batch over ranks, builds the
configured loader, and normalises uint8 batches on the training device."""
from pathlib import Path

import lightning.pytorch as pl
import torch

from ..errors import ConfigError, DataError
from .shards import read_manifest
from .wds_loader import EpochLoader, ShardStream


class ShardDataModule(pl.LightningDataModule):
    def __init__(self, root: str, batch_size: int, crop: int, val_resize: int | None = None,
                 mean: list | None = None, std: list | None = None, flip: bool = True,
                 loader: dict | None = None, seed: int = 0, val_batch_size: int | None = None):
        super().__init__()
        self.root = Path(root).expanduser().resolve()
        self.manifest = read_manifest(self.root)  # fails early, before any model is built
        if "train" not in self.manifest["splits"] or "val" not in self.manifest["splits"]:
            raise DataError(f"{self.root / 'manifest.json'}: needs both a train and a val split")
        self.global_batch, self.crop, self.val_resize, self.flip = batch_size, crop, val_resize, flip
        self.val_global_batch = val_batch_size or batch_size
        self.loader_cfg = dict(loader or {"name": "wds"})
        self.seed = seed
        # Normalisation constants on the 0-255 scale; by default the train split's own statistics.
        self.mean = mean if mean is not None else self.manifest.get("mean", [127.5] * 3)
        self.std = std if std is not None else self.manifest.get("std", [64.0] * 3)

    @property
    def num_classes(self) -> int:
        return self.manifest["num_classes"]

    def split_count(self, split: str) -> int:
        return self.manifest["splits"][split]["count"]

    def world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)

    def per_rank_batch(self, global_batch: int) -> int:
        _, world = self.world()
        if global_batch % world:
            raise ConfigError(f"data.batch_size={global_batch} is the global batch and must divide by the "
                              f"world size {world}; pick a multiple of {world}")
        return global_batch // world

    def steps_per_epoch(self) -> int:
        steps = self.split_count("train") // self.global_batch
        if steps == 0:
            raise ConfigError(f"data.batch_size={self.global_batch} is larger than the training set "
                              f"({self.split_count('train')} images); use a smaller batch")
        return steps

    def _stream(self, split: str, train: bool, global_batch: int) -> EpochLoader:
        rank, world = self.world()
        shards = [dict(s, tar=str(self.root / s["tar"])) for s in self.manifest["splits"][split]["shards"]]
        if len(shards) < world:
            raise DataError(f"{self.root}: {split} has {len(shards)} shards for {world} ranks; every rank needs "
                            f"one: re-run alexnet-prepare with --min-shards {world} (or more)")
        name = self.loader_cfg.get("name", "wds")
        if name != "wds":
            raise ConfigError(f"loader.name={name}: unknown loader; choose loader=wds")
        wanted = int(self.loader_cfg.get("workers", 1))
        workers = max(1, min(wanted, len(shards) // world))  # every worker must own a shard
        dataset = ShardStream(shards, train=train, batch_size=self.per_rank_batch(global_batch),
                              num_classes=self.num_classes, crop=self.crop,
                              resize=None if train else self.val_resize, rank=rank, world=world,
                              workers=workers, seed=self.seed, flip=self.flip,
                              steps_per_epoch=self.steps_per_epoch() if train else None,
                              shuffle_buffer=int(self.loader_cfg.get("shuffle_buffer", 2000)))
        position = self.position if train else (lambda: (0, 0))
        return EpochLoader(dataset, position, seed=self.seed, num_workers=workers if wanted > 0 else 0,
                           pin_memory=torch.cuda.is_available(),
                           prefetch_factor=int(self.loader_cfg.get("prefetch", 2)) if wanted > 0 else None)

    def position(self) -> tuple[int, int]:
        """(epoch, batches of it already trained on), from the trainer's global step: the one
        count a checkpoint always restores exactly. Every epoch has the same number of steps."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        batches = self.steps_per_epoch()
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            batches = min(batches, limit)
        elif limit is not None and limit < 1.0:
            batches = int(batches * limit)
        accumulate = trainer.accumulate_grad_batches
        epoch, steps = divmod(trainer.global_step, -(-batches // accumulate))
        return epoch, steps * accumulate

    def train_dataloader(self):
        return self._stream("train", True, self.global_batch)

    def val_dataloader(self):
        return self._stream("val", False, self.val_global_batch)

    def test_dataloader(self):
        split = "test" if "test" in self.manifest["splits"] else "val"
        return self._stream(split, False, self.val_global_batch)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        images, labels = batch
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float() - mean) / std, labels
