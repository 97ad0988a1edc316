"""The DALI pipeline definition: encoded images in, uint8 crops out.

Python hands the pipeline each batch through an external source (dali.py reads the samples of the
plan's batches and makes their random draws, as the webdataset loader does), so what DALI does to
an image is a function of its bytes and those draws alone: no reader, no random operator, no state
to save or replay. One definition serves the CPU (DALI's CPU mode, `device_id=None`) and the GPU
(nvJPEG through the "mixed" decoder, then GPU operators); only the device strings differ, so the
CPU tests run the same graph a GPU job runs.
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

    mode: str
    batch_size: int  # the most a batch holds (an evaluation pass's last one holds fewer)
    crop: int
    device: str  # cpu | gpu
    device_id: int | None  # CUDA device for device=gpu
    threads: int
    prefetch: int
    augment: str  # paper | modern
    val_resize: int | None
    layout: str  # CHW | HWC (channels-last once batched)

    @property
    def regions_out(self) -> bool:
        """Training crops of the random-resized crop on a CPU: DALI's CPU resize is the slowest
        step there (docs/performance.md), so the pipeline hands out the decoded regions as they
        are, each its own size, and dali.py resizes and mirrors them with torch's SIMD filter."""
        return self.mode == "train" and self.augment != "paper" and self.device == "cpu"


def build_pipeline(spec: PipelineSpec, source):
    """A built pipeline returning uint8 images. `source(info)` gives batch `info.iteration` of the
    pass: in training (encoded images, regions' [left, top], regions' [width, height], mirrors), in
    evaluation (encoded images,), each a list of numpy arrays, one per sample."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = spec.device == "gpu"
    decoder = "mixed" if gpu else "cpu"
    train = spec.mode == "train"

    @pipeline_def(
        batch_size=spec.batch_size,
        num_threads=spec.threads,
        prefetch_queue_depth=spec.prefetch,
        device_id=spec.device_id if gpu else None,
    )
    def pipeline():
        # uint8 out, a quarter of float32's bytes to copy; the data module normalises on the
        # training device, for both loaders alike.
        layout = dict(dtype=types.UINT8, output_layout=spec.layout)
        if train:
            encoded, anchor, shape, mirror = fn.external_source(
                source=source, num_outputs=4, batch=True, batch_info=True, dtype=[types.UINT8] + [types.INT32] * 3
            )
            # Only the drawn region is decoded: the paper's crop x crop window (section 4.1), or
            # modern mode's random-resized region, then resized to the crop.
            images = fn.decoders.image_slice(
                encoded,
                anchor,
                shape,
                device=decoder,
                output_type=types.RGB,
                normalized_anchor=False,
                normalized_shape=False,
            )
            if spec.regions_out:
                return images
            if spec.augment != "paper":
                images = fn.resize(images, size=[spec.crop, spec.crop])
            return fn.crop_mirror_normalize(images, mirror=mirror, **layout)
        encoded = fn.external_source(
            source=lambda info: source(info)[0], batch=True, batch_info=True, dtype=types.UINT8
        )
        images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
        if spec.val_resize:
            images = fn.resize(images, resize_shorter=spec.val_resize)
        window = dict(crop=(spec.crop, spec.crop), **layout)
        if spec.mode == "val":
            return fn.crop_mirror_normalize(images, crop_pos_x=0.5, crop_pos_y=0.5, **window)
        views = [
            fn.crop_mirror_normalize(images, crop_pos_x=x, crop_pos_y=y, mirror=m, **window)
            for m in (0, 1)
            for x, y in TEN_VIEWS
        ]
        return fn.stack(*views)

    pipe = pipeline()
    pipe.build()
    return pipe
