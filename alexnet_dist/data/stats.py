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
from .manifest import Manifest

STATS = "stats.json"


def sample_images(manifest: Manifest, count: int):
    """Up to `count` training images, taken evenly from every shard."""
    shards = manifest.shards("train")
    per_shard = max(1, -(-count // len(shards)))
    for shard in shards:
        taken = 0
        with tarfile.open(shard.tar) as tar:
            for member in tar:
                if taken == per_shard:
                    break
                if member.name.endswith(".jpg"):
                    data = tar.extractfile(member).read()
                    try:
                        yield Image.open(io.BytesIO(data)).convert("RGB")
                    except Exception as exc:
                        raise DataError(f"{shard.tar}:{member.name}: cannot decode image ({exc})") from None
                    taken += 1


def compute_stats(root: Path, count: int = 10000, size: int = 256) -> dict:
    manifest = Manifest.read(root)
    root = manifest.root
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
    return stats


def read_stats(root: Path) -> dict | None:
    path = Path(root) / STATS
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); re-run alexnet-prepare stats") from None


def read_mean_image(manifest: Manifest) -> np.ndarray:
    """The mean image (S, S, 3) that `alexnet-prepare stats` saved beside the manifest, checked
    against the shards' image size."""
    path, size = manifest.root / "mean_image.npy", manifest.stat("image_size")
    if not path.exists():
        raise ConfigError(
            f"data.mean_image=true but {path} is missing; run alexnet-prepare stats --out {manifest.root}"
        )
    image = np.load(path)
    if image.shape[:2] != (size[1], size[0]):
        raise ConfigError(
            f"{path}: {tuple(image.shape[:2])} but the shards hold {size} images; re-run alexnet-prepare stats"
        )
    return image
