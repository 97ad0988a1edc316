"""The portable loader: PIL decodes, a torch DataLoader runs workers.

Each pass reads this rank's batches of the plan (plan.py), sample by sample through their index
files (samples.py); worker k of K makes the rank's batches k, k + K, ... of the pass, which the
DataLoader hands out in turn, so the batches come out in the plan's order whatever K is.

Every random draw of a sample comes from a generator named by (seed, epoch, the sample's place in
the epoch), so a resumed pass starts at its batch without reading the ones before, on any number
of processes and workers. An image that cannot be decoded is dropped from its batch and named in
`Batch.skipped` (loader.bad_images=skip), or stops the run naming shard and key (error).
"""

import atexit
import functools
import gc
import io
import multiprocessing
import random
import signal
import threading

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import Loader as LoaderSettings
from ..errors import DataError
from .images import orientation, shown_rgb
from .loader import BadImage, Batch, all_skipped
from .members import SampleFormat, parse_label
from .plan import EpochPlan
from .resized_crop import resized_crop, turbo_rgb
from .samples import SampleReader
from .transforms import Augmentation, Draws, center_crop, colour_shift, cut_window, draw, enlarged, ten_views


def decode_image(data: bytes, where: str) -> Image.Image:
    """The picture as both loaders show it: upright by its EXIF orientation (images.orientation),
    then RGB (grey, palette, CMYK and alpha all come out RGB, as from DALI). An RGB JPEG is
    decoded by libjpeg-turbo directly (resized_crop.turbo_rgb: the same pixels as PIL's, faster)."""
    try:
        image = Image.open(io.BytesIO(data))
        pixels = turbo_rgb(data, image, orientation(image))
        return shown_rgb(image) if pixels is None else Image.fromarray(pixels)
    except Exception as exc:
        raise BadImage(where, str(exc)) from None


def training_view(data: bytes, augment: Augmentation, rng: random.Random, where: str) -> tuple[Image.Image, Draws]:
    """The augmented training image of one sample's bytes (a PIL image in paper mode, a (3, crop,
    crop) uint8 tensor in modern mode), and the draws that made it."""
    if augment.style == "paper":
        image = enlarged(decode_image(data, where), augment.crop)
        draws = draw(augment, rng, *image.size)
        return cut_window(image, draws), draws
    try:  # modern: the random-resized crop, decoded at the scale its region needs (resized_crop.py)
        view, draws = resized_crop(data, augment.crop, lambda w, h: draw(augment, rng, w, h))
    except Exception as exc:
        raise BadImage(where, str(exc)) from None
    return (view.flip(-1) if draws.mirror else view), draws


def to_tensor(image) -> torch.Tensor:
    if isinstance(image, torch.Tensor):  # already (3, H, W) uint8
        return image
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class ShardStream(IterableDataset):
    """Batches of one pass over this rank's part of the plan; `epoch` and `skip` (batches of the
    epoch already trained on) are set by EpochLoader before each pass."""

    def __init__(
        self,
        plan: EpochPlan,
        augment: Augmentation,
        *,
        sample_format: SampleFormat,
        classes: list[str],
        workers: int,
        strict: bool,
        cache=None,
    ):
        self.plan, self.augment = plan, augment
        self.sample_format, self.classes = sample_format, classes
        self.workers, self.strict, self.cache = max(1, workers), strict, cache
        self.epoch = 0
        self.skip = 0

    def __len__(self) -> int:
        return self.plan.batches()

    def __iter__(self):
        info = get_worker_info()
        # The DataLoader asks its workers in turn starting from worker 0, so worker k makes the
        # pass's batches skip + k, skip + k + K, ...
        worker = info.id if info else 0
        batches = self.plan.places(self.epoch)
        uses = self.plan.first_uses(self.epoch, batches) if self.cache is not None else []
        reader = SampleReader(self.cache, uses)
        try:
            for i in range(self.skip + worker, len(batches), self.workers):
                reader.reading(i)
                yield self.batch(reader, batches[i])
        finally:
            reader.close()

    def batch(self, reader: SampleReader, places) -> Batch:
        plan, a, fmt = self.plan, self.augment, self.sample_format
        noise = a.noise_at(self.epoch) if plan.train else 0.0
        images, labels, keys, shifts, windows, skipped = [], [], [], [], [], []
        for place, (shard, number) in zip(places, plan.locate(self.epoch, places), strict=True):
            key, members = reader.read(shard, number)
            where = f"{shard.tar}:{key}"
            label = parse_label(members.get(fmt.label_ext), where, fmt, self.classes)
            image_ext = fmt.image_of(members)
            if image_ext is None:
                raise DataError(f"{where}: sample has no {fmt.describe_images()} image")
            try:
                if plan.train:
                    rng = random.Random(plan.sample_seed(self.epoch, int(place)))
                    image, draws = training_view(members[image_ext], a, rng, where)
                elif plan.mode == "test" and a.test_views == 10:
                    image = ten_views(decode_image(members[image_ext], where), a.crop, a.val_resize)
                else:
                    image = center_crop(decode_image(members[image_ext], where), a.crop, a.val_resize)
            except BadImage as exc:
                if self.strict:
                    raise
                skipped.append(exc.skipped)
                continue
            if plan.train:
                # the colour shift of section 4.1, added on the device by DeviceNormalize
                shifts.append(torch.from_numpy(colour_shift(draws.z, noise, a.pca_std, a.pca_vectors)))
                windows.append([draws.box[0], draws.box[1], int(draws.mirror)])
            images.append(torch.stack([to_tensor(v) for v in image]) if isinstance(image, list) else to_tensor(image))
            labels.append(label)
            keys.append((shard.tar, key))
        return self.assemble(images, labels, keys, shifts, windows, skipped)

    def assemble(self, images, labels, keys, shifts, windows, skipped) -> Batch:
        n, crop = len(labels), self.augment.crop
        if not images and self.plan.train:
            raise all_skipped(skipped)
        views = (10,) if self.plan.mode == "test" and self.augment.test_views == 10 else ()
        stacked = torch.stack(images) if images else torch.zeros(0, *views, 3, crop, crop, dtype=torch.uint8)
        if not self.plan.train:
            return Batch(stacked, torch.tensor(labels, dtype=torch.int64), skipped=tuple(skipped), keys=tuple(keys))
        return Batch(
            stacked,
            torch.tensor(labels, dtype=torch.int64),
            torch.stack(shifts) if shifts else torch.zeros(n, 3),
            torch.tensor(windows) if self.augment.windows else None,
            tuple(skipped),
            tuple(keys),
        )


