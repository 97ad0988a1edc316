"""Which members of a sample are its image and its label, and what a label means: one definition
for alexnet-prepare index, the webdataset loader and the DALI loader, so that the three cannot
read a sample differently.

A sample's image is its first member, in the order of `images`, with one of those extensions
(alexnet-prepare index takes any of IMAGES unless --image names one). Its label is the member the
label spec names:

    cls         the class number as text (webdataset's convention; alexnet-prepare's own shards)
    txt         a class name or a class number, as text
    json:FIELD  a dotted path into a JSON member (a.b.0: key a, key b, item 0), whose value is a
                class number or a class name

A number, whichever member holds it, is a class number; a name is looked up in the class list
(--classes, or the train split's names in sorted order, as the manifest records them).
"""

import json
import re
from dataclasses import dataclass

from ..errors import ConfigError, DataError

IMAGES = ("jpg", "jpeg", "png", "webp")  # what both loaders decode (the index checks each image's content)
LABELS = ("cls", "txt", "json:FIELD")
WHOLE_NUMBER = re.compile(r"-?[0-9]+")


class BadLabel(ValueError):
    """Why a label member holds no usable label; its argument is the reason, for one line."""


@dataclass(frozen=True)
class SampleFormat:
    """The image extensions to look for, in order, and the label spec. The defaults are what
    alexnet-prepare writes and what a manifest without these fields means."""

    images: tuple[str, ...] = ("jpg",)
    label: str = "cls"

    @property
    def label_ext(self) -> str:
        """The extension of the label member: cls, txt or json."""
        return self.label.split(":", 1)[0]

    @property
    def field(self) -> list[str]:
        """The path into a json label, [] for the others."""
        return self.label.split(":", 1)[1].split(".") if ":" in self.label else []

    def image_of(self, exts) -> str | None:
        """The extension of a sample's image among its members' extensions `exts`, or None."""
        return next((ext for ext in self.images if ext in exts), None)

    def describe_images(self) -> str:
        """How a line says what image member is wanted: ".jpg", or ".jpg, .jpeg, .png or .webp"."""
        names = [f".{ext}" for ext in self.images]
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"

    def record(self) -> dict:
        """The manifest's fields for it."""
        return {"images": list(self.images), "label": self.label}


def index_format(image: str | None, label: str | None) -> SampleFormat:
    """What alexnet-prepare index reads, from --image and --label: by default any of IMAGES (the
    first a sample has) and the .cls label. One line (ConfigError) for a value it cannot take."""
    if image is None:
        images = IMAGES
    elif image.lower().lstrip(".") in IMAGES:
        images = (image.lower().lstrip("."),)
    else:
        raise ConfigError(f"--image {image}: not an image type both loaders decode; use one of {', '.join(IMAGES)}")
    return SampleFormat(images, "cls" if label is None else label_spec(label))


def label_spec(text: str) -> str:
    """A label spec, checked: ConfigError naming --label where it is not one of LABELS."""
    kind, colon, field = text.partition(":")
    if (kind in ("cls", "txt") and not colon) or (kind == "json" and colon and all(field.split("."))):
        return text
    if kind == "json":
        raise ConfigError(f"--label {text}: json needs the field holding the label, e.g. json:label or json:meta.class")
    raise ConfigError(f"--label {text}: not a label spec; use cls, txt or json:FIELD")


def is_format(images, label) -> bool:
    """Whether a manifest's `images` and `label` fields are what SampleFormat.record writes."""
    if not (isinstance(images, list) and images and all(isinstance(e, str) and e in IMAGES for e in images)):
        return False
    try:
        return isinstance(label, str) and label_spec(label) == label
    except ConfigError:
        return False


