"""The DALI loader: batches from dali_pipeline.py as torch tensors on the training device.

Each pass (a training epoch, a validation run) builds a fresh pipeline for this rank's samples of
the plan (plan.py), so an epoch is always whole and its shuffle depends only on (seed, epoch,
rank). Training takes the plan's number of batches; evaluation reads this rank's samples once and
drops the reader's padding.

The reader is given only the tars the rank's samples lie in, each with an index file of just those
samples, written for the pass into a private temporary folder: what a rank opens and reads at
start-up then depends on its own slice, not on the world size or the number of shards.

Exact resume: before each batch the pipeline's own checkpoint (reader position, random
generators) is kept, and `state()` hands the one matching the trained position to the training
checkpoint; a resumed pass rebuilds the pipeline from it instead of decoding its way forward.

A corrupt image stops a DALI pipeline without naming the sample. The loader then finds it (see
dali_pipeline.py for the substitution switch), and either skips it, counted, or stops with the
shard and key named (`bad_images=error`).
"""

import re
import shutil
import sys
import tarfile
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

from ..config import Loader as LoaderSettings
from ..errors import ConfigError, DataError
from . import shard_index, store
from .dali_pipeline import PipelineSpec, Substitute, build_pipeline
from .loader import BadImage, Batch, all_skipped
from .manifest import check_end, check_tar, tar_header
from .members import SampleFormat, parse_label
from .plan import EpochPlan, Piece
from .transforms import Augmentation

# Saved loader states carry this; a state of an earlier layout (2: the reader got every tar and
# cut the rank's samples out itself) does not fit the pipelines built now and is replaced by replaying.
STATE_VERSION = 3


def to_torch(dali_batch, device: torch.device) -> torch.Tensor:
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    tensor = dali_batch.as_tensor()
    out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    return feed_ndarray(tensor, out, cuda_stream=stream)


def sample_of(where: str) -> tuple[str, str]:
    """(tar, sample key) of DALI's source info "<tar>:<data offset>:<member name>"."""
    tar, _, member = where.rsplit(":", 2)
    return tar, shard_index.sample_key(member)


def read_member(where: str) -> bytes:
    """The bytes of a tar member from DALI's source info "<tar>:<data offset>:<name>"."""
    tar, offset, _ = where.rsplit(":", 2)
    with store.open_file(tar) as f:
        header = tar_header(f, tar, int(offset) - tarfile.BLOCKSIZE)  # damaged since slice_index looked?
        return f.read(header.size)


def decode_error(data: bytes, spec: PipelineSpec) -> str | None:
    """Why DALI cannot decode `data` on the spec's device, or None if it can. The header is read
    on its own first, as in the pipeline (see there)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=spec.device_id if spec.device == "gpu" else None)
    def check(step):
        encoded = fn.external_source(source=lambda: [np.frombuffer(data, np.uint8)], batch=True)
        if step == "peek":
            return fn.peek_image_shape(encoded)
        return fn.decoders.image(encoded, device="mixed" if spec.device == "gpu" else "cpu", output_type=types.RGB)

    for step in ("peek", "decode"):
        try:
            pipe = check(step)
            pipe.build()
            pipe.run()
        except RuntimeError as exc:
            return dali_reason(exc)
    return None


def check_contents(tar: str, offset: int, end: int | None) -> None:
    """DALI reads what the index points at, whatever it is. So before a pass, a tar header must
    stand before `offset`, where the pass's slice of the tar starts (not zeros or other bytes),
    and where the tar ends (`end`, when the slice reaches it) no further member may follow: a tar
    holding more samples than its index and the manifest count would be read short without a
    word. A block or two per tar of the slice, which DALI opens anyway."""
    with store.open_file(tar) as f:
        tar_header(f, tar, offset - tarfile.BLOCKSIZE)
        if end is None:
            return
        f.seek(-(-end // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)  # after the last data, padded to a block
        after = f.read(tarfile.BLOCKSIZE)
    try:
        tarfile.TarInfo.frombuf(after, "utf-8", "surrogateescape")
    except (tarfile.EOFHeaderError, tarfile.EmptyHeaderError):
        return  # zeros (the end-of-archive blocks) or the end of the file
    except tarfile.HeaderError:
        raise DataError(
            f"{tar}: damaged after its last sample (not a tar's end); re-create it with alexnet-prepare"
        ) from None
    raise DataError(
        f"{tar}: holds more samples than its index file and manifest.json count; "
        "re-run alexnet-prepare so shards and manifest agree"
    )


def slice_index(piece: Piece, path: Path) -> str:
    """Writes to `path` the DALI index of just samples piece.start..stop-1 of its shard (the
    offsets stay those of the whole tar) and returns the path."""
    shard = piece.shard
    size = check_tar(shard)  # checked by another rank's share at start; gone since?
    part = shard_index.read(shard)[piece.start : piece.stop]
    (offset, _, _), (_, end, _) = shard_index.entry(part[0], shard.index), shard_index.entry(part[-1], shard.index)
    check_end(shard.tar, end, size)  # samples lie in index order: the slice's last one ends last
    # Another tool's shard may hold samples after its index's last (left out by alexnet-prepare index).
    check_contents(shard.tar, offset, end if piece.stop == shard.count and shard.exact else None)
    path.write_text(shard_index.text(part))
    return str(path)


def dali_reason(exc: Exception) -> str:
    """The line of a DALI error that says what went wrong."""
    text = str(exc)
    lines = [line.strip() for line in text.split("encountered:", 1)[-1].splitlines()]
    lines = [line for line in lines if line and not line.startswith(("C++ context", "Current pipeline"))]
    return lines[0] if lines else text.strip().splitlines()[0]


def start_pipeline(spec: PipelineSpec, substitute: Substitute, checkpoint: bytes | None = None):
    """build_pipeline, with the reader's complaints about the shards in one line."""
    try:
        return build_pipeline(spec, substitute, checkpoint)
    except RuntimeError as exc:
        reason = dali_reason(exc)
        if unreachable(spec, reason):
            raise store.Transient(
                f"cannot read the shards ({reason}); check that the store is reachable", reason
            ) from None
        found = re.search(r'Underful sample detected at index file at "(.+)" line (\d+)', reason)
        if found:  # the index lists a sample with fewer parts than an image and a label
            index, line = Path(found[1]), int(found[2])
            entry = index.read_text().splitlines()[line].split()  # DALI counts samples from 1 after the header
            parts = ", ".join(f".{entry[i]}" for i in range(0, len(entry), 4))
            tar = dict(zip(spec.indexes, spec.tars, strict=True))[str(index)]
            image = SampleFormat(spec.images).describe_images()
            raise DataError(
                f"{tar}: sample {Path(entry[3]).stem} has only {parts} (needs {image} "
                f"and .{spec.label}); re-create the shard with alexnet-prepare"
            ) from None
        raise DataError(f"cannot read the shards ({reason}); re-create them with alexnet-prepare") from None


