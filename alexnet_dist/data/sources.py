"""Where images come from before they become shards.

Each source gives the class names and, per split, a list of samples. A sample is
(key, load, label) where load() returns a PIL image or the encoded bytes of a file; the list
is built without decoding anything so a large folder costs only a directory walk.

Folders are read the same way everywhere (`_scan`): hidden entries ('.ipynb_checkpoints',
'.DS_Store', macOS's '._x.jpg', '.git') are never classes or images and are left out unnamed;
what cannot be an image (a dangling symlink, a symlink loop, a FIFO, a stray text file, a folder
inside a class folder) is left out and named in the source's per-split `skipped` list, which
ends up in manifest.json; symlinks that lead somewhere are followed.
"""

import gzip
import os
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
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
    origin: str = ""  # where it came from (a path, tar:member) for messages; the key when empty


@dataclass
class Source:
    classes: list[str]
    splits: dict[str, list[Sample]]
    # Per split, "path: why; skipped" for each entry left out while listing.
    skipped: dict[str, list[str]] = field(default_factory=dict)
    # What the images' bytes depend on besides their keys (a folder, a seed): part of each
    # shard's plan digest, so a re-run into the same --out from another source rebuilds.
    origin: str = ""


def no_images(where: Path, fix: str) -> DataError:
    """The one-line error of a folder (or tar) where an image was expected and none was found."""
    return DataError(f"{where}: no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); {fix}")


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:  # deleted since the listing, no permission, an I/O error
        raise DataError(f"{path}: cannot read it ({exc.strerror}); skipped") from None


def _scan(folder: Path) -> tuple[list[Path], list[Path], list[str]]:
    """A folder's visible sub-folders and files, sorted, and "path: why; skipped" for each
    entry that is neither (see the module's docstring)."""
    try:
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"{folder}: cannot list it ({exc.strerror}); check the path and its permissions") from None
    dirs, files, odd = [], [], []
    for e in entries:
        path = Path(e.path)
        try:  # is_dir() raises on a symlink loop (ELOOP) and says False for a dangling link
            if e.is_dir():
                dirs.append(path)
                continue
            if e.is_file():
                files.append(path)
                continue
            os.stat(path)  # raises for a link that leads nowhere, and so names why
            why = "not a regular file (a FIFO, socket or device would block or fail a read)"
        except OSError as exc:
            why = f"{'a broken symlink: ' if e.is_symlink() else ''}{exc.strerror}"
        odd.append(f"{path}: {why}; skipped")
    return dirs, files, odd


def _keys(prefix: str, names: list[str]) -> list[str]:
    """prefix/<stem> for each name, or prefix/<name> where two names share a stem (x.jpg and
    x.png in one class are two images)."""
    stems = Counter(Path(n).stem for n in names)
    return [f"{prefix}/{Path(n).stem if stems[Path(n).stem] == 1 else n}" for n in names]


def _root(src: Path, wants: str) -> Path:
    """SRC/train, or a one-line error saying what SRC should be."""
    if src.exists() and not src.is_dir():
        raise DataError(f"{src}: a file, not a folder; --src wants the folder that holds {wants}")
    if not (src / "train").is_dir():
        raise DataError(f"{src}/train: no such folder; {wants}")
    return src / "train"


def imagefolder(src: Path) -> Source:
    """SRC/train/<class>/<image> and SRC/val/<class>/<image>; classes are train's sorted folders."""
    src = Path(src)
    train = _root(src, "imagefolder wants SRC/train/<class>/*.jpg (and SRC/val/<class>/*.jpg)")
    dirs, _, _ = _scan(train)
    if not dirs:
        raise DataError(f"{train}: no class sub-folders; put each class's images in SRC/train/<class>/")
    index = {d.name: i for i, d in enumerate(dirs)}
    skipped = {split: [] for split in ("train", "val") if (src / split).is_dir()}
    splits = {split: imagefolder_split(src / split, index, skipped[split]) for split in skipped}
    found = {s.label for s in splits["train"]}
    for name, label in index.items():
        if label not in found:  # a class the model would be asked to learn from nothing
            raise no_images(train / name, "add this class's images or remove the folder")
    return Source(list(index), splits, skipped, origin=f"imagefolder {src.resolve()}")


def _read_member(tar: Path, offset: int, size: int) -> bytes:
    try:
        with open(tar, "rb") as f:
            f.seek(offset)
            return f.read(size)
    except OSError as exc:
        raise DataError(f"{tar}: cannot read it ({exc.strerror}); skipped") from None


