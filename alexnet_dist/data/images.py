"""Source images as the 8-bit pictures shards store: every mode PIL opens becomes RGB or grey of
the right values, upright, resized and cropped as asked, then JPEG bytes."""

import io
import re

import numpy as np
from PIL import Image, ImageOps

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


def is_upright(image: Image.Image) -> bool:
    """Whether the image needs no EXIF rotation. EXIF that cannot be parsed counts as upright:
    the pixels decoded, and a viewer that cannot read the tag shows them as they are."""
    try:
        return image.getexif().get(0x0112, 1) == 1  # the EXIF orientation tag
    except Exception:
        return True


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
        upright = is_upright(image)
        if image.format == "JPEG" and image.mode in ("RGB", "L") and upright and not resize:
            return item, image  # already a JPEG we can decode as-is: keep the original bytes
    else:
        image, upright = item, True
    try:
        if not upright:  # stored upright, without the tag: decoders differ in whether they apply it
            image = ImageOps.exif_transpose(image)
        image = to_storage(image, resize, center_crop)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=quality)
    except (OSError, ValueError) as exc:  # no known scale, no conversion, too large for a JPEG
        raise DataError(f"{where}: cannot store it as an 8-bit JPEG ({exc})") from None
    return out.getvalue(), image
