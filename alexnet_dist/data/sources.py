"""Where images come from before they become shards.

Each source gives the class names and, per split, a list of samples. A sample is
(key, load, label) where load() returns a PIL image or the encoded bytes of a file; the list
is built without decoding anything so a large folder costs only a directory walk.
"""

import gzip
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
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
        raise DataError(
            f"{src}/train: no such folder; imagefolder wants SRC/train/<class>/*.jpg (and SRC/val/<class>/*.jpg)"
        )
    classes = sorted(d.name for d in (src / "train").iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{src}/train: no class sub-folders; put each class's images in SRC/train/<class>/")
    index = {c: i for i, c in enumerate(classes)}
    splits = {split: imagefolder_split(src / split, index) for split in ("train", "val") if (src / split).is_dir()}
    return Source(classes, splits)


def _read_member(tar: Path, offset: int, size: int) -> bytes:
    with open(tar, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _class_tar(path: Path, label: int) -> list[Sample]:
    """The images of one per-class tar (ILSVRC2012_img_train.tar holds 1000 of them), located
    once so that each later read is a single seek."""
    import tarfile

    with tarfile.open(path) as tar:
        return [
            Sample(f"{path.stem}/{Path(m.name).stem}", partial(_read_member, path, m.offset_data, m.size), label)
            for m in tar.getmembers()
            if m.isfile() and Path(m.name).suffix.lower() in IMAGE_SUFFIXES
        ]


def _val_labels(path: Path, names: list[str], index: dict) -> dict:
    """{image stem: label} from Kaggle's LOC_val_solution.csv (ImageId,PredictionString) or from a
    text file with one synset id per line in the sorted order of the validation images."""
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if lines and lines[0].startswith("ImageId"):
        pairs = [line.split(",", 1) for line in lines[1:]]
        table = {image: prediction.split()[0] for image, prediction in pairs}
    elif lines and lines[0].isdigit():  # the devkit's ILSVRC2012_validation_ground_truth.txt
        synsets = _devkit_synsets(path.parent / "meta.mat")
        if len(lines) != len(names):
            raise DataError(f"{path}: {len(lines)} labels for {len(names)} validation images")
        table = dict(zip(names, (synsets.get(int(line)) for line in lines), strict=True))
    else:
        if len(lines) != len(names):
            raise DataError(
                f"{path}: {len(lines)} labels for {len(names)} validation images; one synset id per "
                "image, in the sorted order of the file names"
            )
        table = dict(zip(names, lines, strict=True))
    labels = {}
    for name in names:
        wnid = table.get(name)
        if wnid not in index:
            raise DataError(
                f"{path}: {'no label' if wnid is None else f'synset {wnid} (not a train class)'} "
                f"for validation image {name}"
            )
        labels[name] = index[wnid]
    return labels


def _devkit_synsets(meta: Path) -> dict:
    """{ILSVRC2012_ID: WNID} from the devkit's data/meta.mat (the ids of the ground-truth file)."""
    if not meta.exists():
        raise DataError(
            f"{meta}: missing; the numeric ground truth needs the devkit's meta.mat beside it "
            "(ILSVRC2012_devkit_t12/data/)"
        )
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(
            f"{meta}: reading it needs scipy: pip install scipy (or the extra alexnet_dist[imagenet])"
        ) from None
    synsets = loadmat(meta, squeeze_me=True)["synsets"]
    return {int(row["ILSVRC2012_ID"]): str(row["WNID"]) for row in synsets}


def imagenet(src: Path, val_labels: Path | None = None) -> Source:
    """ILSVRC-2012 as downloaded: train as SRC/train/<wnid>/*.JPEG or SRC/train/<wnid>.tar; val as
    SRC/val/<wnid>/*.JPEG, or flat SRC/val/*.JPEG with a labels file (`val_labels`, else
    SRC/LOC_val_solution.csv): the devkit's ground truth (with meta.mat beside it), Kaggle's csv,
    or one synset id per line. Classes are the sorted synset ids (the usual label order)."""
    src = Path(src)
    train = src / "train"
    if not train.is_dir():
        raise DataError(f"{train}: no such folder; imagenet wants SRC/train/<wnid>/*.JPEG or SRC/train/<wnid>.tar")
    folders = {d.name: d for d in train.iterdir() if d.is_dir()}
    tars = {t.stem: t for t in train.glob("*.tar")}
    classes = sorted(set(folders) | set(tars))
    if not classes:
        raise DataError(f"{train}: neither class folders nor per-class tars")
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for wnid in classes:
        if wnid in folders:
            samples += class_folder(folders[wnid], index[wnid])
        else:
            samples += _class_tar(tars[wnid], index[wnid])
    splits = {"train": samples}
    val = src / "val"
    if val.is_dir() and any(d.is_dir() for d in val.iterdir()):
        splits["val"] = imagefolder_split(val, index)
    elif val.is_dir():
        files = sorted(f for f in val.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        labels_file = val_labels or src / "LOC_val_solution.csv"
        if not labels_file.exists():
            raise DataError(
                f"{val} holds flat images but {labels_file} is missing; pass --val-labels FILE (the devkit's "
                "ILSVRC2012_validation_ground_truth.txt, LOC_val_solution.csv, or one synset id per line) "
                "or use per-class val folders"
            )
        labels = _val_labels(labels_file, [f.stem for f in files], index)
        splits["val"] = [Sample(f"val/{f.stem}", partial(_read_file, f), labels[f.stem]) for f in files]
    return Source(classes, splits)


def class_folder(folder: Path, label: int) -> list[Sample]:
    """The images of one class folder, keyed <class>/<file stem>."""
    return [
        Sample(f"{folder.name}/{f.stem}", partial(_read_file, f), label)
        for f in sorted(folder.iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]


def imagefolder_split(root: Path, index: dict) -> list[Sample]:
    samples = []
    for cdir in sorted(d for d in root.iterdir() if d.is_dir()):
        if cdir.name not in index:
            raise DataError(
                f"{cdir}: class '{cdir.name}' is not among the train classes; "
                "every val class needs a train folder of the same name"
            )
        samples += class_folder(cdir, index[cdir.name])
    if not samples:
        raise DataError(f"{root}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return samples


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format), gzipped or not, as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
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
                names = ", ".join(n for pair in FASHION_MNIST_FILES.values() for n in pair)
                raise DataError(
                    f"{src / images_name.replace('.gz', '')}[.gz] or its labels file is missing; "
                    f"put the four Fashion-MNIST IDX files ({names}) in {src}"
                )
        paths = [p if p.exists() else p.with_suffix("") for p in paths]
        images, labels = _read_idx(paths[0]), _read_idx(paths[1])
        if len(images) != len(labels):
            raise DataError(f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels")
        splits[split] = [
            Sample(f"{split}-{i:06d}", partial(_gray, images[i]), int(labels[i])) for i in range(len(images))
        ]
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


def synthetic(
    num_classes: int = 10, train_count: int = 2000, val_count: int = 500, size: int = 32, seed: int = 0
) -> Source:
    splits = {}
    for split, count, offset in [("train", train_count, 0), ("val", val_count, 10**7)]:
        splits[split] = [
            Sample(
                f"{split}-{i:06d}",
                partial(synthetic_image, i % num_classes, num_classes, size, seed * 10**8 + offset + i),
                i % num_classes,
            )
            for i in range(count)
        ]
    return Source([f"class{c:03d}" for c in range(num_classes)], splits)


def default_fashion_mnist_dir() -> Path | None:
    """The Debian package dataset-fashion-mnist installs the IDX files here."""
    path = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
    return path if path.is_dir() else None