def _class_tar(path: Path, label: int) -> list[Sample]:
    """The images of one per-class tar (ILSVRC2012_img_train.tar holds 1000 of them), located
    once so that each later read is a single seek."""
    import tarfile

    try:
        with tarfile.open(path) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and Path(m.name).suffix.lower() in IMAGE_SUFFIXES]
    except (OSError, tarfile.TarError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "damaged or cut short"
        raise DataError(f"{path}: not a readable tar ({why}); download it again or unpack it into a folder") from None
    keys = _keys(path.stem, [m.name for m in members])
    return [
        Sample(key, partial(_read_member, path, m.offset_data, m.size), label, f"{path}:{m.name}")
        for key, m in zip(keys, members, strict=True)
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
    train = _root(src, "imagenet wants SRC/train/<wnid>/*.JPEG or SRC/train/<wnid>.tar")
    dirs, files, odd = _scan(train)
    folders = {d.name: d for d in dirs}
    tars = {t.stem: t for t in files if t.suffix == ".tar"}
    skipped = {
        "train": odd
        + [f"{f}: neither a class folder nor a per-class tar; skipped" for f in files if f.suffix != ".tar"]
    }
    classes = sorted(set(folders) | set(tars))
    if not classes:
        raise DataError(f"{train}: neither class folders nor per-class tars")
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for wnid in classes:
        if wnid in folders:
            found = class_folder(folders[wnid], index[wnid], skipped["train"])
        else:
            found = _class_tar(tars[wnid], index[wnid])
        if not found:  # a class to learn from nothing: a partial download, most likely
            raise no_images(folders.get(wnid, tars.get(wnid)), "add this class's images or remove it")
        samples += found
    splits = {"train": samples}
    # Not the labels file's path: the labels themselves are in each sample's digest line, and
    # naming the default file explicitly must not rewrite every shard.
    origin = f"imagenet {src.resolve()}"
    val = src / "val"
    val_dirs, val_files, val_odd = _scan(val) if val.is_dir() else ([], [], [])
    if val_dirs:
        skipped["val"] = []
        splits["val"] = imagefolder_split(val, index, skipped["val"])
    elif val.is_dir():
        files = [f for f in val_files if f.suffix.lower() in IMAGE_SUFFIXES]
        skipped["val"] = val_odd + [
            f"{f}: not an image file (by its suffix); skipped" for f in val_files if f not in files
        ]
        if not files:
            raise no_images(val, f"add them or remove {val}")
        labels_file = val_labels or src / "LOC_val_solution.csv"
        if not labels_file.exists():
            raise DataError(
                f"{val} holds flat images but {labels_file} is missing; pass --val-labels FILE (the devkit's "
                "ILSVRC2012_validation_ground_truth.txt, LOC_val_solution.csv, or one synset id per line) "
                "or use per-class val folders"
            )
        labels = _val_labels(labels_file, [f.stem for f in files], index)
        splits["val"] = [
            Sample(key, partial(_read_file, f), labels[f.stem], str(f))
            for key, f in zip(_keys("val", [f.name for f in files]), files, strict=True)
        ]
    return Source(classes, splits, skipped, origin)


def class_folder(folder: Path, label: int, skipped: list[str]) -> list[Sample]:
    """The images of one class folder, keyed <class>/<file stem>; what else it holds is named
    in `skipped`."""
    dirs, files, odd = _scan(folder)
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    skipped += odd
    skipped += [
        f"{d}: a folder inside a class folder (only the class folder's own files are read); skipped" for d in dirs
    ]
    skipped += [
        f"{f}: not an image file (by its suffix); skipped" for f in files if f.suffix.lower() not in IMAGE_SUFFIXES
    ]
    keys = _keys(folder.name, [f.name for f in images])
    return [Sample(key, partial(_read_file, f), label, str(f)) for key, f in zip(keys, images, strict=True)]


def imagefolder_split(root: Path, index: dict, skipped: list[str]) -> list[Sample]:
    """The samples of SRC/<split>/<class>/*; what else SRC/<split> holds is named in `skipped`."""
    dirs, files, odd = _scan(root)
    skipped += odd + [f"{f}: a file beside the class folders; skipped" for f in files]
    samples = []
    for cdir in dirs:
        if cdir.name not in index:
            raise DataError(
                f"{cdir}: class '{cdir.name}' is not among the train classes; "
                "every val class needs a train folder of the same name"
            )
        samples += class_folder(cdir, index[cdir.name], skipped)
    if not samples:
        raise no_images(root, f"put each class's images in {root}/<class>/")
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
    return Source(FASHION_MNIST_CLASSES, splits, origin=f"fashion-mnist {src.resolve()}")


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
    origin = f"synthetic classes={num_classes} size={size} seed={seed}"  # the images depend on all three
    return Source([f"class{c:03d}" for c in range(num_classes)], splits, origin=origin)


def default_fashion_mnist_dir() -> Path | None:
    """The Debian package dataset-fashion-mnist installs the IDX files here."""
    path = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
    return path if path.is_dir() else None
