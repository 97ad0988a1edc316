"""The portable loader: webdataset reads the tars, PIL decodes, a torch DataLoader runs workers.

Each worker takes a contiguous part of its rank's samples in the plan (plan.py): in training just
as many as its share of the epoch's batches needs, read in a shuffled order of their shards and
mixed through a shuffle buffer; in evaluation an equal part, in order.

Every random draw of a sample comes from a generator named by (seed, epoch, rank, worker, sample
index), so a resumed pass skips the samples already trained on without decoding them and the
rest come out as in an uninterrupted run. An image that cannot be decoded is dropped from its
batch and named in `Batch.skipped` (loader.bad_images=skip), or stops the run naming shard and
key (error); either way it keeps its place in the stream, so resuming stays exact.
"""

import atexit
import functools
import gc
import io
import multiprocessing
import random
import signal
import tarfile
import threading

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_expander

from ..config import Loader as LoaderSettings
from ..errors import DataError
from . import shard_index, store
from .loader import BadImage, Batch, all_skipped
from .manifest import tar_header
from .members import SampleFormat, parse_label
from .plan import EpochPlan, Piece
from .transforms import Augmentation, center_crop, colour_shift, crop_box, random_crop_flip, ten_views


def decode_image(data: bytes, where: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        return image.convert("RGB")  # grey, palette, CMYK and alpha all come out RGB, as from DALI
    except Exception as exc:
        raise BadImage(where, str(exc)) from None


def random_resized_crop(
    data: bytes, size: int, rng: random.Random, where: str, flip: bool = True, min_area: float = 0.08
) -> Image.Image:
    """The modern training view: a random region resized to size x size, mirrored with p=0.5.
    The region is chosen from the JPEG header alone, so the decoder can work at 1/2, 1/4 or 1/8
    scale (libjpeg's DCT scaling, PIL's draft mode) whenever the region still covers size pixels
    at that scale: most regions are large, and this is where most of the speed comes from."""
    try:
        image = Image.open(io.BytesIO(data))
        w, h = image.size
        left, top, cw, ch = crop_box(w, h, rng, min_area)
        if image.format == "JPEG":
            image.draft("RGB", (-(-w * size // cw), -(-h * size // ch)))  # at least size px of region
        sx, sy = image.size[0] / w, image.size[1] / h
        image = image.convert("RGB")
    except Exception as exc:
        raise BadImage(where, str(exc)) from None
    image = image.resize((size, size), Image.BILINEAR, box=(left * sx, top * sy, (left + cw) * sx, (top + ch) * sy))
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class ShardStream(IterableDataset):
    """Batches of one pass over this rank's shards; `epoch` and `skip` (batches of the epoch
    already trained on) are set by EpochLoader before each pass."""

    def __init__(
        self,
        plan: EpochPlan,
        augment: Augmentation,
        *,
        sample_format: SampleFormat,
        classes: list[str],
        workers: int,
        shuffle_buffer: int,
        strict: bool,
    ):
        self.plan, self.augment = plan, augment
        self.sample_format, self.classes = sample_format, classes
        self.workers, self.shuffle_buffer, self.strict = max(1, workers), shuffle_buffer, strict
        self.epoch = 0
        self.skip = 0

    def worker_batches(self, worker: int) -> int:
        """How many batches this worker yields in one pass."""
        if self.plan.train:
            steps = self.plan.steps
            return steps // self.workers + (worker < steps % self.workers)
        start, stop = self.worker_span(worker)
        return -(-(stop - start) // self.plan.batch)

    def worker_span(self, worker: int) -> tuple[int, int]:
        """The worker's samples of the laid-out split: in training, those its batches need."""
        start, stop = self.plan.span()
        if self.plan.train:
            need = [self.worker_batches(w) * self.plan.batch for w in range(self.workers)]
            first = start + sum(need[:worker])
            return first, first + need[worker]
        n = stop - start
        return start + n * worker // self.workers, start + n * (worker + 1) // self.workers

    def __len__(self) -> int:
        return sum(self.worker_batches(w) for w in range(self.workers))

    def samples(self, pieces: list[Piece]):
        """(tar location, sample dict) of each piece in turn, the samples its index lists in that
        order; a shard read to its end is checked against the manifest's count. Samples a shard
        holds beyond its index (another tool's shards: alexnet-prepare index left them out) are
        passed over."""
        for piece in pieces:
            shard = piece.shard
            offset, keys = start_of(piece)  # outside the try: its errors name the index, not the tar
            count = piece.start
            whole = piece.stop == shard.count and shard.exact  # read on to the end, to check the count
            try:
                with store.open_file(shard.tar) as f:
                    tar_header(f, shard.tar, offset)  # zeros would read as an empty tar
                    f.seek(offset)
                    members = tar_file_expander([{"url": shard.tar, "stream": f}])
                    # another tool's sample with two members of one extension is left out of the index
                    # (alexnet-prepare index): passed over here too, instead of stopping the stream
                    handler = reraise_exception if shard.exact else passing_duplicates
                    for sample in group_by_keys(members, handler=handler):
                        if count < piece.stop and sample["__key__"] == keys[count - piece.start]:
                            yield shard.tar, sample
                        elif count < piece.stop and shard.exact:
                            raise DataError(
                                f"{shard.tar}: its index file says sample {count} is {keys[count - piece.start]}, "
                                f"the tar holds {sample['__key__']} there; re-run alexnet-prepare"
                            )
                        elif not shard.exact:
                            continue  # not in the index
                        count += 1
                        if count >= piece.stop and not whole:
                            break
            except store.Missing:  # removed since the start-up check
                raise DataError(f"{shard.tar}: listed in manifest.json but missing; re-run alexnet-prepare") from None
            except (tarfile.TarError, OSError, ValueError) as exc:
                raise DataError(
                    f"{shard.tar}: unreadable after {count} samples ({reason(exc)}); "
                    "the tar is damaged: re-create it with alexnet-prepare"
                ) from None
            if count < piece.stop or (whole and count != shard.count):
                raise DataError(
                    f"{shard.tar}: holds {count} samples but manifest.json says {shard.count}; "
                    "re-run alexnet-prepare so shards and manifest agree"
                )

    def train_samples(self, pieces: list[Piece], rng: random.Random):
        """The pieces in a random order, mixed through a shuffle buffer so consecutive samples
        come from different places."""
        order = list(pieces)
        rng.shuffle(order)
        buffer = []
        for item in self.samples(order):
            if len(buffer) < max(1, self.shuffle_buffer):
                buffer.append(item)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], item = item, buffer[i]
            yield item
        rng.shuffle(buffer)
        yield from buffer

    def skipped_batches(self, worker: int) -> int:
        """Of the first `self.skip` batches of the epoch, how many came from this worker: the
        DataLoader takes batches from its workers in turn (0, 1, ..., W-1, 0, ...)."""
        return max(0, (self.skip - worker + self.workers - 1) // self.workers)

    def view(self, data: bytes, rng: random.Random, where: str, window: list | None):
        """The augmented image (or the ten views) of one sample's encoded bytes."""
        a = self.augment
        if self.plan.train and a.style == "modern":
            return random_resized_crop(data, a.crop, rng, where, a.flip, a.min_area)
        image = decode_image(data, where)
        if self.plan.train:
            return random_crop_flip(image, a.crop, rng, a.flip, window)
        if self.plan.mode == "test" and a.test_views == 10:
            return ten_views(image, a.crop, a.val_resize)
        return center_crop(image, a.crop, a.val_resize)

    def __iter__(self):
        info = get_worker_info()
        # The DataLoader asks its workers in turn starting from worker 0; after skipping `skip`
        # batches the next one belongs to worker skip % W, so worker ids are rotated to match.
        worker = ((info.id if info else 0) + self.skip) % self.workers
        plan, batch_size = self.plan, self.plan.batch
        name = f"{plan.seed}-{self.epoch}-{plan.rank}-{worker}"
        pieces = plan.pieces(self.epoch, *self.worker_span(worker))
        if plan.train:
            stream = self.train_samples(pieces, random.Random(name))
        else:
            stream = self.samples(pieces)
        remaining = self.worker_batches(worker) - self.skipped_batches(worker)
        # Resuming mid-epoch: pass over the samples of batches already trained on without decoding them.
        index = self.skipped_batches(worker) * batch_size
        for _ in range(index):
            next(stream, None)
        noise = self.augment.noise_at(self.epoch) if plan.train else 0.0
        pca = (self.augment.pca_std, self.augment.pca_vectors)
        images, labels, keys, shifts, windows, skipped, taken = [], [], [], [], [], [], 0
        for tar, sample in stream:
            if remaining <= 0:
                return
            where = f"{tar}:{sample['__key__']}"
            fmt = self.sample_format
            label = parse_label(sample.get(fmt.label_ext), where, fmt, self.classes)
            image_ext = fmt.image_of(sample)
            if image_ext is None:
                raise DataError(f"{where}: sample has no {fmt.describe_images()} image")
            rng = random.Random(f"{name}-{index}")
            index, taken = index + 1, taken + 1
            window = [] if plan.train and self.augment.windows else None
            try:
                image = self.view(sample[image_ext], rng, where, window)
            except BadImage as exc:
                if self.strict:
                    raise
                skipped.append(exc.skipped)
                image = None
            if image is not None:
                if noise:  # the colour shift of section 4.1, added on the device by DeviceNormalize
                    z = [rng.gauss(0, 1) for _ in range(3)]
                    shifts.append(torch.from_numpy(colour_shift(z, noise, *pca)))
                if window is not None:
                    windows.append(window)
                images.append(
                    torch.stack([to_tensor(v) for v in image]) if isinstance(image, list) else to_tensor(image)
                )
                labels.append(label)
                keys.append((tar, sample["__key__"]))
            if taken == batch_size:
                yield self.batch(images, labels, keys, shifts, windows, skipped)
                images, labels, keys, shifts, windows, skipped, taken = [], [], [], [], [], [], 0
                remaining -= 1
        if taken and remaining > 0:
            yield self.batch(images, labels, keys, shifts, windows, skipped)

    def batch(self, images, labels, keys, shifts, windows, skipped) -> Batch:
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
            torch.tensor(windows) if windows else None,
            tuple(skipped),
            tuple(keys),
        )


def reason(exc: Exception) -> str:
    """What went wrong, without what webdataset appends to an error's arguments (the stream
    object, the url, " @ <file object>")."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc.args[0] if exc.args else exc).split(" @ ")[0]


def passing_duplicates(exc: Exception) -> bool:
    """group_by_keys' handler: go on past a sample's second member of one extension."""
    if isinstance(exc, ValueError) and "duplicate file name" in str(exc.args[0] if exc.args else ""):
        return True
    raise exc


def start_of(piece: Piece) -> tuple[int, list[str]]:
    """(byte offset to start reading at, keys of the piece's samples) from the shard's index file
    (every shard has one: the start-up check, Manifest.check_share, requires it). A piece that
    starts inside the shard starts at its first sample's header, so a rank skips to its slice
    without reading the samples before it (a whole shard of full-size images, at worst)."""
    index, lines = piece.shard.index, shard_index.read(piece.shard)
    entries = [shard_index.entry(line, index) for line in lines[piece.start : piece.stop]]
    keys = [key for _, _, key in entries]
    if piece.start == 0:
        return 0, keys
    if piece.shard.exact:  # alexnet-prepare writes plain ustar: a member's header lies one block before its data
        return entries[0][0] - tarfile.BLOCKSIZE, keys
    # Other tools' tars may give a member a pax header too (webdataset's ShardWriter does, for every
    # member: names over 100 bytes and non-ASCII ones live only there). The first header of the
    # piece's first sample begins where the previous sample's data ends, rounded up to a block.
    end = shard_index.entry(lines[piece.start - 1], index)[1]
    return -(-end // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE, keys


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

    def state(self, epoch: int, done: int) -> dict:
        """Nothing beyond the position: a resumed pass skips the samples trained on without decoding."""
        return {}

    def restore(self, state: dict) -> None:
        pass


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
        shuffle_buffer=settings.shuffle_buffer,
        strict=settings.bad_images == "error",
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