# What DALI's S3 client says when the store cannot be reached (from curl and the AWS SDK). It also
# takes a failed request for an object's size as "not found": an object really missing is named
# before, when the pass's index files are cut (slice_index asks the store for every tar's size).
NETWORK_TROUBLE = (
    "curlCode",
    "connect to",
    "Could not connect",
    "Unable to connect",
    "timed out",
    "Connection reset",
    "S3 Object not found",
)


def unreachable(spec: PipelineSpec, reason: str) -> bool:
    return any(store.is_remote(tar) for tar in spec.tars) and any(sign in reason for sign in NETWORK_TROUBLE)


def run_failure(spec: PipelineSpec, exc: RuntimeError) -> DataError:
    """A pipeline run's failure: Transient when the shards' store could not be reached (tried
    again by `reaching`), else final."""
    reason = dali_reason(exc)
    if unreachable(spec, reason):
        return store.Transient(f"the DALI {spec.mode} pipeline cannot reach the shards ({reason})", reason)
    return DataError(f"the DALI {spec.mode} pipeline stopped: {reason}")


def reaching(spec: PipelineSpec, attempt, failed: str | None = None):
    """attempt() under the store's retry policy (store.retry), as the webdataset loader's reads
    are: DALI's own S3 client does not retry. `failed`: why a first try, already made, failed. The
    last line names the pass's shards."""
    shards = ", ".join(spec.tars[:2]) + (f" and {len(spec.tars) - 2} more" if len(spec.tars) > 2 else "")
    first = store.Transient(failed, failed) if failed is not None else None
    return store.retry(shards, attempt, first)


