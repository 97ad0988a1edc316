"""manifest.json, the description of a folder of shards that alexnet-prepare writes beside them:
classes, per split the shards (tar, DALI index, sample count) and class counts, the images' size
and the train split's channel statistics. `Manifest.read` checks it once; everything that reads
shards takes their paths from here.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Shard:
    tar: str  # absolute path
    index: str  # its DALI index file
    count: int  # samples it holds


def check_tar(shard: Shard, manifest=MANIFEST) -> None:
    """The shard's tar exists; else one line naming it and the manifest that lists it."""
    if not os.path.exists(shard.tar):
        raise DataError(f"{shard.tar}: listed in {manifest} but missing; re-run alexnet-prepare")


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict  # the file as written (class_counts, skipped, source ...)

    @classmethod
    def read(cls, root) -> "Manifest":
        root = Path(root).expanduser().resolve()
        path = root / MANIFEST
        if not root.exists():
            raise DataError(
                f"data.root={root}: no such directory; make shards with "
                f"`alexnet-prepare SOURCE --out {root}` or point data.root at them"
            )
        if not path.exists():
            raise DataError(
                f"{path}: missing; {root} holds no shards made by alexnet-prepare "
                f"(run `alexnet-prepare SOURCE --out {root}`)"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc}); re-run alexnet-prepare") from None
        if not isinstance(data, dict) or not isinstance(data.get("splits"), dict) or "classes" not in data:
            raise DataError(f"{path}: not a manifest of alexnet-prepare (no classes or splits); re-run it")
        manifest = cls(root, data)
        for split, info in data["splits"].items():
            if not info.get("shards") or not info.get("count"):
                raise DataError(f"{path}: split '{split}' has no samples; re-run alexnet-prepare on a non-empty source")
            shards = manifest.shards(split)
            if sum(s.count for s in shards) != info["count"]:
                raise DataError(
                    f"{path}: split '{split}' counts {info['count']} samples but its shards "
                    f"{sum(s.count for s in shards)}; re-run alexnet-prepare"
                )
        return manifest

    @property
    def path(self) -> Path:
        return self.root / MANIFEST

    @property
    def classes(self) -> list[str]:
        return self.data["classes"]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def has(self, split: str) -> bool:
        return split in self.data["splits"]

    def count(self, split: str) -> int:
        return self.data["splits"][split]["count"]

    def shards(self, split: str) -> list[Shard]:
        """The split's shards in the manifest's order, with absolute paths."""
        return [
            Shard(
                tar=str(self.root / s["tar"]),
                # manifests of early versions did not name the index: it lies beside its tar
                index=str(self.root / s["index"]) if "index" in s else str((self.root / s["tar"]).with_suffix(".idx")),
                count=s["count"],
            )
            for s in self.data["splits"][split]["shards"]
        ]

    def check_share(self, rank: int, world: int) -> None:
        """The tars of every split's shards rank, rank + world, ... exist. Each rank checks only its
        share, so at start the job as a whole checks every shard once while no rank's work grows
        with the number of shards (a thousand ranks each checking every tar would hammer a shared
        file system's metadata server)."""
        for split in self.data["splits"]:
            for shard in self.shards(split)[rank::world]:
                check_tar(shard, self.path)

    def stat(self, key: str):
        """A statistic alexnet-prepare records (mean, std, image_size, min_side); None when absent."""
        return self.data[key] if key in self.data else None

    @property
    def min_side(self) -> int | None:
        """The smallest side of any stored image, when known."""
        size = self.stat("image_size")
        return self.stat("min_side") or (min(size) if size else None)