def label_value(fmt: SampleFormat, data: bytes) -> int | str:
    """The label that a label member's bytes hold: a class number (int) or a class name (str).
    BadLabel saying why there is none."""
    ext = fmt.label_ext
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise BadLabel(f"the .{ext} label {data[:20]!r} is not UTF-8 text") from None
    if ext == "cls":
        if not WHOLE_NUMBER.fullmatch(text.strip()):
            raise BadLabel(f"label {data[:20]!r} is not an integer")
        return as_number(text.strip())
    if ext == "txt":
        return text_label(text.strip(), f"the .txt label {text[:20]!r}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadLabel(f"the .json label is not JSON ({exc.msg} at character {exc.pos})") from None
    for depth, step in enumerate(fmt.field):
        if isinstance(value, dict) and step in value:
            value = value[step]
        elif isinstance(value, list) and step.isdigit() and int(step) < len(value):
            value = value[int(step)]
        else:
            raise BadLabel(f"the .json has no field {'.'.join(fmt.field[: depth + 1])!r}")
    where = f"field {'.'.join(fmt.field)!r} of the .json"
    if isinstance(value, int) and not isinstance(value, bool):
        return as_number(str(value))
    if isinstance(value, str):
        return text_label(value.strip(), f"{where} ({value[:20]!r})")
    raise BadLabel(f"{where} holds {json.dumps(value)[:20]}, neither a class number nor a class name")


def text_label(text: str, what: str) -> int | str:
    """A label given as text: a class number when it is a whole number, else a class name."""
    if not text:
        raise BadLabel(f"{what} is empty")
    if "\n" in text:  # a caption, surely, not a class name
        raise BadLabel(f"{what} spans several lines; a class name is one line")
    return as_number(text) if WHOLE_NUMBER.fullmatch(text) else text


def as_number(text: str) -> int:
    number = int(text)
    if number < 0:
        raise BadLabel(f"label {number} is negative")
    return number


def class_number(value: int | str, classes: list[str] | None, source: str) -> int:
    """The class number of a label value. `classes`: the class names, number i at place i (None:
    any number counts, the train split's labels making the classes); `source` names where the list
    came from, for the reason a name or number is refused (BadLabel)."""
    if isinstance(value, int):
        if classes is not None and value >= len(classes):
            raise BadLabel(f"label {value} is outside the {len(classes)} classes (0..{len(classes) - 1})")
        return value
    if classes is None or value not in classes:
        raise BadLabel(f"label {value[:40]!r} is not one of {source}")
    return classes.index(value)


def parse_label(data: bytes | None, where: str, fmt: SampleFormat, classes: list[str]) -> int:
    """A sample's label member as its class number, in a loader: one line naming the sample where
    there is none (alexnet-prepare index leaves such samples out, so this means the shards changed
    or are not what the manifest says)."""
    if data is None:
        raise DataError(f"{where}: sample has no .{fmt.label_ext} label; re-create the shard with alexnet-prepare")
    try:
        value = label_value(fmt, data)
        n = len(classes)
        if isinstance(value, int) and value >= n:
            raise BadLabel(f"label {value} is outside 0..{n - 1} (the manifest lists {n} classes)")
        return class_number(value, classes, f"the manifest's {n} classes")
    except BadLabel as exc:
        raise DataError(f"{where}: {exc}; fix the shard or the manifest") from None


# The content types both loaders decode alike (images.orientation turned upright, then PIL's
# convert("RGB"); DALI's decoder with output_type RGB: the same pixels for every mode of these,
# grey, palette, alpha and CMYK included, colour profiles ignored by both, as
# tests/test_index_layouts.py and tests/test_foreign_images.py check), whatever the member's
# extension says.
DECODED_ALIKE = ("JPEG", "PNG", "WEBP")


def image_problem(picture, data: bytes, ext: str) -> str | None:
    """Why the loaders would not read the image (a PIL image opened from `data`, header only) the
    same way, or None. What they read differently is refused rather than trained on twice over."""
    if picture.format not in DECODED_ALIKE:
        return f"the .{ext} holds a {picture.format} image; both loaders decode JPEG, PNG and WebP only"
    # 16-bit PNGs: PIL keeps each sample's high byte (or clips grey ones), DALI scales them
    if picture.format == "PNG" and (data[24:25] == b"\x10" or picture.mode.startswith(("I", "F"))):
        return f"the .{ext} is a 16-bit PNG, which the loaders reduce to 8 bits differently; store it as 8-bit"
    # DALI reads WebP's simple format only: the extended one carrying an EXIF chunk does not decode
    if picture.format == "WEBP" and picture.info.get("exif"):
        return f"the .{ext} is a WebP with EXIF metadata, which DALI cannot decode; store it without EXIF, or as JPEG"
    return None
