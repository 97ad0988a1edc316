"""A user's own photo, read the way validation reads a stored image, for predicting from files.

alexnet-prepare stores each image once (upright, 8-bit, its short side resized and the centre
cropped as asked, as a JPEG of its quality; a plain upright JPEG is kept byte for byte when no
resize is asked), and validation decodes that copy, resizes its short side to data.val_resize and
cuts the centre crop or the ten views. `read_photo` takes an original file through the very same
functions, the JPEG round trip included, so a validation image read from its original file has
exactly the pixels the webdataset loader gives its stored copy, and gets the same prediction.
`Geometry` is what that takes, as plain values for a checkpoint or an export's preprocess.json.
"""

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..config import Data, check_views
from ..errors import DataError
from .images import shown_rgb, stored_copy
from .manifest import Manifest, is_count, is_storage
from .members import DECODED_ALIKE, image_problem
from .sources import IMAGE_SUFFIXES
from .transforms import center_crop, ten_views
from .wds import decode_image, to_tensor

# What to do about a file that cannot be read as an image, after the reason.
_FIX = f"give an image file alexnet-prepare reads ({', '.join(sorted(IMAGE_SUFFIXES))})"


@dataclass(frozen=True)
class Geometry:
    """How a model's images were stored and how evaluation reads them.

    resize, center_crop, quality: alexnet-prepare's --resize (the stored short side; None: each
    image kept at its own size), --center-crop and --quality. quality None means the storage is
    not known (a manifest written before alexnet-prepare recorded it, or other tools' tars
    indexed where they lie): a photo is then read as both loaders read such tars (upright, alpha
    dropped; one they could not read as preparation would store it), not resized or re-encoded;
    resize is then None and center_crop False.
    crop, val_resize: data.crop and data.val_resize (None: the crop is cut without a resize)."""

    resize: int | None
    center_crop: bool
    quality: int | None
    crop: int
    val_resize: int | None

    @classmethod
    def of(cls, manifest: Manifest, data: Data) -> "Geometry":
        """The geometry of a model trained on `manifest`'s shards with the data settings `data`."""
        storage = manifest.storage or {"resize": None, "center_crop": False, "quality": None}
        return cls(storage["resize"], storage["center_crop"], storage["quality"], data.crop, data.val_resize)

    def to_dict(self) -> dict:
        """Plain values (JSON, torch.load(weights_only=True)); from_dict reads them back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values, where: str) -> "Geometry":
        """The geometry `to_dict` gave. `where` names the file it came from (a checkpoint,
        preprocess.json) in the one-line DataError that anything else is."""
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(values, dict) or set(values) != set(names):
            keys = sorted(values) if isinstance(values, dict) else type(values).__name__
            raise DataError(
                f"{where}: the image geometry holds {keys}, not {names}; it is not as alexnet_dist writes it "
                "(made by another version?): use the alexnet_dist that wrote it or train the model again"
            )
        geometry = cls(**values)
        if problem := geometry.problem():
            raise DataError(f"{where}: the image geometry's {problem}; it is not as alexnet_dist writes it")
        return geometry

    def problem(self) -> str | None:
        """What in these values no preparation and evaluation make; None when nothing."""
        if not (is_count(self.crop) and self.crop > 0):
            return f"crop {self.crop!r} is not a positive whole number"
        if self.val_resize is not None and not (is_count(self.val_resize) and self.val_resize > 0):
            return f"val_resize {self.val_resize!r} is neither null nor a positive whole number"
        storage = {"resize": self.resize, "center_crop": self.center_crop, "quality": self.quality}
        unknown = {"resize": None, "center_crop": False, "quality": None}
        if storage != unknown and not is_storage(storage):
            return f"storage {storage} is not alexnet-prepare's --resize, --center-crop and --quality"
        return None


def read_photo(path: str | Path, geometry: Geometry, views: int = 1) -> torch.Tensor:
    """The photo at `path` (any file alexnet-prepare reads: JPEG, PNG with alpha, grey, palette,
    CMYK, 16-bit, EXIF-rotated, ...) as uint8 RGB views of shape (views, 3, crop, crop): with
    views=1 the centre crop, with views=10 the paper's ten (four corners, the centre, then the
    same five mirrored, as the test loader orders them). Each view is what the webdataset loader
    gives for the photo's stored copy, bit for bit: the stored JPEG is made as alexnet-prepare
    makes it (`geometry`'s resize, centre crop and quality) and decoded as the loader decodes it
    (grey becomes three equal channels), then resized to val_resize and cropped. Normalising (the
    model's mean and std) is the caller's.

    DALI (in CPU mode here) decodes and crops the stored copies to these very pixels, but its
    resize is not PIL's: with val_resize set, a model evaluated through DALI sees inputs a few
    grey levels apart from these (tests/test_photos.py).

    Raises DataError, one line naming the file, when it cannot be read or decoded, and
    ConfigError for views other than 1 or 10."""
    check_views(views, "views")
    where = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{where}: cannot read it ({exc.strerror}); check the path") from None
    try:
        if geometry.quality is None:
            # Storage unknown (other tools' tars indexed where they lie): a photo the index would
            # take is read as both loaders read it (upright, alpha dropped); any other as
            # preparation would store it (upright, 8-bit), not re-encoded.
            image = as_indexed(data) or stored_copy(data, where, None, False, 100)[1].convert("RGB")
        else:
            stored = stored_copy(data, where, geometry.resize, geometry.center_crop, geometry.quality)[0]
            image = decode_image(stored, where)
    except DataError as exc:
        raise DataError(f"{exc}; {_FIX}") from None
    if views == 10:
        crops = ten_views(image, geometry.crop, geometry.val_resize)
    else:
        crops = [center_crop(image, geometry.crop, geometry.val_resize)]
    return torch.stack([to_tensor(crop) for crop in crops])


def as_indexed(data: bytes) -> Image.Image | None:
    """The RGB picture both loaders decode from `data` where alexnet-prepare index would take it
    as a sample's image (members.image_problem finds nothing), else None."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in DECODED_ALIKE or image_problem(image, data, image.format.lower()):
            return None
        return shown_rgb(image)
    except Exception:  # what PIL cannot decode is stored_copy's to name
        return None