class DaliLoader:
    """Iterable over one split for this rank. `spec_for(epoch)` gives the pipeline of a pass,
    `position` (epoch, batches already trained on) at the start of a pass."""

    def __init__(
        self,
        plan: EpochPlan,
        spec_for,
        *,
        sample_format: SampleFormat,
        classes: list[str],
        position,
        device: torch.device,
        strict: bool,
    ):
        self.plan, self.spec_for = plan, spec_for
        self.sample_format, self.classes = sample_format, classes
        self.position, self.device, self.strict = position, device, strict
        self.valid = None if plan.train else plan.samples()  # real samples of an evaluation pass
        self.epoch = None
        self.states = {}  # batches done in the current pass -> pipeline checkpoint
        self.pipe, self.spec, self.yielded = None, None, 0
        self.restored = None  # (epoch, batches done, world size, batch, checkpoint) from a training checkpoint
        self.skipped = []  # "<tar>:<key> (reason)" of images skipped in this process
        self.dropped = {}  # iteration -> the images skipped from its batch

    def __len__(self) -> int:
        return self.plan.batches()

    def state(self, epoch: int, done: int) -> dict:
        """What resuming at (epoch, done) needs; empty at an epoch boundary."""
        if done == 0 or epoch != self.epoch:
            return {}
        if done == self.yielded:  # nothing fetched ahead: the pipeline stands right there
            checkpoint = self.pipe.checkpoint()
        elif done in self.states:  # the trainer fetched a batch ahead: the state kept before it
            checkpoint = self.states[done]
        else:
            return {}
        return {
            "version": STATE_VERSION,
            "epoch": epoch,
            "done": done,
            "world": self.plan.world,
            "batch": self.plan.batch,
            "dali": bytes(checkpoint),
        }

    def restore(self, state: dict) -> None:
        if state and "version" in state and state["version"] == STATE_VERSION:
            keys = ("epoch", "done", "world", "batch")
            self.restored = (*(state[k] for k in keys), state["dali"])

    def __iter__(self):
        epoch, done = self.position()
        self.epoch, self.states, self.yielded, self.dropped = epoch, {}, done, {}
        self.spec = spec = self.spec_for(epoch)
        checkpoint = None
        # The saved reader state fits only the same place, world size and per-rank batch.
        if self.restored and self.restored[:4] == (epoch, done, self.plan.world, self.plan.batch):
            checkpoint = self.restored[4]
        self.restored = None
        try:
            self.pipe = reaching(spec, lambda: start_pipeline(spec, Substitute(spec.batch_size), checkpoint))
        except store.Unreachable:
            raise
        except DataError:
            if checkpoint is None:
                raise
            # A saved state from another pipeline (the augmentation or device changed): replay.
            print(
                "warning: the loader state in the checkpoint does not fit this pipeline; replaying the "
                f"{done} batches of epoch {epoch} already trained on",
                file=sys.stderr,
                flush=True,
            )
            checkpoint = None
            self.pipe = reaching(spec, lambda: start_pipeline(spec, Substitute(spec.batch_size)))
        if done and checkpoint is None:  # no saved pipeline state (e.g. switched loaders): replay
            for i in range(done):
                self.pipe, _ = self._run(self.pipe, spec, i, self.pipe.checkpoint())
        for i in range(done, len(self)):
            before = self.pipe.checkpoint()
            self.states = {k: v for k, v in self.states.items() if k >= i - 2}
            self.states[i] = before
            self.pipe, outputs = self._run(self.pipe, spec, i, before)
            self.yielded = i + 1
            yield self._batch(outputs, i, spec)

    def _run(self, pipe, spec: PipelineSpec, iteration: int, before: bytes):
        try:
            return pipe, pipe.run()
        except RuntimeError as exc:
            reason = dali_reason(exc)
            if unreachable(spec, reason):  # the store went away: try again from the batch's start

                def again():
                    pipe = start_pipeline(spec, Substitute(spec.batch_size), before)
                    try:
                        return pipe, pipe.run()
                    except RuntimeError as exc:
                        raise run_failure(spec, exc) from None

                return reaching(spec, again, failed=reason)
            # An image that cannot be read fails in the header peek (or, cut short, in the decoder);
            # an assertion is a configuration fault, and probing after one crashed DALI.
            image_error = "peek_image_shape" in str(exc) or ("decoders" in str(exc) and "Assert" not in str(exc))
            bad = self._find_bad(spec, iteration, before) if image_error else {}
            if not bad:
                raise DataError(
                    f"the DALI {spec.mode} pipeline stopped at batch {iteration}: {reason}; "
                    "if it names a shard, re-create it with alexnet-prepare"
                ) from None
            if self.strict:
                raise next(b for masks in bad.values() for b in masks.values()) from None
            masks = {}
            for it, found in bad.items():
                masks[it] = [pos in found for pos in range(spec.batch_size)]
                names = list(dict.fromkeys(b.skipped for b in found.values()))
                self.dropped[it] = names
                self.skipped.extend(names)
            pipe = start_pipeline(spec, Substitute(spec.batch_size, masks), before)
            return pipe, pipe.run()

    def _find_bad(self, spec: PipelineSpec, iteration: int, before: bytes) -> dict:
        """{iteration: {position: BadImage}} for undecodable images in the batches the failed run
        could have been working on (the one asked for and those prefetched)."""
        probe = start_pipeline(spec, Substitute(spec.batch_size, everything=True), before)
        bad = {}
        for it in range(iteration, iteration + spec.prefetch + 1):
            info = probe.run()[2]
            for pos in range(spec.batch_size):
                where = bytes(info.at(pos)).decode()
                why = decode_error(read_member(where), spec)
                if why:
                    bad.setdefault(it, {})[pos] = BadImage(where, why)
            if bad:
                break
        return bad

    def _batch(self, outputs, iteration: int, spec: PipelineSpec) -> Batch:
        """The images, labels and, in training, colour shifts [and crop windows] of one run."""
        images, label, info, swapped, *extra = outputs
        sources = [bytes(info.at(i)).decode() for i in range(len(label))]
        fmt, classes = self.sample_format, self.classes
        labels = np.array([parse_label(bytes(label.at(i)), sources[i], fmt, classes) for i in range(len(label))])
        keep = ~np.asarray(swapped.as_array(), dtype=bool).reshape(-1)
        if self.valid is not None:  # the reader pads the last batch with copies of the last sample
            keep[max(0, self.valid - iteration * spec.batch_size) :] = False
        batch = [to_torch(images, self.device), torch.from_numpy(labels.astype(np.int64))]
        batch += [torch.from_numpy(e.as_array().copy()) for e in extra]
        if spec.layout == "HWC":  # channels-last memory, NCHW shape
            batch[0] = batch[0].movedim(-1, -3)
        if self.plan.train and not keep.any():
            raise all_skipped(list(self.dropped.get(iteration, ())))
        kept = np.flatnonzero(keep)
        if len(kept) < len(keep):
            index = torch.from_numpy(kept)
            batch = [t.index_select(0, index.to(t.device)) for t in batch]
        batch = [t.to(self.device) for t in batch]
        keys = tuple(sample_of(sources[i]) for i in kept)  # the same rows as the images
        return Batch(*batch, skipped=tuple(self.dropped.pop(iteration, ())), keys=keys)


