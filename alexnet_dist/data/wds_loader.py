"""The portable loader: webdataset reads the tars, PIL decodes, a torch DataLoader runs workers.

Batches leave as uint8 NCHW tensors, training batches with each image's colour shift; the data
module normalises them on the training device.

Splitting across ranks and workers is by shard. Training gives every rank the same number of
batches, known up front (DDP would hang on an unequal count): each worker streams its own
shards round and round, reshuffled every pass, until it has produced its share of the epoch.
Validation reads each sample exactly once across all ranks; the counts may differ by rank
because the metrics are summed across ranks once, at the end of the epoch.
"""

import io
import math
import os
import random
import signal
import tarfile
import threading

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from ..errors import DataError
from .augment import PCA_STD, PCA_VECTORS, TEN_VIEWS, colour_shift, noise_at, place


def decode_image(data: bytes, where: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        return image.convert("RGB")  # greyscale, CMYK and PNG all come out RGB
    except Exception as exc:
        raise DataError(f"{where}: cannot decode image ({exc}); re-create the shard with alexnet-prepare") from None


def random_crop_flip(
    image: Image.Image, size: int, rng: random.Random, flip: bool = True, window: list | None = None
) -> Image.Image:
    """The paper's training view (section 4.1): a random size x size window, mirrored with p=0.5.
    `window`, if given, receives [left, top, mirrored] (for the mean image's matching window)."""
    w, h = image.size
    if w < size or h < size:
        image = resize_short(image, size)
        w, h = image.size
    left, top = rng.randint(0, w - size), rng.randint(0, h - size)
    image = image.crop((left, top, left + size, top + size))
    mirrored = flip and rng.random() < 0.5
    if mirrored:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if window is not None:
        window += [left, top, int(mirrored)]
    return image


def crop_box(w: int, h: int, rng: random.Random, min_area: float = 0.08) -> tuple[int, int, int, int]:
    """(left, top, width, height) of a random region covering min_area..100% of the image with an
    aspect ratio in 3/4..4/3; the whole image, trimmed to that ratio, if ten draws do not fit."""
    for _ in range(10):
        area = w * h * rng.uniform(min_area, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, w - cw), rng.randint(0, h - ch), cw, ch
    cw, ch = min(w, round(h * 4 / 3)), min(h, round(w * 4 / 3))
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def random_resized_crop(data: bytes, size: int, rng: random.Random, where: str, flip: bool = True) -> Image.Image:
    """The modern training view: a random region resized to size x size, mirrored with p=0.5.
    The region is chosen from the JPEG header alone, so the decoder can work at 1/2, 1/4 or 1/8
    scale (libjpeg's DCT scaling, PIL's draft mode) whenever the region still covers size pixels
    at that scale: most regions are large, and this is where most of the speed comes from."""
    try:
        image = Image.open(io.BytesIO(data))
        w, h = image.size
        left, top, cw, ch = crop_box(w, h, rng)
        if image.format == "JPEG":
            image.draft("RGB", (-(-w * size // cw), -(-h * size // ch)))  # at least size px of region
        sx, sy = image.size[0] / w, image.size[1] / h
        image = image.convert("RGB")
    except Exception as exc:
        raise DataError(f"{where}: cannot decode image ({exc}); re-create the shard with alexnet-prepare") from None
    image = image.resize((size, size), Image.BILINEAR, box=(left * sx, top * sy, (left + cw) * sx, (top + ch) * sy))
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image


def resize_short(image: Image.Image, size: int, resample=Image.BILINEAR) -> Image.Image:
    w, h = image.size
    if min(w, h) == size:
        return image
    scale = size / min(w, h)
    return image.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)


def center_crop(image: Image.Image, size: int, resize: int | None = None) -> Image.Image:
    if resize:
        image = resize_short(image, resize)
    w, h = image.size
    if w < size or h < size:
        image = resize_short(image, size)
        w, h = image.size
    left, top = place(0.5, w - size), place(0.5, h - size)
    return image.crop((left, top, left + size, top + size))


def ten_views(image: Image.Image, size: int, resize: int | None = None) -> list[Image.Image]:
    """The paper's test views (section 4.1): the four corners and the centre, then their mirrors."""
    if resize:
        image = resize_short(image, resize)
    w, h = image.size
    starts = [(place(x, w - size), place(y, h - size)) for x, y in TEN_VIEWS]
    crops = [image.crop((left, top, left + size, top + size)) for left, top in starts]
    return crops + [crop.transpose(Image.FLIP_LEFT_RIGHT) for crop in crops]


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def parse_label(sample: dict, where: str, num_classes: int) -> int:
    if "cls" not in sample:
        raise DataError(f"{where}: sample has no .cls label; re-create the shard with alexnet-prepare")
    try:
        label = int(sample["cls"].decode().strip())
    except ValueError:
        raise DataError(f"{where}: label {sample['cls'][:20]!r} is not an integer") from None
    if not 0 <= label < num_classes:
        raise DataError(
            f"{where}: label {label} is outside 0..{num_classes - 1} (the manifest lists "
            f"{num_classes} classes); fix the shard or the manifest"
        )
    return label


def shard_split(shards: list, rank: int, world: int, worker: int, workers: int) -> list:
    return shards[rank::world][worker::workers]


class ShardStream(IterableDataset):
    """Batches of (uint8 images NCHW, int64 labels) from this rank's shards.

    `shards` is the manifest's list ({"tar", "count"}) with absolute tar paths. `epoch` is set
    by the DataLoader below before each pass, so shuffling depends on (seed, epoch, rank, worker).
    """

    def __init__(
        self,
        shards,
        *,
        train: bool,
        batch_size: int,
        num_classes: int,
        crop: int,
        resize: int | None,
        rank: int,
        world: int,
        workers: int,
        seed: int,
        steps_per_epoch: int | None = None,
        shuffle_buffer: int = 2000,
        flip: bool = True,
        augment: str = "paper",
        colour_noise: float = 0.0,
        noise_until: int | None = None,
        views: int = 1,
        pca: tuple | None = None,
        windows: bool = False,
    ):
        self.shards, self.train, self.batch_size = shards, train, batch_size
        self.num_classes, self.crop, self.resize, self.flip = num_classes, crop, resize, flip
        self.rank, self.world, self.workers, self.seed = rank, world, max(1, workers), seed
        self.steps_per_epoch, self.shuffle_buffer = steps_per_epoch, shuffle_buffer
        self.augment, self.views = augment, views
        self.colour_noise, self.noise_until = colour_noise, noise_until
        self.pca = pca or (PCA_STD, PCA_VECTORS)  # (std devs, axes as columns)
        self.windows = windows  # training batches also carry each crop's [left, top, mirrored]
        self.epoch = 0
        self.skip = 0  # batches of this epoch already trained on (resume)

    def worker_batches(self, worker: int) -> int:
        """How many batches this worker yields in one epoch."""
        if self.train:
            return self.steps_per_epoch // self.workers + (worker < self.steps_per_epoch % self.workers)
        mine = shard_split(self.shards, self.rank, self.world, worker, self.workers)
        return math.ceil(sum(s["count"] for s in mine) / self.batch_size)

    def __len__(self) -> int:
        return sum(self.worker_batches(w) for w in range(self.workers))

    def samples(self, shards):
        """(tar path, sample dict) from each shard in turn, checked against the manifest count."""
        for shard in shards:
            count = 0
            try:
                for sample in tarfile_samples([{"url": shard["tar"]}]):
                    count += 1
                    yield shard["tar"], sample
            except (tarfile.TarError, OSError, ValueError) as exc:
                raise DataError(
                    f"{shard['tar']}: unreadable after {count} samples ({str(exc).split(' @ ')[0]}); "
                    "the tar is damaged: re-create it with alexnet-prepare"
                ) from None
            if count != shard["count"]:
                raise DataError(
                    f"{shard['tar']}: holds {count} samples but manifest.json says {shard['count']}; "
                    "re-run alexnet-prepare so shards and manifest agree"
                )

    def train_samples(self, shards, rng):
        """Endless: pass after pass over this worker's shards, each pass in a new order, mixed
        through a shuffle buffer so consecutive samples come from different places."""
        buffer = []
        while True:
            order = list(shards)
            rng.shuffle(order)
            for item in self.samples(order):
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(item)
                    continue
                i = rng.randrange(len(buffer))
                buffer[i], item = item, buffer[i]
                yield item

    def skipped_batches(self, worker: int) -> int:
        """Of the first `self.skip` batches of the epoch, how many came from this worker: the
        DataLoader takes batches from its workers in turn (0, 1, ..., W-1, 0, ...)."""
        return max(0, (self.skip - worker + self.workers - 1) // self.workers)

    def __iter__(self):
        info = get_worker_info()
        # The DataLoader asks its workers in turn starting from worker 0; after skipping `skip`
        # batches the next one belongs to worker skip % W, so worker ids are rotated to match.
        worker = ((info.id if info else 0) + self.skip) % self.workers
        name = f"{self.seed}-{self.epoch}-{self.rank}-{worker}"
        if self.train:
            # Each epoch deals the shards out to ranks afresh so every rank sees all the data over time.
            order = list(self.shards)
            random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
            stream = self.train_samples(
                shard_split(order, self.rank, self.world, worker, self.workers), random.Random(name)
            )
        else:
            stream = self.samples(shard_split(self.shards, self.rank, self.world, worker, self.workers))
        remaining = self.worker_batches(worker)
        # Resuming mid-epoch: pass over the samples of batches already trained on without decoding
        # them. Augmentation draws come from a generator per sample, so what follows is unchanged.
        index = self.skipped_batches(worker) * self.batch_size
        for _ in range(index):
            next(stream, None)
        remaining -= self.skipped_batches(worker)
        noise = noise_at(self.colour_noise, self.noise_until, self.epoch)
        images, labels, shifts, windows = [], [], [], []
        for tar, sample in stream:
            if remaining <= 0:
                return
            where = f"{tar}:{sample['__key__']}"
            label = parse_label(sample, where, self.num_classes)
            if "jpg" not in sample:
                raise DataError(f"{where}: sample has no .jpg image")
            rng = random.Random(f"{name}-{index}")
            if self.train and self.augment == "modern":
                image = random_resized_crop(sample["jpg"], self.crop, rng, where, self.flip)
            elif self.train:
                window = [] if self.windows else None
                image = random_crop_flip(decode_image(sample["jpg"], where), self.crop, rng, self.flip, window)
                if window is not None:
                    windows.append(window)
            elif self.views == 10:
                image = ten_views(decode_image(sample["jpg"], where), self.crop, self.resize)
            else:
                image = center_crop(decode_image(sample["jpg"], where), self.crop, self.resize)
            if noise:  # the colour shift of section 4.1, added on the device by the data module
                shifts.append(torch.from_numpy(colour_shift([rng.gauss(0, 1) for _ in range(3)], noise, *self.pca)))
            index += 1
            images.append(torch.stack([to_tensor(v) for v in image]) if isinstance(image, list) else to_tensor(image))
            labels.append(label)
            if len(images) == self.batch_size:
                yield self._batch(images, labels, shifts, windows)
                images, labels, shifts, windows = [], [], [], []
                remaining -= 1
        if images and remaining > 0:
            yield self._batch(images, labels, shifts, windows)

    def _batch(self, images, labels, shifts, windows):
        batch = (torch.stack(images), torch.tensor(labels))
        if not self.train:
            return batch
        batch = (*batch, torch.stack(shifts) if shifts else torch.zeros(len(labels), 3))
        return (*batch, torch.tensor(windows)) if windows else batch


SIGNAL_ENV = "ALEXNET_PREEMPT_SIGNAL"  # the preemption signal numbers, comma-separated, set by the training process


def ignore_preemption_signal(worker_id: int) -> None:
    """worker_init_fn: SLURM's preemption warning is for the training process; a worker killed by
    it would break the very step that should save the checkpoint."""
    for signum in os.environ.get(SIGNAL_ENV, str(int(signal.SIGUSR1))).split(","):
        signal.signal(int(signum), signal.SIG_IGN)


class EpochLoader(DataLoader):
    """A DataLoader that starts each pass where training stands.

    `position_fn` gives (epoch, batches of that epoch already trained on), which the data module
    derives from the trainer's global step. The dataset is copied into fresh worker processes at
    the start of each pass, so a resumed run continues mid-epoch with the very batches an
    uninterrupted run would have seen. The loader has its own torch generator, so starting a pass
    draws nothing from the global one (dropout's).
    """

    def __init__(self, dataset: ShardStream, position_fn, seed: int = 0, **kwargs):
        super().__init__(
            dataset,
            batch_size=None,
            generator=torch.Generator().manual_seed(seed),
            worker_init_fn=ignore_preemption_signal,
            **kwargs,
        )
        self.position_fn = position_fn

    def __iter__(self):
        self.dataset.epoch, self.dataset.skip = self.position_fn()
        wait_for_exiting_queue_threads()
        return super().__iter__()


def wait_for_exiting_queue_threads(timeout: float = 0.05) -> None:
    """Workers are forked from this process. CPython 3.11 can deadlock a child forked while
    another thread is exiting (seen here: a DDP rank's new worker hung in PyOS_AfterFork_Child
    while the previous pass's multiprocessing queue-feeder threads were shutting down). Those
    threads end within milliseconds once their pass is over (others, still idle, are only
    glanced at); wait for them before forking."""
    for thread in threading.enumerate():
        if thread.name == "QueueFeederThread" and thread is not threading.current_thread():
            thread.join(timeout)
