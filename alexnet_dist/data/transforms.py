"""The image geometry and constants of the 2012 recipe, shared by the shard writer and both loaders:
where a crop is placed, how the short side is resized, the ten test views, the colour noise's axes.
What one run's augmentation is lives in `Augmentation`. Nothing here reads files or knows a loader.
"""

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

# The colour noise of section 4.1, Krizhevsky's ILSVRC-2012 values on the 0-255 scale
# (cuda-convnet2 make-data/input_meta): standard deviations along the RGB principal axes, and
# the axes as columns.
PCA_STD = np.array([19.7208, 37.0939, 121.7801], np.float32)
PCA_VECTORS = np.array(
    [[0.41796, -0.71258, -0.56351], [-0.81698, -0.02354, -0.57618], [0.39731, 0.70120, -0.59200]], np.float32
)

# The ten test views (section 4.1): four corners and the centre as (x, y) fractions of the free
# space, then the same five mirrored.
TEN_VIEWS = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5)]


@dataclass(frozen=True)
class Augmentation:
    """What a loader does to each image: the training view (paper: a crop x crop window of the
    stored image; modern: a random-resized crop), the flip, the colour noise and its axes, and
    evaluation's resize and views (1 centre crop or 10)."""

    crop: int
    style: str  # paper | modern
    flip: bool
    val_resize: int | None
    colour_noise: float  # the paper's 0.1; 0 is off
    noise_until: int | None  # colour noise off from this epoch on (the 2012 run: 67)
    pca_std: tuple
    pca_vectors: tuple  # axes as columns
    windows: bool  # training batches also carry each crop's [left, top, mirrored]
    test_views: int
    min_area: float = 0.08  # modern: the random-resized crop's smallest share of the image

    @classmethod
    def of(cls, data, pca: tuple | None = None) -> "Augmentation":
        """The augmentation `data` (config.Data) asks for; the colour noise along `pca` (std devs,
        axes), Krizhevsky's when None."""
        std, vectors = pca if pca is not None else (PCA_STD, PCA_VECTORS)
        return cls(
            crop=data.crop,
            style=str(data.augment),
            flip=data.flip,
            val_resize=data.val_resize,
            colour_noise=data.colour_noise,
            noise_until=data.colour_noise_until_epoch,
            pca_std=tuple(np.asarray(std, np.float32).tolist()),
            pca_vectors=tuple(map(tuple, np.asarray(vectors, np.float32).tolist())),
            windows=data.mean_image,
            test_views=data.test_views,
        )

    def noise_at(self, epoch: int) -> float:
        """The colour noise's strength in `epoch`."""
        return self.colour_noise if self.noise_until is None or epoch < self.noise_until else 0.0


def colour_shift(z, strength: float, std=PCA_STD, vectors=PCA_VECTORS) -> np.ndarray:
    """The RGB shift added to every pixel of one image: strength * V (z * s), z ~ N(0, I3)."""
    return np.asarray(vectors, np.float32) @ (np.asarray(z, np.float32) * np.asarray(std, np.float32) * strength)


def place(fraction: float, free: int) -> int:
    """The whole-pixel start of a crop at `fraction` of the `free` pixels, rounded half up as
    DALI rounds its crop positions, so both loaders cut the same window."""
    return int(fraction * free + 0.5)


def resize_short(image: Image.Image, size: int, resample=Image.BILINEAR) -> Image.Image:
    w, h = image.size
    if min(w, h) == size:
        return image
    scale = size / min(w, h)
    return image.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)


def center_crop(image: Image.Image, size: int, resize: int | None = None) -> Image.Image:
    if resize:
        image = resize_short(image, resize)
    w, h = image.size
    if w < size or h < size:
        image = resize_short(image, size)
        w, h = image.size
    left, top = place(0.5, w - size), place(0.5, h - size)
    return image.crop((left, top, left + size, top + size))


def ten_views(image: Image.Image, size: int, resize: int | None = None) -> list[Image.Image]:
    """The paper's test views (section 4.1): the four corners and the centre, then their mirrors."""
    if resize:
        image = resize_short(image, resize)
    w, h = image.size
    starts = [(place(x, w - size), place(y, h - size)) for x, y in TEN_VIEWS]
    crops = [image.crop((left, top, left + size, top + size)) for left, top in starts]
    return crops + [crop.transpose(Image.FLIP_LEFT_RIGHT) for crop in crops]


@dataclass(frozen=True)
class Draws:
    """One training sample's random choices, drawn before any pixel is decoded so that both
    loaders make the same ones: the region of the image to cut (left, top, width, height; the
    paper's crop x crop window, or modern mode's random-resized region), the mirror, and the
    colour noise's z ~ N(0, I3)."""

    box: tuple[int, int, int, int]
    mirror: bool
    z: tuple[float, float, float]


def draw(augment: Augmentation, rng: random.Random, w: int, h: int) -> Draws:
    """The draws for a w x h image (for the paper's window, the image as enlarged to the crop when
    it is smaller: see cut_window)."""
    if augment.style == "modern":
        box = crop_box(w, h, rng, augment.min_area)
    else:  # section 4.1: a random crop x crop window, every whole-pixel place equally likely
        box = (rng.randint(0, w - augment.crop), rng.randint(0, h - augment.crop), augment.crop, augment.crop)
    mirror = augment.flip and rng.random() < 0.5
    return Draws(box, mirror, (rng.gauss(0, 1), rng.gauss(0, 1), rng.gauss(0, 1)))


def enlarged(image: Image.Image, size: int) -> Image.Image:
    """The image with its short side raised to `size` if it is shorter (the paper's window needs it)."""
    return resize_short(image, size) if min(image.size) < size else image


def cut_window(image: Image.Image, draws: Draws) -> Image.Image:
    """The paper's training view (section 4.1) of an image already `enlarged`: the drawn window, mirrored if drawn."""
    left, top, w, h = draws.box
    image = image.crop((left, top, left + w, top + h))
    return image.transpose(Image.FLIP_LEFT_RIGHT) if draws.mirror else image


def crop_box(w: int, h: int, rng: random.Random, min_area: float = 0.08) -> tuple[int, int, int, int]:
    """(left, top, width, height) of a random region covering min_area..100% of the image with an
    aspect ratio in 3/4..4/3; the whole image, trimmed to that ratio, if ten draws do not fit."""
    for _ in range(10):
        area = w * h * rng.uniform(min_area, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, w - cw), rng.randint(0, h - ch), cw, ch
    cw, ch = min(w, round(h * 4 / 3)), min(h, round(w * 4 / 3))
    return (w - cw) // 2, (h - ch) // 2, cw, ch
