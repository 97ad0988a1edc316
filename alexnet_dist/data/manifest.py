"""manifest.json, the description of a folder of shards that alexnet-prepare writes beside them:
classes, which members of a sample are its image and label (`images`, `label`: see members.py),
per split the shards (tar, DALI index, sample count) and class counts, the images' size,
how they were stored (`storage`: --resize, --center-crop, --quality; absent from older manifests)
and the train split's channel statistics. `Manifest.read` checks it once; everything that reads
shards takes their locations from here.

A manifest and its shards may lie on a local disk, on S3 or behind HTTP (see store.py): its root
is then a URL, and a shard's tar and index are named relative to it. Shards indexed where they
lie (alexnet-prepare index) are named by their full location instead.
"""

import hashlib
import json
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..credentials import credentials_in, redact
from ..errors import DataError
from . import shard_index, store
from .members import SampleFormat, is_format

MANIFEST = "manifest.json"
# The layout of manifest.json that alexnet-prepare writes (shards.py, index.py). Manifest.read
# brings an older one to it through MANIFEST_UPGRADES and refuses a newer one. To change the
# layout: add the step from the current version to MANIFEST_UPGRADES, then bump this.
MANIFEST_VERSION = 2


def _index_beside_tar(data: dict) -> dict:
    """Version 0, a manifest without a version (written before alexnet-prepare recorded one), may
    name no index file for a shard: its index lies beside its tar."""
    for info in data["splits"].values():
        for shard in info.get("shards", []) if isinstance(info, dict) else ():
            if isinstance(shard, dict) and isinstance(shard.get("tar"), str):
                shard.setdefault("index", shard["tar"].removesuffix(".tar") + ".idx")
    return data


def _jpg_and_cls(data: dict) -> dict:
    """Version 1 read the .jpg member as the image and the .cls member as the label, always."""
    return {**SampleFormat().record(), **data}


# MANIFEST_UPGRADES[n] turns version n into version n + 1.
MANIFEST_UPGRADES = [
    ("v0 -> v1: every shard names its index file", _index_beside_tar),
    ("v1 -> v2: the image and label members are named", _jpg_and_cls),
]
assert len(MANIFEST_UPGRADES) == MANIFEST_VERSION


def upgrade_manifest(data: dict, path: str) -> dict:
    """`data` (a manifest's classes and splits) brought to MANIFEST_VERSION; a newer one stops."""
    version = data.get("version", 0)
    if not is_count(version):
        raise DataError(f"{path}: 'version' is not a whole number; re-run alexnet-prepare")
    if version > MANIFEST_VERSION:
        raise DataError(
            f"{path}: manifest version {version} is newer than this alexnet_dist reads ({MANIFEST_VERSION}); "
            "upgrade alexnet_dist to read it"
        )
    for _, step in MANIFEST_UPGRADES[version:]:
        data = step(data)
    data["version"] = MANIFEST_VERSION
    return data


@dataclass(frozen=True)
class Shard:
    tar: str  # absolute path or URL
    index: str  # its DALI index file
    count: int  # samples it holds
    # alexnet-prepare's own shards hold exactly what their index lists; shards made by another
    # tool may also hold samples the index leaves out (alexnet-prepare index skipped them)
    exact: bool = True
    # (tar, index) as a training started with them (watch.py): a reader that opens either and
    # finds it otherwise stops; None where not watched
    started: tuple | None = None


def check_tar(shard: Shard, manifest=MANIFEST) -> int:
    """The shard's tar exists; else one line naming it and the manifest that lists it. Returns its size."""
    try:
        return store.size(shard.tar)
    except store.Missing:
        raise DataError(f"{shard.tar}: listed in {manifest} but missing; re-run alexnet-prepare") from None


def check_shard(shard: Shard, manifest=MANIFEST) -> None:
    """What a glance shows of a shard, before any loader reads it: its tar is a readable file, and
    its DALI index file exists, counts as many samples as the manifest (its first line says
    "v1.2 <count>") and points at no byte past the tar's end (its last line: a truncated tar).
    Both loaders need the index file (wds seeks through it to a rank's first sample). The tar
    itself is not opened here: a rank opens only the tars of its own slice of an epoch (see
    dali.py), and each loader checks the tar's headers as it starts reading one (tar_header)."""
    size = check_tar(shard, manifest)
    if not store.is_remote(shard.tar):
        if not stat.S_ISREG(os.stat(shard.tar).st_mode):
            raise DataError(f"{shard.tar}: not a file (a directory?); re-create it with alexnet-prepare")
        if not os.access(shard.tar, os.R_OK):
            raise DataError(f"{shard.tar}: not readable (permissions); fix them or re-create it with alexnet-prepare")
    count, last = shard_index.ends(shard)
    if count != shard.count:
        raise DataError(
            f"{shard.tar}: holds {count} samples but {MANIFEST} says {shard.count} (counted by its "
            "index file); re-run alexnet-prepare so shards and manifest agree"
        )
    if shard.count:  # a shard whose every image was skipped lists none
        check_end(shard.tar, shard_index.entry(last, shard.index)[1], size)


