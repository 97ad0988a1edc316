"""Where images come from before they become shards.

Each source gives the class names and, per split, a list of samples. A sample is
(key, load, label) where load() returns a PIL image or the encoded bytes of a file; the list
is built without decoding anything so a large folder costs only a directory walk.
"""
import gzip
import os
import struct
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass
class Sample:
    key: str
    load: Callable[[], "Image.Image | bytes"]
    label: int


@dataclass
class Source:
    classes: list[str]
    splits: dict[str, list[Sample]]


def _read_file(path: Path) -> bytes:
    return path.read_bytes()


def imagefolder(src: Path) -> Source:
    """SRC/train/<class>/<image> and SRC/val/<class>/<image>; classes are train's sorted folders."""
    src = Path(src)
    if not (src / "train").is_dir():
        raise DataError(f"{src}/train: no such folder; imagefolder wants SRC/train/<class>/*.jpg "
                        "(and SRC/val/<class>/*.jpg)")
    classes = sorted(d.name for d in (src / "train").iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{src}/train: no class sub-folders; put each class's images in SRC/train/<class>/")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in ("train", "val"):
        root = src / split
        if not root.is_dir():
            continue
        samples = []
        for cdir in sorted(d for d in root.iterdir() if d.is_dir()):
            if cdir.name not in index:
                raise DataError(f"{cdir}: class '{cdir.name}' is not among the train classes; "
                                "every val class needs a train folder of the same name")
            for f in sorted(cdir.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    key = f"{cdir.name}/{f.stem}"
                    samples.append(Sample(key, partial(_read_file, f), index[cdir.name]))
        if not samples:
            raise DataError(f"{root}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        splits[split] = samples
    return Source(classes, splits)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format), gzipped or not, as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: holds {body.size} bytes, header says {shape}; the file is truncated")
    return body.reshape(shape)


def _gray(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array, mode="L")


def fashion_mnist(src: Path) -> Source:
    src = Path(src)
    splits = {}
    for split, (images_name, labels_name) in FASHION_MNIST_FILES.items():
        paths = [src / images_name, src / labels_name]
        for p in paths:
            if not p.exists() and p.with_suffix("").exists():
                p = p.with_suffix("")
            if not p.exists():
                raise DataError(f"{src / images_name.replace('.gz', '')}[.gz] or its labels file is missing; "
                                f"put the four Fashion-MNIST IDX files ({', '.join(n for pair in FASHION_MNIST_FILES.values() for n in pair)}) in {src}")
        paths = [p if p.exists() else p.with_suffix("") for p in paths]
        images, labels = _read_idx(paths[0]), _read_idx(paths[1])
        if len(images) != len(labels):
            raise DataError(f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels")
        splits[split] = [Sample(f"{split}-{i:06d}", partial(_gray, images[i]), int(labels[i]))
                         for i in range(len(images))]
    return Source(FASHION_MNIST_CLASSES, splits)


def synthetic_image(label: int, num_classes: int, size: int, seed: int) -> Image.Image:
    """A learnable picture: a class colour under an oriented grating whose angle and tint depend
    on the class, with random phase, frequency jitter and pixel noise so no two are equal."""
    rng = np.random.default_rng(seed)
    angle = np.pi * label / num_classes + rng.normal(0, 0.05)
    freq = 2 * np.pi * (3 + (label % 3) + rng.uniform(-0.3, 0.3)) / size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    wave = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 2 * np.pi))
    hue = 2 * np.pi * label / num_classes
    tint = 0.5 + 0.5 * np.cos(hue + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]))
    colour = 120 * (tint - 0.5)  # a class colour that even a linear model can pick up
    img = 128 + colour + 50 * wave[..., None] * tint[None, None, :] + rng.normal(0, 20, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")


def synthetic(num_classes: int = 10, train_count: int = 2000, val_count: int = 500, size: int = 32,
              seed: int = 0) -> Source:
    splits = {}
    for split, count, offset in [("train", train_count, 0), ("val", val_count, 10**7)]:
        splits[split] = [Sample(f"{split}-{i:06d}",
                                partial(synthetic_image, i % num_classes, num_classes, size, seed * 10**8 + offset + i),
                                i % num_classes)
                         for i in range(count)]
    return Source([f"class{c:03d}" for c in range(num_classes)], splits)


def default_fashion_mnist_dir() -> Path | None:
    """The Debian package dataset-fashion-mnist installs the IDX files here."""
    path = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
    return path if path.is_dir() else None
