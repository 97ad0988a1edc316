"""Source images as the 8-bit pictures shards store: every mode PIL opens becomes RGB or grey of
the right values, upright, resized and cropped as asked, then JPEG bytes."""

import io
import re

import numpy as np
from PIL import Image

from ..errors import DataError
from .sources import Sample
from .transforms import center_crop as crop_center
from .transforms import resize_short

# The rules of to_8bit and encode. Part of every shard's plan digest: bump it when they change,
# so that a re-run rewrites shards made by the older rules instead of keeping them.
STORAGE_RULES = 2
_WHITE = (255, 255, 255, 255)


def _to_bytes(a: np.ndarray, mode: str) -> np.ndarray:
    """8-bit samples from 16-bit or float ones. Integer modes ('I;16*', and 'I', which is how
    PIL opens 16-bit PGM and older PILs 16-bit PNG) are 16-bit: divided by 257 so that 65535 is
    255 (PIL's own convert clips them: an all-white picture). Floats ('F') carry no depth, so
    their range decides: within 0..1 (the float convention) times 255, within 0..255 as they
    are, within 0..65535 divided by 257. Anything else has no known scale and is refused."""
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"mode {mode} holds NaN or infinite values")
    lo, hi = a.min(), a.max()
    if mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255
    elif mode == "F" and lo >= 0 and hi <= 255:
        pass
    elif lo >= 0 and hi <= 65535:
        a = a / 257
    else:
        raise ValueError(f"mode {mode} values {lo:g}..{hi:g} have no known scale (0..65535 expected)")
    return np.round(a).astype(np.uint8)


def to_8bit(image: Image.Image) -> Image.Image:
    """Any image as 8-bit RGB, or L when it is grey ('1', 'L', 'LA', 16-bit and float grey).
    Transparency (RGBA, LA, PA, a palette's or an RGB's transparent colour) is composited onto
    white, as a viewer shows it: the colour under a fully transparent pixel is arbitrary, so
    dropping alpha would store whatever the encoder left there. Palette, CMYK (PIL's plain
    inverse), YCbCr, LAB and HSV go through PIL's conversion. PIL already opens a 16-bit
    RGB(A) PNG as 8-bit, keeping each sample's high byte."""
    mode = image.mode
    if mode == "F" or mode == "I" or mode.startswith("I;16"):
        return Image.fromarray(_to_bytes(np.asarray(image), mode), "L")
    grey = mode in ("1", "L", "LA")
    if image.has_transparency_data:
        flat = Image.alpha_composite(Image.new("RGBA", image.size, _WHITE), image.convert("RGBA")).convert("RGB")
        return flat.convert("L") if grey else flat
    if mode in ("RGB", "L"):
        return image
    return image.convert("L" if grey else "RGB")


def to_storage(image: Image.Image, resize: int | None, center_crop: bool) -> Image.Image:
    """RGB (or L for grey sources), short side resized to `resize`, optionally centre-cropped
    square: the paper's storage format is short side 256 then the central 256x256 (section 2)."""
    image = to_8bit(image)
    if resize:
        image = resize_short(image, resize, Image.BICUBIC)  # bicubic: stored once, read many times
        if center_crop:
            image = crop_center(image, resize)
    return image


# How to turn a picture stored with EXIF orientation n (2-8) upright, as a viewer shows it.
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def orientation(image: Image.Image) -> int:
    """The EXIF orientation every reader of this project applies (alexnet-prepare, both loaders,
    evaluation, prediction): the tag of the image's own EXIF block (a JPEG's APP1, a PNG's eXIf
    chunk), as DALI's decoder reads it. 1 (as stored) where there is none, where the value is not
    2-8, or where the block cannot be parsed: DALI shows those as stored. PIL's getexif also reads an
    orientation from XMP or a PNG text chunk, which DALI does not: they are not used, so that both
    loaders see one picture."""
    raw = image.info.get("exif")
    if not raw:
        return 1
    try:
        tags = Image.Exif()
        tags.load(raw)
        value = tags.get(0x0112, 1)  # the EXIF orientation tag
    except Exception:
        return 1
    return value if value in UPRIGHT else 1


def upright(image: Image.Image, turn: int | None = None) -> Image.Image:
    """The picture as shown, its orientation (`turn`, else read from `image`) applied."""
    turn = orientation(image) if turn is None else turn
    return image.transpose(UPRIGHT[turn]) if turn in UPRIGHT else image


def shown_rgb(image: Image.Image) -> Image.Image:
    """The RGB picture both loaders decode from an opened image: upright, then grey, palette,
    CMYK and alpha (dropped) as PIL converts them, which is what DALI's decoder gives."""
    turn = orientation(image)  # before convert: loading may add a PNG's late eXIf, which the header reads miss
    return upright(image.convert("RGB"), turn)


def shown_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the picture as shown, from its header alone: 5-8 swap the sides."""
    w, h = image.size
    return (h, w) if orientation(image) >= 5 else (w, h)


def encode(sample: Sample, resize: int | None, center_crop: bool, quality: int) -> tuple[bytes, Image.Image]:
    """A source sample as the bytes its shard stores, and the picture they hold; a sample that
    cannot be stored is a DataError naming it and saying it is skipped."""
    item = sample.load()
    try:
        return stored_copy(item, sample.origin or sample.key, resize, center_crop, quality)
    except DataError as exc:
        raise DataError(f"{exc}; skipped") from None


def stored_copy(
    item: Image.Image | bytes, where: str, resize: int | None, center_crop: bool, quality: int
) -> tuple[bytes, Image.Image]:
    """The JPEG bytes alexnet-prepare stores for `item` (a decoded image, or a file's bytes) and
    the picture they hold, before decoding. A file that is already a plain upright JPEG is kept
    byte for byte when no resize is asked; everything else is made upright, converted (to_storage)
    and encoded at `quality`. What cannot be stored is a DataError "`where`: why", which the
    caller finishes with what to do about it."""
    if isinstance(item, bytes):
        try:
            image = Image.open(io.BytesIO(item))
            image.load()
        except Exception as exc:
            # PIL names the stream it read ("<_io.BytesIO object at 0x...>"), which says nothing here
            reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))
            raise DataError(f"{where}: cannot decode image ({reason})") from None
        turn = orientation(image)
        if image.format == "JPEG" and image.mode in ("RGB", "L") and turn == 1 and not resize:
            return item, image  # already a JPEG we can decode as-is: keep the original bytes
    else:
        image, turn = item, 1
    try:
        image = upright(image, turn)  # stored upright, without the tag
        image = to_storage(image, resize, center_crop)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=quality)
    except (OSError, ValueError) as exc:  # no known scale, no conversion, too large for a JPEG
        raise DataError(f"{where}: cannot store it as an 8-bit JPEG ({exc})") from None
    return out.getvalue(), image
