"""Statistics of a training split for the 2012 preprocessing: the per-pixel mean image, the
channel means and standard deviations, and the principal axes of RGB colour (section 4.1's
colour noise), from a sample of the shards. Saved beside manifest.json as stats.json and
mean_image.npy / mean_image.png; the loaders use the axes for the colour noise when stats.json
exists, Krizhevsky's own values otherwise."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ConfigError, DataError
from . import shard_index, store
from .images import shown_rgb
from .manifest import Manifest, check_shard, tar_header

STATS = "stats.json"


def sample_images(manifest: Manifest, count: int):
    """Up to `count` training images, taken evenly from every shard: the first ones its index lists."""
    shards = manifest.shards("train")
    per_shard = max(1, -(-count // len(shards)))
    for shard in shards:
        check_shard(shard, manifest.path)
        lines = shard_index.read(shard)[:per_shard]
        with store.open_file(shard.tar) as f:
            for line in lines:
                _, _, key = shard_index.entry(line, shard.index)
                jpg = image_member(line)
                tar_header(f, shard.tar, jpg[0] - tarfile.BLOCKSIZE)  # a member's header, not zeros or other bytes
                data = f.read(jpg[1])
                if len(data) != jpg[1]:
                    raise DataError(
                        f"{shard.tar}: does not hold {key} where its index file says; the tar is damaged: "
                        "re-create it with alexnet-prepare"
                    )
                try:
                    yield shown_rgb(Image.open(io.BytesIO(data)))  # as the loaders see it
                except Exception as exc:
                    raise DataError(f"{shard.tar}:{key}: cannot decode image ({exc})") from None


def image_member(line: str) -> tuple[int, int]:
    """(data offset, size) of the .jpg member of an index file's line."""
    fields = line.split()
    at = fields.index("jpg")
    return int(fields[at + 1]), int(fields[at + 2])


def compute_stats(root: Path | str, count: int = 10000, size: int = 256, staging: Path | None = None) -> dict:
    """The statistics of the shards at `root` (a folder or an s3:// prefix), written beside its
    manifest.json (for s3://, made in `staging` and uploaded: store.Destination)."""
    dest = store.Destination(root, staging, volatile=(STATS,))  # an old stats.json goes first
    dest.check()
    manifest = Manifest.read(root)
    root = dest.folder
    stored = manifest.stat("image_size")
    shape = (stored[1], stored[0]) if stored else (size, size)  # mean image: the stored size, else size x size
    image_sum = np.zeros((*shape, 3))
    pixel_sum, outer_sum, pixels, n = np.zeros(3), np.zeros((3, 3)), 0, 0
    for image in sample_images(manifest, count):
        a = np.asarray(image, dtype=np.float64)
        if a.shape[:2] != shape:
            a = np.asarray(image.resize((shape[1], shape[0]), Image.BILINEAR), dtype=np.float64)
        image_sum += a
        flat = a.reshape(-1, 3)
        pixel_sum += flat.sum(0)
        outer_sum += flat.T @ flat
        pixels += len(flat)
        n += 1
    mean = pixel_sum / pixels
    covariance = outer_sum / pixels - np.outer(mean, mean)
    variances, vectors = np.linalg.eigh(covariance)  # ascending, as Krizhevsky's values are listed
    vectors *= np.where(vectors.sum(0) < 0, -1, 1)  # a sign convention, so reruns agree
    stats = {
        "images": n,
        "channel_mean": mean.round(3).tolist(),
        "channel_std": np.sqrt(np.diag(covariance)).round(3).tolist(),
        "pca_std": np.sqrt(np.maximum(variances, 0)).round(4).tolist(),
        "pca_vectors": vectors.round(5).tolist(),
    }
    mean_image = image_sum / n
    np.save(root / "mean_image.npy", mean_image.astype(np.float32))
    Image.fromarray(mean_image.round().astype(np.uint8)).save(root / "mean_image.png")
    tmp = root / (STATS + ".tmp")
    tmp.write_text(json.dumps(stats, indent=1))
    tmp.replace(root / STATS)
    for name in ("mean_image.npy", "mean_image.png", STATS):  # stats.json last, as it was written
        dest.put(name)
    if report := dest.finish():
        print(report, flush=True)
    return stats


def read_stats(manifest: Manifest) -> dict | None:
    """stats.json as `compute_stats` wrote it, with the colour axes the loaders use checked: three
    standard deviations and a 3 x 3 matrix of finite numbers."""
    path = manifest.file(STATS)
    if not store.exists(path):
        return None
    fix = "re-run alexnet-prepare stats (or delete it to use the paper's colour axes)"
    try:
        stats = json.loads(store.read_text(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc}); {fix}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); {fix}") from None
    if not isinstance(stats, dict):
        raise DataError(f"{path}: not the statistics alexnet-prepare stats writes; {fix}")
    for key, shape in (("pca_std", (3,)), ("pca_vectors", (3, 3))):
        try:
            value = np.asarray(stats[key], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            value = None  # missing, or not numbers
        if value is None or value.shape != shape or not np.isfinite(value).all():
            raise DataError(f"{path}: '{key}' is not {' x '.join(map(str, shape))} finite numbers; {fix}")
    return stats


def read_mean_image(manifest: Manifest) -> np.ndarray:
    """The mean image (S, S, 3) that `alexnet-prepare stats` saved beside the manifest, checked
    against the shards' image size. Loaded without pickle (a .npy can hold pickled objects, which
    would run code), and checked to be what compute_stats writes: float numbers, finite."""
    path, size = manifest.file("mean_image.npy"), manifest.stat("image_size")
    fix = f"re-run alexnet-prepare stats --out {manifest.root}"
    if not store.exists(path):
        raise ConfigError(
            f"data.mean_image=true but {path} is missing; run alexnet-prepare stats --out {manifest.root}"
        )
    try:
        with store.open_file(path) as f:  # closed also when it holds an .npz archive, opened only to be refused
            image = np.load(f, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # truncated, not a .npy, object arrays (pickle)
        raise ConfigError(f"{path}: not a mean image .npy ({str(exc).splitlines()[0]}); {fix}") from None
    if not isinstance(image, np.ndarray) or image.dtype.kind not in "fiu" or image.ndim != 3 or image.shape[2] != 3:
        what = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else "an .npz archive"
        raise ConfigError(f"{path}: {what}, not an S x S x 3 array of numbers; {fix}")
    if image.shape[:2] != (size[1], size[0]):
        raise ConfigError(
            f"{path}: {tuple(image.shape[:2])} but the shards hold {size} images; re-run alexnet-prepare stats"
        )
    if not np.isfinite(image).all():
        raise ConfigError(f"{path}: holds NaN or infinite values; {fix}")
    return image.astype(np.float32)
