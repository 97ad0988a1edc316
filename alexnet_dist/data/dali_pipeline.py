"""The DALI pipeline definition: WebDataset shards in, uint8 crops out.

One definition serves the CPU (DALI's CPU mode, `device_id=None`) and the GPU (nvJPEG through
the "mixed" decoder, then GPU operators); only the device strings differ, so the CPU tests run
the same graph a GPU job runs.

Every pipeline also carries a substitution switch in front of the decoder: an external source
says, per sample, "decode a small blank JPEG instead". It is off in normal running. When a
corrupt image stops the pipeline, the loader rebuilds it from the checkpoint taken before the
failing batch with the switch on, which reveals the batch's samples without decoding them, and
then with the switch on only for the bad ones, which skips them and leaves every other sample
and random draw as it was (see dali.py). Checkpoints only restore into the very same
graph, so the switch must always be there.
"""

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .transforms import TEN_VIEWS


def blank_jpeg(size: int) -> np.ndarray:
    """The stand-in for a skipped image; as large as the crop, which must fit inside it."""
    out = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(out, format="JPEG")
    return np.frombuffer(out.getvalue(), np.uint8)


@dataclass
class PipelineSpec:
    """Everything that shapes one pipeline (dali.py fills it from the plan, the augmentation and
    the loader settings); `mode` is train, val or test (ten views)."""

    tars: list  # the tars this rank reads in the pass, in the plan's order
    indexes: list  # for each, an index of just this rank's samples of it
    images: tuple  # the extensions an image member may have (members.SampleFormat.images)
    label: str  # the label member's extension (cls, txt, json), read as raw bytes
    mode: str
    batch_size: int
    crop: int
    seed: int
    device: str  # cpu | gpu
    device_id: int | None  # CUDA device for device=gpu
    threads: int
    prefetch: int
    shuffle_buffer: int
    augment: str  # paper | modern
    flip: bool
    val_resize: int | None
    colour_noise: float  # the paper's 0.1; 0 is off
    layout: str  # CHW | HWC (channels-last once batched)
    pca_std: tuple  # the colour axes' std devs and the axes (columns, flattened)
    pca_vectors: tuple
    min_area: float  # modern mode's random-resized-crop range
    windows: bool  # training also outputs each crop's [left, top, mirrored]


class Substitute:
    """External source for the substitution switch: {iteration: per-sample bools}; `everything`
    turns it on for every sample (the probe)."""

    def __init__(self, batch_size: int, masks: dict | None = None, everything: bool = False):
        self.batch_size, self.masks, self.everything = batch_size, masks or {}, everything

    def __call__(self, info):
        mask = self.masks.get(info.iteration)
        if mask is None:
            mask = np.full(self.batch_size, self.everything)
        return [np.array(bool(m)) for m in mask]


def build_pipeline(spec: PipelineSpec, substitute: Substitute, checkpoint: bytes | None = None):
    """A built pipeline returning uint8 images, the label members' raw bytes (parsed in Python by
    members.parse_label, as the webdataset loader parses them), source info, substituted flags
    and, in training, each image's colour shift."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    gpu = spec.device == "gpu"
    decoder = "mixed" if gpu else "cpu"
    train = spec.mode == "train"

    @pipeline_def(
        batch_size=spec.batch_size,
        num_threads=spec.threads,
        prefetch_queue_depth=spec.prefetch,
        device_id=spec.device_id if gpu else None,
        seed=spec.seed,
        enable_checkpointing=True,
        enable_conditionals=True,
    )
    def pipeline():
        jpg, cls = fn.readers.webdataset(
            paths=spec.tars,
            index_paths=spec.indexes,
            # one output for every image extension: each index line lists just the sample's one image
            ext=[";".join(spec.images), spec.label],
            name="Reader",
            random_shuffle=train,
            initial_fill=max(1, spec.shuffle_buffer),
            pad_last_batch=not train,
            missing_component_behavior="error",
        )
        info = fn.get_property(jpg, key="source_info")
        swap = fn.external_source(source=substitute, batch=True, batch_info=True)
        blank = fn.permute_batch(
            types.Constant(blank_jpeg(max(spec.crop, spec.val_resize or 0))), indices=[0] * spec.batch_size
        )
        if swap:
            encoded = blank
        else:
            # Reading the header first makes bytes that are no image fail here, cleanly: DALI
            # 2.4's CPU decoder, given them, crashed the process now and then instead.
            if fn.peek_image_shape(jpg)[0] > 0:
                encoded = jpg
            else:  # not reached: the peek raises on anything it cannot read
                encoded = blank
        # uint8 out, a quarter of float32's bytes to copy; the data module normalises on the
        # training device, for both loaders alike.
        layout = dict(dtype=types.UINT8, output_layout=spec.layout)
        if train:
            mirror = fn.random.coin_flip(probability=0.5) if spec.flip else 0
            window = None
            if spec.augment == "paper":
                # A random crop x crop window of the stored (256x256) image, offsets 0..32 on
                # each axis for 224 (section 4.1), drawn as whole pixels, each equally likely
                # (DALI rounds the drawn position to the nearest), so the data module can cut
                # the mean image at the very same place; only that window is decoded.
                height, width = (fn.peek_image_shape(encoded)[i] for i in (0, 1))
                x, y = (
                    fn.cast(fn.random.uniform(range=(0.0, 1.0)) * (free + 0.9998) - 0.4999, dtype=types.INT32)
                    for free in (width - spec.crop, height - spec.crop)
                )
                images = fn.decoders.image_crop(
                    encoded,
                    device=decoder,
                    output_type=types.RGB,
                    crop=(spec.crop, spec.crop),
                    crop_pos_x=x / dmath.max(width - spec.crop, 1),
                    crop_pos_y=y / dmath.max(height - spec.crop, 1),
                )
                if spec.windows:
                    window = fn.stack(x, y, fn.cast(mirror, dtype=types.INT32) if spec.flip else x * 0)
            else:
                images = fn.decoders.image_random_crop(
                    encoded,
                    device=decoder,
                    output_type=types.RGB,
                    random_area=[spec.min_area, 1.0],
                    random_aspect_ratio=[3 / 4, 4 / 3],
                    num_attempts=10,
                )
                images = fn.resize(images, size=[spec.crop, spec.crop])
            images = fn.crop_mirror_normalize(images, mirror=mirror, **layout)
            # The colour shift 0.1 * V (z * s) of section 4.1, one per image (z ~ N(0, I3)), added
            # to every pixel when the batch is normalised.
            z = fn.random.normal(shape=[3]) * types.Constant(np.array(spec.pca_std, np.float32) * spec.colour_noise)
            shift = fn.reshape(fn.coord_transform(fn.reshape(z, shape=[1, 3]), M=list(spec.pca_vectors)), shape=[3])
            return (images, cls, info, swap, shift) + ((window,) if window is not None else ())
        images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
        if spec.val_resize:
            images = fn.resize(images, resize_shorter=spec.val_resize)
        window = dict(crop=(spec.crop, spec.crop), **layout)
        if spec.mode == "val":
            images = fn.crop_mirror_normalize(images, crop_pos_x=0.5, crop_pos_y=0.5, **window)
        else:
            views = [
                fn.crop_mirror_normalize(images, crop_pos_x=x, crop_pos_y=y, mirror=m, **window)
                for m in (0, 1)
                for x, y in TEN_VIEWS
            ]
            images = fn.stack(*views)
        return images, cls, info, swap

    pipe = pipeline(checkpoint=checkpoint) if checkpoint is not None else pipeline()
    pipe.build()
    return pipe
