"""The DALI loader: batches decoded by dali_pipeline.py, as torch tensors on the training device.

Python reads the samples of this rank's batches of the plan (plan.py) through their index files
(samples.py) and makes each training sample's random draws from its place in the epoch, as the
webdataset loader does; DALI decodes (on the GPU where there is one), cuts and mirrors. So both
loaders train on the same batches, and a pass starts at any batch by asking for it: resuming needs
no reader state, on any number of processes.

An image whose header cannot be read never reaches DALI: it is skipped, counted and named, or stops
the run (`bad_images=error`). One that fails inside the decoder stops the pipeline without naming
the sample; the loader then finds it by decoding the pending batches' images one by one, and starts
the pipeline again at that batch with a blank image in its place, dropped from the batch.
"""

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import Loader as LoaderSettings
from ..errors import ConfigError, DataError
from .dali_pipeline import PipelineSpec, blank_jpeg, build_pipeline
from .loader import BadImage, Batch, all_skipped, image_size
from .members import SampleFormat, parse_label
from .plan import EpochPlan
from .resized_crop import resized
from .samples import SampleReader
from .transforms import Augmentation, colour_shift, draw


def to_torch(dali_batch, device: torch.device) -> torch.Tensor:
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    tensor = dali_batch.as_tensor()
    out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    return feed_ndarray(tensor, out, cuda_stream=stream)


