"""The fast random-resized crop (data/resized_crop.py) against the reference path: the same
region of the full-scale decode, resized by PIL's antialiased bilinear filter."""

import io
import random

import numpy as np
import pytest
from PIL import Image

from alexnet_dist.data.images import shown_rgb
from alexnet_dist.data.resized_crop import edges, reduction, resized_crop
from alexnet_dist.data.transforms import Draws, crop_box

SIZE = 64


def photo(w: int, h: int, seed: int) -> np.ndarray:
    """A picture with what photos have and flat test images lack: gradients, fine texture, hard
    edges and grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    channels = [128 + 60 * np.sin(2 * np.pi * (x * rng.uniform(2, 9) + y * rng.uniform(2, 9))) for _ in range(3)]
    picture = np.stack(channels, -1) + 40 * np.sin(2 * np.pi * 40 * x)[..., None] * (y < 0.5)[..., None]
    for _ in range(12):  # blocks with hard edges
        x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
        picture[y0 : y0 + rng.integers(8, h // 3), x0 : x0 + rng.integers(8, w // 3)] = rng.uniform(0, 255, 3)
    picture += rng.normal(0, 6, picture.shape)
    return np.clip(picture, 0, 255).astype(np.uint8)


def jpeg(picture: np.ndarray, quality: int = 90, **save) -> bytes:
    out = io.BytesIO()
    Image.fromarray(picture).save(out, format="JPEG", quality=quality, **save)
    return out.getvalue()


def reference(data: bytes, box, decoded_sides) -> np.ndarray:
    """The same region (edges as the fast path rounds them) of the full-scale decode, PIL's resize."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    x0, y0, x1, y1 = edges(box, image.size, decoded_sides)
    sx, sy = decoded_sides[0] / image.size[0], decoded_sides[1] / image.size[1]
    return np.asarray(image.resize((SIZE, SIZE), Image.BILINEAR, box=(x0 / sx, y0 / sy, x1 / sx, y1 / sy)))


def drawn_with(seed: int):
    """The draws of a random-resized region on a w x h picture, unmirrored."""
    rng = random.Random(seed)
    return lambda w, h: Draws(crop_box(w, h, rng), False, (0.0, 0.0, 0.0))


def crops(data: bytes, seeds) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(fast crop HWC, reference, DCT reduction used) for each seed's random-resized region."""
    w, h = Image.open(io.BytesIO(data)).size
    out = []
    for seed in seeds:
        view, draws = resized_crop(data, SIZE, drawn_with(seed))
        scale = reduction(draws.box[2:], SIZE)
        ref = reference(data, draws.box, (-(-w // scale), -(-h // scale)))
        assert view.shape == (3, SIZE, SIZE) and view.dtype.is_floating_point is False
        out.append((view.permute(1, 2, 0).numpy().astype(int), ref.astype(int), scale))
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255**2 / max(np.mean((a - b) ** 2.0), 1e-9))


def test_the_largest_dct_reduction_that_keeps_the_crop_size_is_used():
    assert [
        reduction(r, 224) for r in [(224, 224), (447, 900), (448, 460), (900, 1000), (1792, 1800), (4000, 3000)]
    ] == [
        1,
        1,
        2,
        4,
        8,
        8,
    ]
    assert reduction((10, 30), 224) == 1  # a region smaller than the crop is enlarged from full scale


def same_picture(fast: np.ndarray, ref: np.ndarray) -> bool:
    """Inside a 2-pixel frame within 1 level (torch's and PIL's fixed-point rounding of the same
    bilinear filter); on the frame PIL's filter also reads the pixels beyond the region's edge and
    torch's, given the region alone, does not, so there only the mean is bounded."""
    return np.abs(fast - ref)[2:-2, 2:-2].max() <= 1 and np.abs(fast - ref).mean() < 1.0


def test_at_full_scale_the_fast_crop_is_the_reference_crop():
    """Regions under twice the crop (here every one: the picture is small) are decoded at full
    scale, where the fast path and the reference use the same filter on the same pixels."""
    data = jpeg(photo(120, 100, 0))
    got = crops(data, range(40))
    assert {scale for *_, scale in got} == {1}
    for fast, ref, _ in got:
        assert same_picture(fast, ref)


def test_a_reduced_decode_stays_within_the_tolerance_of_the_full_scale_path():
    """Large regions are decoded at 1/2, 1/4 or 1/8 scale: libjpeg's DCT scaling does that part of
    the reduction instead of the bilinear filter. The tolerance, per crop: a mean difference under
    3 levels and a PSNR over 30 dB (measured here: at most 2.2 and at least 37 dB, at 1/8); what
    remains is the two low-pass filters' different shapes at hard edges."""
    data = jpeg(photo(1000, 760, 1))
    got = crops(data, range(30))
    assert {2, 4, 8} <= {scale for *_, scale in got}
    for fast, ref, scale in got:
        assert np.abs(fast - ref).mean() < 3.0 and psnr(fast, ref) > 30, scale


@pytest.mark.parametrize(
    "case",
    ["grey", "cmyk", "turned", "png", "progressive", "extraneous bytes"],
)
def test_pictures_the_fast_decoder_does_not_take_go_through_pil_with_the_same_result(case):
    """Grey, CMYK, EXIF-turned and non-JPEG pictures take PIL's decoder; a JPEG with a damage that
    libjpeg-turbo only warns of (bytes before a marker) is decoded by PIL, as the rest of the
    project reads it, instead of dropped."""
    picture = photo(150, 110, 2)
    if case == "grey":
        data = jpeg(picture[..., 0])
    elif case == "cmyk":
        out = io.BytesIO()
        Image.fromarray(picture).convert("CMYK").save(out, format="JPEG", quality=95)
        data = out.getvalue()
    elif case == "turned":
        exif = Image.Exif()
        exif[0x0112] = 6
        data = jpeg(picture, exif=exif.tobytes())
    elif case == "png":
        out = io.BytesIO()
        Image.fromarray(picture).save(out, format="PNG")
        data = out.getvalue()
    elif case == "progressive":
        data = jpeg(picture, progressive=True)
    else:
        plain = jpeg(picture)
        data = plain[:-2] + b"\x00\x00\x00" + plain[-2:]  # libjpeg: "extraneous bytes before marker 0xd9"
    full = np.asarray(shown_rgb(Image.open(io.BytesIO(data))))
    for seed in range(10):
        view, draws = resized_crop(data, SIZE, drawn_with(seed))
        left, top, cw, ch = draws.box
        assert left + cw <= full.shape[1] and top + ch <= full.shape[0], case  # drawn on the sides as shown
        ref = Image.fromarray(full).resize((SIZE, SIZE), Image.BILINEAR, box=(left, top, left + cw, top + ch))
        assert same_picture(view.permute(1, 2, 0).numpy().astype(int), np.asarray(ref, int)), case