def kill_daemonic_children() -> None:
    """Loader workers ignore SIGTERM (Preemption.worker_signals), and SIGTERM is how
    multiprocessing ends daemonic children when the process exits: a training process leaving on
    an error, before its DataLoader stopped the workers, would then wait for them for ever (and
    its DDP peers with it). Run at exit before multiprocessing's own handler (atexit runs the
    last registered first), this kills them instead. The DataLoader's SIGCHLD handler would take
    those deaths for a worker failure and print a traceback after the run's own one-line error,
    so it is set aside first."""
    if threading.current_thread() is threading.main_thread():  # only there can handlers be set
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


@functools.cache
def kill_workers_at_exit() -> None:
    atexit.register(kill_daemonic_children)


def ignore_signals(signums: tuple[int, ...], worker_id: int) -> None:
    """worker_init_fn: the preemption warning and SIGTERM are for the training process (see
    Preemption.worker_signals)."""
    for signum in signums:
        signal.signal(signum, signal.SIG_IGN)


class EpochLoader(DataLoader):
    """A DataLoader that starts each pass where training stands.

    `position` gives (epoch, batches of that epoch already trained on). The dataset is copied into
    fresh worker processes at the start of each pass, so a resumed run continues mid-epoch with
    the very batches an uninterrupted run would have seen. The loader has its own torch generator,
    so starting a pass draws nothing from the global one (dropout's).
    """

    def __init__(self, dataset: ShardStream, position, seed: int, worker_signals: tuple[int, ...], **kwargs):
        super().__init__(
            dataset,
            batch_size=None,
            generator=torch.Generator().manual_seed(seed),
            worker_init_fn=functools.partial(ignore_signals, tuple(worker_signals)),
            **kwargs,
        )
        self.position = position
        self.skipped = []  # images dropped as undecodable in this process's passes
        if self.num_workers:
            kill_workers_at_exit()

    def __iter__(self):
        self.dataset.epoch, self.dataset.skip = self.position()
        wait_for_exiting_queue_threads()
        if self.num_workers:
            # Garbage that waits for the cycle collector is copied into forked workers and collected
            # there: a DALI pipeline an earlier loader of this process left behind then runs its
            # destructor in a child that lacks its threads, and hangs (seen). Collected here, it is
            # destroyed once, in this process.
            gc.collect()
        for batch in super().__iter__():
            self.skipped.extend(batch.skipped)
            yield batch


def build(
    plan: EpochPlan,
    augment: Augmentation,
    settings: LoaderSettings,
    *,
    sample_format: SampleFormat,
    classes: list[str],
    position,
    device: torch.device,
    min_side: int | None = None,
    worker_signals: tuple[int, ...] = (),
    cache=None,
) -> EpochLoader:
    """The webdataset loader of `plan`: loader.workers processes (no more than there are batches),
    or the training process itself with loader.workers=0. `min_side` does not matter here: PIL
    enlarges an image smaller than the crop."""
    workers = max(1, min(settings.workers, plan.batches()))
    dataset = ShardStream(
        plan,
        augment,
        sample_format=sample_format,
        classes=classes,
        workers=workers,
        strict=settings.bad_images == "error",
        cache=cache,
    )
    processes = workers if settings.workers > 0 else 0
    return EpochLoader(
        dataset,
        position,
        seed=plan.seed,
        worker_signals=worker_signals,
        num_workers=processes,
        pin_memory=device.type == "cuda",
        prefetch_factor=settings.prefetch if processes else None,
    )


def wait_for_exiting_queue_threads(timeout: float = 0.05) -> None:
    """Workers are forked from this process. CPython 3.11 can deadlock a child forked while
    another thread is exiting (seen here: a DDP rank's new worker hung in PyOS_AfterFork_Child
    while the previous pass's multiprocessing queue-feeder threads were shutting down). Those
    threads end within milliseconds once their pass is over (others, still idle, are only
    glanced at); wait for them before forking."""
    for thread in threading.enumerate():
        if thread.name == "QueueFeederThread" and thread is not threading.current_thread():
            thread.join(timeout)
