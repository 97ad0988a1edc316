"""What every loader is: built from an EpochPlan, the run's Augmentation and its loader settings
by its module's `build(plan, augment, settings, *, sample_format, classes, position, device,
min_side, worker_signals, cache) -> Loader` (wds.py, dali.py; config.LOADERS names the module), it yields
`Batch`es of uint8 images that DeviceNormalize turns into inputs on the training device.
`sample_format` says which member of a sample is its image and which its label (members.py),
`classes` are the manifest's class names, `cache` the node's shard cache (shard_cache.py) or None;
both loaders read samples through samples.SampleReader. Every build takes every keyword and uses
what concerns it."""

import io
from typing import NamedTuple, Protocol

import torch
from PIL import Image

from ..errors import DataError
from .images import shown_size


class Batch(NamedTuple):
    images: torch.Tensor  # uint8 (N, 3, H, W), or (N, 10, 3, H, W) for the ten views
    labels: torch.Tensor  # int64 (N,)
    shifts: torch.Tensor | None = None  # training: each image's colour shift (N, 3), zeros when off
    windows: torch.Tensor | None = None  # training with the mean image: each crop's [left, top, mirrored]
    skipped: tuple = ()  # "<tar>:<key> (why)" of images dropped from this batch (loader.bad_images=skip)
    # (tar, key) of each image, row for row: its shard's location and its WebDataset __key__. Carried
    # with the images rather than derived from the plan, so a skipped image cannot shift them.
    keys: tuple = ()


class Loader(Protocol):
    """One split for this rank. Each pass starts where `position()` says training stands: (epoch,
    batches of it already trained on), so a resumed run sees the batches an uninterrupted one
    would have: the plan's order and the samples' draws depend on nothing else (plan.py)."""

    skipped: list[str]  # undecodable images skipped by this process so far

    def __iter__(self): ...

    def __len__(self) -> int: ...


class BadImage(DataError):
    """An image in a shard that cannot be decoded: skipped and counted with
    loader.bad_images=skip, the run's one-line error with error."""

    def __init__(self, where: str, why: str | None = None):
        message = (
            f"{where}: cannot decode image ({why}); re-create the shard with alexnet-prepare, "
            "or set loader.bad_images=skip to skip such images"
        )
        # One argument: the message alone, as a DataLoader worker's error is rebuilt in the main process.
        super().__init__(message if why is not None else where)
        self.where, self.why = where, why

    @property
    def skipped(self) -> str:
        """How a skipped image is named in Batch.skipped and the run's report."""
        return f"{self.where} (cannot decode: {self.why})"


def image_size(data: bytes, where: str) -> tuple[int, int]:
    """(width, height) of the picture as shown (its EXIF orientation applied, as both loaders
    decode it) from its header alone; BadImage where there is no readable header (both loaders
    make a training sample's draws from its size before decoding it)."""
    try:
        return shown_size(Image.open(io.BytesIO(data)))
    except Exception as exc:
        raise BadImage(where, str(exc)) from None


def all_skipped(skipped) -> DataError:
    """A training batch none of whose images could be decoded: nothing to train on."""
    return DataError(
        f"every image of a training batch was undecodable ({'; '.join(skipped[:3])}); re-create those shards "
        "with alexnet-prepare"
    )
