"""The LightningDataModule: reads the manifest, splits the global batch over ranks, builds the
configured loader (DALI or webdataset + PIL), and normalises their uint8 batches on the training
device."""

import random
import zlib
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist

from ..errors import ConfigError, DataError
from .augment import PCA_STD, PCA_VECTORS, TEN_VIEWS, noise_at, place
from .loader_choice import choose_loader
from .shards import read_manifest
from .stats import read_stats
from .wds_loader import EpochLoader, ShardStream


class ShardDataModule(pl.LightningDataModule):
    def __init__(
        self,
        root: str,
        batch_size: int,
        crop: int,
        val_resize: int | None = None,
        mean: list | None = None,
        std: list | None = None,
        flip: bool = True,
        loader: dict | None = None,
        seed: int = 0,
        val_batch_size: int | None = None,
        augment: str = "paper",
        colour_noise: float = 0.0,
        colour_noise_until_epoch: int | None = None,
        train_scale: float = 1.0,
        test_views: int = 1,
        mean_image: bool = False,
    ):
        super().__init__()
        self.root = Path(root).expanduser().resolve()
        self.manifest = read_manifest(self.root)  # fails early, before any model is built
        if "train" not in self.manifest["splits"] or "val" not in self.manifest["splits"]:
            raise DataError(f"{self.root / 'manifest.json'}: needs both a train and a val split")
        self.global_batch, self.crop, self.val_resize, self.flip = batch_size, crop, val_resize, flip
        self.val_global_batch = val_batch_size or batch_size
        self.loader_cfg = dict(loader or {"name": "auto"})
        self.loader_cfg["name"] = choose_loader(self.loader_cfg.get("name", "auto"))  # dali or wds from here on
        self.seed = seed
        self.augment, self.colour_noise, self.noise_until = augment, colour_noise, colour_noise_until_epoch
        self.train_scale, self.test_views = train_scale, test_views
        if test_views not in (1, 10):
            raise ConfigError(
                f"data.test_views={test_views}: choose 1 (centre crop) or 10 (corners, centre and mirrors)"
            )
        self.loaders = {}  # by mode, as last built
        self.last_train_images = None
        # The colour noise's axes: from `alexnet-prepare stats` when it was run, else the paper's.
        stats = read_stats(self.root)
        self.pca = (np.array(stats["pca_std"]), np.array(stats["pca_vectors"])) if stats else (PCA_STD, PCA_VECTORS)
        self.mean_image = self._load_mean_image() if mean_image else None
        self.loader_states = None  # per-rank loader states from a checkpoint
        # Normalisation constants on the 0-255 scale; by default the train split's own statistics.
        self.mean = mean if mean is not None else self.manifest.get("mean", [127.5] * 3)
        self.std = std if std is not None else self.manifest.get("std", [64.0] * 3)

    def _load_mean_image(self) -> torch.Tensor:
        """The 2012 code's per-pixel mean (3, S, S), subtracted at each crop's own window."""
        path, size = self.root / "mean_image.npy", self.manifest.get("image_size")
        if not path.exists():
            raise ConfigError(
                f"data.mean_image=true but {path} is missing; run alexnet-prepare stats --out {self.root}"
            )
        if not size or size[0] != size[1] or self.val_resize not in (None, size[0]) or self.augment != "paper":
            raise ConfigError(
                "data.mean_image=true needs square shards (alexnet-prepare --resize S --center-crop), "
                "data.val_resize null or S, and data.augment=paper"
            )
        image = torch.from_numpy(np.load(path)).permute(2, 0, 1).float()
        if tuple(image.shape[1:]) != (size[1], size[0]):
            raise ConfigError(
                f"{path}: {tuple(image.shape[1:])} but the shards hold {size} images; re-run alexnet-prepare stats"
            )
        return image

    def mean_windows(self, left: torch.Tensor, top: torch.Tensor, mirrored: torch.Tensor, device) -> torch.Tensor:
        """(N, 3, crop, crop): the mean image cut where each crop was cut, mirrored with it."""
        steps = torch.arange(self.crop, device=device)
        rows = top.to(device)[:, None] + steps
        cols = left.to(device)[:, None] + steps
        cols = torch.where(mirrored.to(device)[:, None].bool(), cols.flip(1), cols)
        if self.mean_image.device != torch.device(device):  # moved once, kept there
            self.mean_image = self.mean_image.to(device)
        return self.mean_image[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)

    def eval_windows(self, views: int, device) -> torch.Tensor:
        """The fixed windows of evaluation: the centre, or the ten views (corners, centre, mirrored)."""
        free = self.mean_image.shape[-1] - self.crop
        places = [(0.5, 0.5)] if views == 1 else TEN_VIEWS * 2
        left = torch.tensor([place(x, free) for x, _ in places])
        top = torch.tensor([place(y, free) for _, y in places])
        mirrored = torch.tensor([0] * len(places) if views == 1 else [0] * 5 + [1] * 5)
        return self.mean_windows(left, top, mirrored, device)

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
            raise ConfigError(
                f"data.batch_size={global_batch} is the global batch and must divide by the "
                f"world size {world}; pick a multiple of {world}"
            )
        return global_batch // world

    def steps_per_epoch(self) -> int:
        steps = self.split_count("train") // self.global_batch
        if steps == 0:
            raise ConfigError(
                f"data.batch_size={self.global_batch} is larger than the training set "
                f"({self.split_count('train')} images); use a smaller batch"
            )
        return steps

    def _shards(self, split: str) -> list[dict]:
        _, world = self.world()
        shards = [dict(s, tar=str(self.root / s["tar"])) for s in self.manifest["splits"][split]["shards"]]
        if len(shards) < world:
            raise DataError(
                f"{self.root}: {split} has {len(shards)} shards for {world} ranks; every rank needs "
                f"one: re-run alexnet-prepare with --min-shards {world} (or more)"
            )
        return shards

    def _stream(self, split: str, mode: str, global_batch: int):
        if self.loader_cfg["name"] == "dali":
            self.loaders[mode] = self._dali(split, mode, global_batch)
            return self.loaders[mode]
        train = mode == "train"
        rank, world = self.world()
        shards = self._shards(split)
        wanted = int(self.loader_cfg.get("workers", 1))
        workers = max(1, min(wanted, len(shards) // world))  # every worker must own a shard
        dataset = ShardStream(
            shards,
            train=train,
            batch_size=self.per_rank_batch(global_batch),
            num_classes=self.num_classes,
            crop=self.crop,
            resize=None if train else self.val_resize,
            rank=rank,
            world=world,
            workers=workers,
            seed=self.seed,
            flip=self.flip,
            steps_per_epoch=self.steps_per_epoch() if train else None,
            shuffle_buffer=int(self.loader_cfg.get("shuffle_buffer", 2000)),
            augment=self.augment,
            colour_noise=self.colour_noise,
            noise_until=self.noise_until,
            views=10 if mode == "test" and self.test_views == 10 else 1,
            pca=self.pca,
            windows=train and self.mean_image is not None,
        )
        position = self.position if train else (lambda: (0, 0))
        return EpochLoader(
            dataset,
            position,
            seed=self.seed,
            num_workers=workers if wanted > 0 else 0,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=int(self.loader_cfg.get("prefetch", 2)) if wanted > 0 else None,
        )

    default_device = torch.device("cpu")  # where batches go without a trainer (benchmarks)

    def training_device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer else self.default_device

    def _dali(self, split: str, mode: str, global_batch: int):
        from .dali_loader import DaliLoader, check_shards, shard_range
        from .dali_pipeline import PipelineSpec

        cfg, train = self.loader_cfg, mode == "train"
        rank, world = self.world()
        batch, shards = self.per_rank_batch(global_batch), self._shards(split)
        check_shards(shards)
        target = self.training_device()
        device = cfg.get("device", "auto")
        if device == "auto":
            device = "gpu" if target.type == "cuda" else "cpu"
        if device == "gpu" and not torch.cuda.is_available():
            raise ConfigError("loader.device=gpu but this process sees no CUDA GPU; use loader.device=cpu (or auto)")
        if self.augment == "paper" or not train:
            self._check_crop_fits(train)
        layout = {"NCHW": "CHW", "NHWC": "HWC"}[cfg.get("layout", "NCHW")]

        def spec_for(epoch: int) -> PipelineSpec:
            order = list(shards)
            if train:  # a new tar order and a new slice of it for every rank each epoch
                random.Random(f"{self.seed}-{epoch}").shuffle(order)
            return PipelineSpec(
                tars=[s["tar"] for s in order],
                indexes=[s["tar"][:-4] + ".idx" for s in order],
                mode=mode,
                batch_size=batch,
                crop=self.crop,
                shard_id=(rank + epoch) % world if train else rank,
                num_shards=world,
                seed=zlib.crc32(f"{self.seed}-{epoch}-{rank}-{mode}".encode()) & 0x7FFFFFFF,
                device=device,
                device_id=target.index if device == "gpu" else None,
                threads=int(cfg.get("threads", 2)),
                prefetch=int(cfg.get("prefetch", 2)),
                shuffle_buffer=int(cfg.get("shuffle_buffer", 2000)),
                augment=self.augment,
                flip=self.flip,
                val_resize=self.val_resize,
                colour_noise=noise_at(self.colour_noise, self.noise_until, epoch),
                layout=layout,
                pca_std=tuple(self.pca[0].tolist()),
                pca_vectors=tuple(np.asarray(self.pca[1]).flatten().tolist()),
                windows=train and self.mean_image is not None,
            )

        count = self.split_count(split)
        if train:
            batches, valid = self.steps_per_epoch(), None
        else:
            start, end = shard_range(count, rank, world)
            valid = end - start
            batches = -(-valid // batch)
        loader = DaliLoader(
            spec_for,
            batches=batches,
            valid=valid,
            num_classes=self.num_classes,
            position_fn=self.position if train else (lambda: (0, 0)),
            device=target if device == "gpu" else torch.device("cpu"),
            strict=cfg.get("bad_images", "skip") == "error",
        )
        if train and self.loader_states:
            loader.restore(self.loader_states[min(rank, len(self.loader_states) - 1)])
        return loader

    def _check_crop_fits(self, train: bool) -> None:
        """DALI cuts crops out of the stored image (after data.val_resize in evaluation): every
        stored image must be at least that large, which the manifest's smallest side tells."""
        side = self.manifest.get("min_side") or min(self.manifest.get("image_size") or [0]) or None
        if side is None or (not train and self.val_resize):
            return
        if side < self.crop:
            raise ConfigError(
                f"data.crop={self.crop} is larger than the smallest stored image side ({side} px) of "
                f"{self.root}; lower data.crop, or re-run alexnet-prepare with --resize {self.crop} or more "
                "(or use loader=wds, which enlarges small images)"
            )

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
        return self._stream("train", "train", self.global_batch)

    def val_dataloader(self):
        return self._stream("val", "val", self.val_global_batch)

    def test_dataloader(self):
        split = "test" if "test" in self.manifest["splits"] else "val"
        return self._stream(split, "test" if self.test_views == 10 else "val", self.val_global_batch)

    def state_dict(self) -> dict:
        """The training loader's position state of every rank (the DALI pipelines' checkpoints)."""
        if "train" not in self.loaders:
            return {}
        state = self.loaders["train"].state(*self.position())
        states = [state]
        if dist.is_available() and dist.is_initialized():
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
        return {"loader": states}

    def load_state_dict(self, state: dict) -> None:
        self.loader_states = state.get("loader")

    def skipped_images(self) -> list[str]:
        """Images this process's loaders skipped as undecodable, so far."""
        return [where for loader in self.loaders.values() for where in loader.skipped]

    def on_after_batch_transfer(self, batch, dataloader_idx):
        """Both loaders deliver uint8 images; training batches also carry each image's colour
        shift (zeros without colour noise). On the training device: (x - mean + shift) / std, and
        training inputs further divided by data.train_scale (the 2012 code's 1.1)."""
        images, labels, *extra = batch  # training: colour shifts [and crop windows]
        device = images.device
        if self.mean_image is None:
            mean = torch.tensor(self.mean, device=device).view(-1, 1, 1)
        elif len(extra) > 1:  # the 2012 code's mean image, at each training crop's window
            left, top, mirrored = extra[1].T
            mean = self.mean_windows(left, top, mirrored, device)
        else:
            mean = self.eval_windows(images.shape[1] if images.dim() == 5 else 1, device)
            mean = mean if images.dim() == 5 else mean[0]
        std = torch.tensor(self.std, device=device).view(-1, 1, 1)
        x = images.float() - mean
        if extra:
            self.last_train_images = images  # the uint8 crops, for the run's pictures
            x += extra[0].to(device, torch.float32)[:, :, None, None]  # colour shifts (zeros when off)
            std = std * self.train_scale
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.loader_cfg.get("dtype", "float32")]
        return (x / std).to(dtype), labels