def gpu_index(device: torch.device) -> int:
    """The CUDA device's number (a bare "cuda" device means the current one)."""
    return device.index if device.index is not None else torch.cuda.current_device()


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
) -> DaliLoader:
    """The DALI loader of `plan`, decoding on `device`'s GPU (loader.device=auto or gpu) or on the
    CPU. DALI cuts crops out of the stored image (after val_resize in evaluation), so every stored
    image must be at least that large: `min_side` (the manifest's) is checked against the crop.
    `worker_signals` do not matter here: DALI runs threads, not worker processes."""
    kind = str(settings.device)
    if kind == "auto":
        kind = "gpu" if device.type == "cuda" else "cpu"
    if kind == "gpu" and not torch.cuda.is_available():
        raise ConfigError("loader.device=gpu but this process sees no CUDA GPU; use loader.device=cpu (or auto)")
    cut_from_stored = augment.style == "paper" if plan.train else not augment.val_resize
    if cut_from_stored and min_side is not None and min_side < augment.crop:
        raise ConfigError(
            f"data.crop={augment.crop} is larger than the smallest stored image side ({min_side} px) of "
            f"the shards; lower data.crop, or re-run alexnet-prepare with --resize {augment.crop} or more "
            "(or use loader=wds, which enlarges small images)"
        )

    folder = Path(tempfile.mkdtemp(prefix="alexnet-dali-"))  # this loader's index files

    def spec_for(epoch: int) -> PipelineSpec:
        pieces = plan.mine(epoch)
        for old in folder.iterdir():  # the previous pass's
            old.unlink()
        indexes = [slice_index(p, folder / f"{plan.mode}-{epoch}-{i}.idx") for i, p in enumerate(pieces)]
        return PipelineSpec(
            tars=[p.shard.tar for p in pieces],
            indexes=indexes,
            images=sample_format.images,
            label=sample_format.label_ext,
            mode=plan.mode if plan.mode == "train" or augment.test_views == 10 else "val",
            batch_size=plan.batch,
            crop=augment.crop,
            seed=plan.seed_for(epoch),
            device=kind,
            device_id=gpu_index(device) if kind == "gpu" else None,
            threads=settings.threads,
            prefetch=settings.prefetch,
            shuffle_buffer=settings.shuffle_buffer,
            augment=augment.style,
            flip=augment.flip,
            val_resize=augment.val_resize,
            colour_noise=augment.noise_at(epoch),
            layout={"NCHW": "CHW", "NHWC": "HWC"}[settings.layout],
            pca_std=tuple(augment.pca_std),
            pca_vectors=tuple(np.asarray(augment.pca_vectors).flatten().tolist()),
            min_area=augment.min_area,
            windows=plan.train and augment.windows,
        )

    loader = DaliLoader(
        plan,
        spec_for,
        sample_format=sample_format,
        classes=classes,
        position=position,
        device=device if kind == "gpu" else torch.device("cpu"),
        strict=settings.bad_images == "error",
    )
    weakref.finalize(loader, shutil.rmtree, folder, True)  # also at exit
    return loader
