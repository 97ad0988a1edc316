"""Making and tampering with shards the way the tests need: a data module from keyword settings,
tars written by hand (with DALI index files), manifests edited in place."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import torch
from PIL import Image

from alexnet_dist.config import Data, Loader, make
from alexnet_dist.data.datamodule import ShardDataModule

RAW = dict(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])  # batches come out on the 0-255 scale
WDS = {"name": "wds", "workers": 0}  # the webdataset loader in the test's own process


def data_module(root, loader=None, *, seed=0, rank=0, world=1, epoch=None, done=0, **data) -> ShardDataModule:
    """A ShardDataModule of the shards in `root` with these data settings (the rest defaults), as
    rank `rank` of `world`. `epoch`, if given, is where the training loader starts (with `done`
    batches of it trained on), as a Trainer's global step would say."""
    dm = ShardDataModule(
        make(Data, {"root": str(root), **data}), make(Loader, loader or {}), seed, rank=rank, world=world
    )
    if epoch is not None:
        dm.position = lambda: (epoch, done)
    return dm


def encoded(image: Image.Image, fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar of (member name, bytes), in this order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def reindex(tar: Path) -> None:
    """Rewrites the DALI index file beside `tar` with DALI's own tool (installed with DALI)."""
    tool = Path(sys.executable).parent / "wds2idx"
    subprocess.run([str(tool), str(tar), str(tar.with_suffix(".idx"))], check=True, capture_output=True)


def edit_manifest(root: Path, change) -> dict:
    """Applies `change(manifest dict)` to root/manifest.json and writes it back."""
    path = Path(root) / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    return manifest


def replace_shard(root: Path, split: str, number: int, samples: list[tuple[str, bytes | None, bytes | None]]) -> Path:
    """Replaces shard `number` of `split` with (key, jpg bytes or None, cls bytes or None) samples,
    keeping the manifest's counts right (and the DALI index, where DALI is installed)."""
    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text())
    shard = manifest["splits"][split]["shards"][number]
    tar = root / shard["tar"]
    members = [(f"{key}.{ext}", data) for key, jpg, cls in samples for ext, data in (("jpg", jpg), ("cls", cls))]
    write_tar(tar, [(name, data) for name, data in members if data is not None])

    def recount(m):
        m["splits"][split]["count"] += len(samples) - shard["count"]
        m["splits"][split]["shards"][number]["count"] = len(samples)

    edit_manifest(root, recount)
    if (Path(sys.executable).parent / "wds2idx").exists():
        reindex(tar)
    return tar


def same_batch(a, b) -> bool:
    """Whether two loader batches are equal field by field (tensors exactly, the rest by value)."""
    return len(a) == len(b) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y
        for x, y in zip(a, b, strict=True)
    )