def check_end(tar: str, end: int, size: int | None = None) -> None:
    """The tar holds every byte up to `end`, where its index says a sample's data ends: DALI would
    otherwise stop a truncated tar with a message about the index file."""
    size = store.size(tar) if size is None else size
    if end > size:
        raise DataError(
            f"{tar}: {size} bytes but its index lists data up to byte {end}; the tar is "
            "truncated: re-create it with alexnet-prepare"
        )


def tar_header(f, tar: str, at: int) -> tarfile.TarInfo:
    """The member header at byte `at` of the tar open as `f`. Where there is none, one line naming
    the tar: a tar overwritten with zeros or other bytes, an empty or cut file."""
    f.seek(at)
    try:
        return tarfile.TarInfo.frombuf(f.read(tarfile.BLOCKSIZE), "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        if isinstance(exc, tarfile.EOFHeaderError):  # a block of zeros reads as the end of a tar
            why = "zeros"
        elif isinstance(exc, tarfile.EmptyHeaderError | tarfile.TruncatedHeaderError):
            why = "the file ends there"
        else:
            why = str(exc)
        where = "at its start" if at == 0 else f"at byte {at}"
        raise DataError(
            f"{tar}: no tar header {where} ({why}); the tar is damaged: re-create it with alexnet-prepare"
        ) from None


def malformed(data: dict) -> str | None:
    """What in a manifest's classes, splits and shards is not of the type alexnet-prepare writes
    (a hand edit, say), so that a wrong one stops here in one line rather than deep in a loader."""
    if not isinstance(data["classes"], list) or not all(isinstance(c, str) for c in data["classes"]):
        return "'classes' is not a list of names"
    for split, info in data["splits"].items():
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            return f"split '{split}' has no list of shards"
        if not is_count(info.get("count")):
            return f"split '{split}' has no sample count"
        for number, shard in enumerate(info["shards"]):
            if not isinstance(shard, dict) or not isinstance(shard.get("tar"), str) or not is_count(shard.get("count")):
                return f"shard {number} of split '{split}' lacks a tar name or a sample count"
            if not isinstance(shard.get("index"), str):
                return f"shard {number} of split '{split}' names no index file"
            if why := credentials_in(shard["tar"]) or credentials_in(shard["index"]):
                return f"shard {number} of split '{split}' is at {redact(shard['tar'])}: {why}"
    for key, length in (("mean", 3), ("std", 3), ("image_size", 2)):  # what normalisation and crops use
        value = data.get(key)
        if value is not None and not (
            isinstance(value, list) and len(value) == length and all(is_number(v) for v in value)
        ):
            return f"'{key}' is not {length} numbers"
    if data.get("min_side") is not None and not is_count(data["min_side"]):
        return "'min_side' is not a whole number"
    if not is_format(data.get("images"), data.get("label")):
        return "'images' and 'label' are not image extensions and a label spec (see alexnet-prepare index --help)"
    if "storage" in data and not is_storage(data["storage"]):
        return "'storage' is not {resize: null or a side, center_crop: true or false, quality: 1..100}"
    return None


def is_storage(value) -> bool:
    """Whether `value` is the record of how alexnet-prepare stored the images (shards.py)."""
    return (
        isinstance(value, dict)
        and {"resize", "center_crop", "quality"} <= set(value)
        and (value["resize"] is None or (is_count(value["resize"]) and value["resize"] > 0))
        and isinstance(value["center_crop"], bool)
        and (not value["center_crop"] or value["resize"] is not None)
        and is_count(value["quality"])
        and 1 <= value["quality"] <= 100
    )


def text_digest(text: str) -> str:
    """A manifest's digest: equal only for the same text."""
    return hashlib.sha256(text.encode()).hexdigest()


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Manifest:
    root: str  # a local folder (absolute) or a URL
    data: dict  # the file as written (class_counts, skipped, source ...)
    digest: str = ""  # of the text read (watch.py: has it changed since?)

    @classmethod
    def read(cls, root) -> "Manifest":
        root = str(root).rstrip("/") if store.is_remote(root) else str(Path(root).expanduser().resolve())
        path = store.join(root, MANIFEST)
        if not store.is_remote(root) and not os.path.exists(root):
            raise DataError(
                f"data.root={root}: no such directory; make shards with "
                f"`alexnet-prepare SOURCE --out {root}` or point data.root at them"
            )
        if not store.exists(path):
            raise DataError(
                f"{path}: missing; {root} holds no shards made by alexnet-prepare "
                f"(run `alexnet-prepare SOURCE --out DIR` or `alexnet-prepare index ... --out DIR`)"
            )
        try:
            text = store.read_text(path)
            data = json.loads(text)
        except (OSError, UnicodeDecodeError) as exc:  # a directory, no permission, not text
            raise DataError(
                f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc}); re-run alexnet-prepare"
            ) from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc}); re-run alexnet-prepare") from None
        if not isinstance(data, dict) or not isinstance(data.get("splits"), dict) or "classes" not in data:
            raise DataError(f"{path}: not a manifest of alexnet-prepare (no classes or splits); re-run it")
        data = upgrade_manifest(data, path)
        if problem := malformed(data):
            raise DataError(f"{path}: {problem}; not as alexnet-prepare writes it: re-run alexnet-prepare")
        manifest = cls(root, data, text_digest(text))
        manifest.check_tars_once()
        for split, info in data["splits"].items():
            if not info["shards"] or not info["count"]:
                raise DataError(f"{path}: split '{split}' has no samples; re-run alexnet-prepare on a non-empty source")
            shards = manifest.shards(split)
            if sum(s.count for s in shards) != info["count"]:
                raise DataError(
                    f"{path}: split '{split}' counts {info['count']} samples but its shards "
                    f"{sum(s.count for s in shards)}; re-run alexnet-prepare"
                )
        return manifest

    def check_tars_once(self) -> None:
        """Each tar is read by one split, once: a tar listed twice would count its samples twice,
        and a validation tar among the training ones would train on what validation scores. The
        one exception is a split held out of the train tars (index --val-fraction), whose own index
        files list other samples of the same tars."""
        held_out = any(info.get("held_out_from") for info in self.data["splits"].values())
        seen = {}  # tar: the split that lists it
        for split in self.data["splits"]:
            mine = set()
            for shard in self.shards(split):
                other = split if shard.tar in mine else None if held_out else seen.get(shard.tar)
                if other is not None:
                    where = f"twice in split '{split}'" if other == split else f"in split '{other}' and in '{split}'"
                    raise DataError(
                        f"{self.path}: lists {shard.tar} {where}, but a tar belongs to one split, once; re-run "
                        "alexnet-prepare (index refuses such patterns)"
                    )
                mine.add(shard.tar)
                seen[shard.tar] = split

    @property
    def path(self) -> str:
        return store.join(self.root, MANIFEST)

    def file(self, name: str) -> str:
        """A file beside manifest.json (stats.json, mean_image.npy)."""
        return store.join(self.root, name)

    @property
    def classes(self) -> list[str]:
        return self.data["classes"]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def sample_format(self) -> SampleFormat:
        """Which member of a sample is its image (the first of these extensions) and which its label."""
        return SampleFormat(tuple(self.data["images"]), self.data["label"])

    def has(self, split: str) -> bool:
        return split in self.data["splits"]

    def count(self, split: str) -> int:
        return self.data["splits"][split]["count"]

    def shards(self, split: str) -> list[Shard]:
        """The split's shards in the manifest's order, with absolute paths."""
        exact = self.data.get("source") != "index"
        return [
            Shard(
                tar=store.join(self.root, s["tar"]),
                index=store.join(self.root, s["index"]),
                count=s["count"],
                exact=exact,
            )
            for s in self.data["splits"][split]["shards"]
        ]

    def check_share(self, rank: int, world: int) -> None:
        """Every split's shards rank, rank + world, ... pass check_shard. Each rank checks only its
        share, so at start the job as a whole checks every shard once while no rank's work grows
        with the number of shards (a thousand ranks each checking every tar would hammer a shared
        file system's metadata server)."""
        for split in self.data["splits"]:
            for shard in self.shards(split)[rank::world]:
                check_shard(shard, self.path)

    @property
    def storage(self) -> dict | None:
        """How alexnet-prepare stored the images: {resize, center_crop, quality}, its --resize,
        --center-crop and --quality. None where not recorded: manifests written before it was, and
        other tools' tars indexed where they lie (alexnet-prepare index)."""
        return self.data.get("storage")

    def stat(self, key: str):
        """A statistic alexnet-prepare records (mean, std, image_size, min_side); None when absent."""
        return self.data[key] if key in self.data else None

    @property
    def min_side(self) -> int | None:
        """The smallest side of any stored image, when known."""
        size = self.stat("image_size")
        return self.stat("min_side") or (min(size) if size else None)
