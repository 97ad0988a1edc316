"""The random-resized crop (data.augment=modern) made fast on a CPU: the webdataset loader's
whole training view (`resized_crop`), and the resize DALI's CPU mode applies to the regions it
decodes (`resized`, called from dali.py).

Timed on 2,000 photos of about 460 px at JPEG quality 90 (docs/performance.md), one image took
1.5 ms to decode with PIL and 1.0 ms to resize its region to 224 with PIL's antialiased
bilinear filter; the webdataset loader's view took 2.0 ms an image on one core, now 1.2 ms:
- an RGB JPEG is decoded by libjpeg-turbo through simplejpeg (about 1.4x PIL's decode of the
  same file: no chunked reads, no 4-byte pixels to repack); anything else still goes through PIL;
- the region is resized by torch's uint8 antialiased bilinear kernel (SIMD; about 3x PIL's
  resize, and the same filter: within 1 level of PIL's output);
- when the region is at least twice the crop, the JPEG is decoded at 1/2, 1/4 or 1/8 scale
  (libjpeg's DCT scaling, a low-pass of its own), so the resize after it always shrinks by
  less than 2x and its antialiasing covers the rest.
The result stays within a stated tolerance of the reference path, a full-scale decode and
PIL's antialiased resize of the same region (tests/test_resized_crop.py).
"""

import io

import numpy as np
import simplejpeg
import torch
from PIL import Image

from .images import orientation, shown_size, upright
from .transforms import Draws

SCALES = (8, 4, 2, 1)  # the reductions libjpeg's DCT scaling offers that keep every 8x8 block whole


def reduction(region: tuple[int, int], size: int) -> int:
    """The largest DCT reduction that leaves the region (width, height) at least `size` px a side."""
    return next(s for s in SCALES if min(region) >= s * size or s == 1)


def turbo_rgb(data: bytes, image: Image.Image, turn: int, scale: int = 1) -> np.ndarray | None:
    """An RGB JPEG shown as stored (no EXIF turn), decoded by libjpeg-turbo at 1/`scale`:
    (H, W, 3) uint8; None for any other picture, and for a damaged one, which PIL decides on (what
    it decodes, both loaders deliver). `image` is PIL's opened (header-only) view of `data`."""
    if image.format != "JPEG" or image.mode != "RGB" or turn != 1:
        return None
    w, h = image.size
    try:
        return simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_factor=scale, min_width=-(-w // scale), min_height=-(-h // scale)
        )
    except ValueError:
        return None


def decoded(data: bytes, image: Image.Image, turn: int, scale: int) -> np.ndarray:
    """The picture as shown, (H, W, 3) uint8, decoded at 1/`scale` where the format allows.
    `image` is PIL's opened (header-only) view of `data`, `turn` its EXIF orientation."""
    pixels = turbo_rgb(data, image, turn, scale)
    if pixels is not None:
        return pixels
    if image.format == "JPEG":
        w, h = image.size
        image.draft("RGB", (w // scale, h // scale))  # sides as stored; PIL's DCT scaling
    return np.array(upright(image.convert("RGB"), turn))  # a writable copy: torch wraps it


def edges(box: tuple[int, int, int, int], shown: tuple[int, int], decoded: tuple[int, int]) -> tuple[int, ...]:
    """(x0, y0, x1, y1): the region `box` (left, top, width, height on the picture's `shown` sides)
    in whole pixels of the picture decoded at `decoded` (width, height) sides; at full scale the
    box itself, at a reduced one its edges rounded to the nearest decoded pixel."""
    left, top, cw, ch = box
    sx, sy = decoded[0] / shown[0], decoded[1] / shown[1]
    x0, y0 = round(left * sx), round(top * sy)
    return (
        x0,
        y0,
        min(decoded[0], max(x0 + 1, round((left + cw) * sx))),
        min(decoded[1], max(y0 + 1, round((top + ch) * sy))),
    )


def cut_and_resize(pixels: np.ndarray, box: tuple[int, int, int, int], shown: tuple[int, int], size: int):
    """The region `box` of `pixels` (the picture as shown, at the scale it was decoded) resized to
    size x size: (3, size, size) uint8, its memory channels-last."""
    x0, y0, x1, y1 = edges(box, shown, (pixels.shape[1], pixels.shape[0]))
    return resized(pixels[y0:y1, x0:x1], size)


def resized(region: np.ndarray, size: int) -> torch.Tensor:
    """A decoded region (H, W, 3) uint8 resized to size x size by torch's antialiased bilinear
    filter (PIL's, in SIMD): (3, size, size) uint8, its memory channels-last. A region already of
    that size comes back as a view of `region`."""
    x = torch.from_numpy(region).permute(2, 0, 1)[None]
    if x.shape[-2:] == (size, size):
        return x[0]
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)[0]


def resized_crop(data: bytes, size: int, draw_on) -> tuple[torch.Tensor, Draws]:
    """(3, size, size) uint8 of the region of `draw_on(width, height)` (transforms.Draws, made on
    the picture as shown: an EXIF orientation of 5-8 swaps its sides), and those draws. They are
    made from the header alone, before any pixel is decoded, so the decoder works at the scale
    the region needs."""
    image = Image.open(io.BytesIO(data))
    turn = orientation(image)
    shown = shown_size(image)
    draws = draw_on(*shown)
    pixels = decoded(data, image, turn, reduction(draws.box[2:], size))
    return cut_and_resize(pixels, draws.box, shown, size), draws