def decode_error(data: bytes, spec: PipelineSpec) -> str | None:
    """Why DALI cannot decode `data` on the spec's device, or None if it can."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=spec.device_id if spec.device == "gpu" else None)
    def check():
        encoded = fn.external_source(source=lambda: [np.frombuffer(data, np.uint8)], batch=True)
        return fn.decoders.image(encoded, device="mixed" if spec.device == "gpu" else "cpu", output_type=types.RGB)

    try:
        pipe = check()
        pipe.build()
        pipe.run()
    except RuntimeError as exc:
        return dali_reason(exc)
    return None


def dali_reason(exc: Exception) -> str:
    """The line of a DALI error that says what went wrong."""
    text = str(exc)
    lines = [line.strip() for line in text.split("encountered:", 1)[-1].splitlines()]
    lines = [line for line in lines if line and not line.startswith(("C++ context", "Current pipeline"))]
    return lines[0] if lines else text.strip().splitlines()[0]


@dataclass
class Pending:
    """One batch handed to the pipeline, what goes with its images out of it."""

    encoded: list  # the bytes given to DALI, blanks included
    keep: list  # per image: False for a blank standing in for a skipped one
    labels: list = field(default_factory=list)
    keys: list = field(default_factory=list)
    shifts: list = field(default_factory=list)
    windows: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    wheres: list = field(default_factory=list)  # "<tar>:<key>" of each image, blanks included
    regions: list = field(default_factory=list)  # training: each image's [left, top, width, height, mirror]


class DaliLoader:
    """Iterable over one split for this rank; `position` gives (epoch, batches already trained on)
    at the start of a pass."""

    def __init__(
        self,
        plan: EpochPlan,
        augment: Augmentation,
        spec: PipelineSpec,
        *,
        sample_format: SampleFormat,
        classes: list[str],
        position,
        device: torch.device,
        strict: bool,
        cache,
    ):
        self.plan, self.augment, self.spec = plan, augment, spec
        self.sample_format, self.classes = sample_format, classes
        self.position, self.device, self.strict, self.cache = position, device, strict, cache
        self.blank = blank_jpeg(max(spec.crop, spec.val_resize or 0))
        self.skipped = []  # "<tar>:<key> (reason)" of images skipped in this process

    def __len__(self) -> int:
        return self.plan.batches()

    def __iter__(self):
        epoch, done = self.position()
        batches = self.plan.places(epoch)
        uses = self.plan.first_uses(epoch, batches) if self.cache is not None else []
        reader, pending, bad = SampleReader(self.cache, uses), {}, {}

        def start(first: int):
            def source(info):
                i = first + info.iteration
                if i >= len(batches):  # asked ahead past the pass's end
                    raise StopIteration
                reader.reading(i)
                pending[i] = self.prepare(reader, epoch, batches[i], bad)
                return self.inputs(pending[i])

            return build_pipeline(self.spec, source)

        try:
            pipe, i = start(done), done
            while i < len(batches):
                try:
                    outputs = pipe.run()
                except RuntimeError as exc:
                    found = self.find_bad(pending, i)
                    if not found:
                        raise DataError(
                            f"the DALI {self.spec.mode} pipeline stopped at batch {i}: {dali_reason(exc)}; "
                            "if it names a shard, re-create it with alexnet-prepare"
                        ) from None
                    bad.update(found)
                    pipe = start(i)  # again from this batch, the bad images blank
                    continue
                yield self.batch(outputs[0], pending.pop(i))
                i += 1
        finally:
            reader.close()

    def prepare(self, reader: SampleReader, epoch: int, places, bad: dict) -> Pending:
        """Read one batch's samples and make their draws; `bad`: "<tar>:<key>" of images the
        decoder refused, given as blanks."""
        plan, a, fmt = self.plan, self.augment, self.sample_format
        noise = a.noise_at(epoch) if plan.train else 0.0
        out = Pending([], [])
        for place, (shard, number) in zip(places, plan.locate(epoch, places), strict=True):
            key, members = reader.read(shard, number)
            where = f"{shard.tar}:{key}"
            label = parse_label(members.get(fmt.label_ext), where, fmt, self.classes)
            image_ext = fmt.image_of(members)
            if image_ext is None:
                raise DataError(f"{where}: sample has no {fmt.describe_images()} image")
            data = members[image_ext]
            try:
                if where in bad:
                    raise BadImage(where, bad[where])
                w, h = image_size(data, where)  # bytes that are no image stop here, not in the decoder
            except BadImage as exc:
                if self.strict:
                    raise
                out.skipped.append(exc.skipped)
                out.encoded.append(self.blank)
                out.keep.append(False)
                out.wheres.append(where)
                out.regions.append([0, 0, self.spec.crop, self.spec.crop, 0])
                continue
            if plan.train:
                if a.style == "paper" and min(w, h) < a.crop:
                    raise DataError(
                        f"{where}: {w}x{h} px, smaller than data.crop={a.crop}; lower data.crop, re-run "
                        "alexnet-prepare with a larger --resize, or use loader=wds (which enlarges small images)"
                    )
                draws = draw(a, random.Random(plan.sample_seed(epoch, int(place))), w, h)
                out.shifts.append(colour_shift(draws.z, noise, a.pca_std, a.pca_vectors))
                out.windows.append([draws.box[0], draws.box[1], int(draws.mirror)])
                out.regions.append([*draws.box, int(draws.mirror)])
            out.encoded.append(np.frombuffer(data, np.uint8))
            out.keep.append(True)
            out.wheres.append(where)
            out.labels.append(label)
            out.keys.append((shard.tar, key))
        if plan.train and not any(out.keep):
            raise all_skipped(out.skipped)
        return out

    def inputs(self, p: Pending) -> tuple:
        """What the pipeline's external source hands DALI for one batch."""
        if not self.plan.train:
            return (p.encoded,)
        regions = np.asarray(p.regions, np.int32)
        return (
            p.encoded,
            list(regions[:, 0:2]),  # [left, top]
            list(regions[:, 2:4]),  # [width, height]
            [np.array(m, np.int32) for m in regions[:, 4]],
        )

    def find_bad(self, pending: dict, first: int) -> dict:
        """{"<tar>:<key>": why} of the images DALI cannot decode among the batches handed to the
        pipeline from `first` on (the one asked for and those prefetched)."""
        found = {}
        for i in sorted(k for k in pending if k >= first):
            p = pending[i]
            for data, kept, where in zip(p.encoded, p.keep, p.wheres, strict=True):
                why = decode_error(bytes(data), self.spec) if kept else None
                if why:
                    if self.strict:
                        raise BadImage(where, why)
                    found[where] = why
            if found:
                break
        return found

    def batch(self, images, p: Pending) -> Batch:
        """The images of one run with what goes with them; blanks left out."""
        if self.spec.regions_out:
            images = self.resize_regions(images, p)
        else:
            images = to_torch(images, self.device)
            if self.spec.layout == "HWC":  # channels-last memory, NCHW shape
                images = images.movedim(-1, -3)
            if not all(p.keep):
                images = images[torch.from_numpy(np.flatnonzero(p.keep)).to(images.device)]
        self.skipped.extend(p.skipped)
        labels = torch.tensor(p.labels, dtype=torch.int64, device=self.device)
        if not self.plan.train:
            return Batch(images, labels, skipped=tuple(p.skipped), keys=tuple(p.keys))
        shifts = torch.from_numpy(np.stack(p.shifts)).to(self.device)
        windows = torch.tensor(p.windows, device=self.device) if self.augment.windows else None
        return Batch(images, labels, shifts, windows, tuple(p.skipped), tuple(p.keys))

    def resize_regions(self, regions, p: Pending) -> torch.Tensor:
        """The random-resized crops of DALI's CPU mode: the decoded regions (HWC, each its own size;
        valid until the pipeline runs again) resized to the crop and mirrored by torch, blanks left
        out, stacked in the layout asked for. On one torch thread: an image is too little to share,
        and idle helper threads would spin beside DALI's (measured: 1.5x slower with two)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            kept, size = np.flatnonzero(p.keep), self.spec.crop
            if self.spec.layout == "HWC":  # channels-last memory, NCHW shape
                images = torch.empty((len(kept), size, size, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
            else:
                images = torch.empty((len(kept), 3, size, size), dtype=torch.uint8)
            for out, i in zip(images, kept, strict=True):
                crop = resized(np.asarray(regions[int(i)]), size)
                out.copy_(crop.flip(-1) if p.regions[i][4] else crop)  # one copy, mirrored and laid out
        finally:
            torch.set_num_threads(threads)
        return images.to(self.device)


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
    cache=None,
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
    spec = PipelineSpec(
        mode=plan.mode if plan.mode == "train" or augment.test_views == 10 else "val",
        batch_size=plan.batch,
        crop=augment.crop,
        device=kind,
        device_id=gpu_index(device) if kind == "gpu" else None,
        threads=settings.threads,
        prefetch=settings.prefetch,
        augment=augment.style,
        val_resize=augment.val_resize,
        layout={"NCHW": "CHW", "NHWC": "HWC"}[settings.layout],
    )
    return DaliLoader(
        plan,
        augment,
        spec,
        sample_format=sample_format,
        classes=classes,
        position=position,
        device=device if kind == "gpu" else torch.device("cpu"),
        strict=settings.bad_images == "error",
        cache=cache,
    )
