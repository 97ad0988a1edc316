"""alexnet-prepare index: a manifest and DALI index files for WebDataset tars made by other tools
(webdataset's ShardWriter, img2dataset, another lab's shards), left where they lie: local,
s3:// or http(s)://. Nothing is copied or re-encoded; each tar is read once, front to back.

A sample is a run of members with one key, by webdataset's rule: the key is the member's folder
and its name up to the first dot, the extension the rest (a/b.seg.jpg: key a/b, ext seg.jpg).
Its image is the .jpg member, its label the .cls member (a class number as text); other members
are passed over. A sample that cannot train (no image, a label that is no class, an image PIL
cannot read) stays out of the index and is listed, with why, in the manifest's `skipped`.
"""

import io
import json
import re
import sys
import tarfile
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import DataError
from . import store
from .manifest import MANIFEST, MANIFEST_VERSION
from .shards import (
    DESCRIPTIONS,
    channel_stats,
    forget_dataset,
    index_line,
    size_stats,
    write_atomically,
    write_index,
)

# webdataset's base_plus_ext: a name with no dot after its folder is no part of any sample.
KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
PARTS = ("jpg", "cls")  # what a sample needs, in the order of its index line


def expand_split(split: str, pattern: str) -> list[str]:
    tars = store.expand(pattern)
    if not tars:
        raise DataError(f"--{split} {pattern}: matches no tar")
    return tars


def read_classes(location: str) -> list[str]:
    """The class names of a --classes file, one a line; blank lines are none."""
    try:
        names = [line.strip() for line in store.read_text(location).splitlines() if line.strip()]
    except (FileNotFoundError, store.Missing):
        raise DataError(f"--classes {location}: no such file") from None
    except UnicodeDecodeError:
        raise DataError(f"--classes {location}: not text; give one class name per line") from None
    if not names:
        raise DataError(f"--classes {location}: names no classes; give one class name per line")
    twice = [name for name, n in Counter(names).items() if n > 1]
    if twice:  # two class numbers for one name: surely a mistake in the file
        raise DataError(f"--classes {location}: {twice[0]!r} is listed twice")
    return names


@dataclass
class TarIndex:
    """What one pass over a tar found."""

    tar: str
    num_classes: int | None  # labels must be below it; None: any label from 0 (the train split names the classes)
    decode: int  # images to decode for the channel statistics
    lines: list[str] = field(default_factory=list)  # DALI index lines of the samples kept
    skipped: list[str] = field(default_factory=list)  # "<tar>:<key>: why" of the others
    labels: Counter = field(default_factory=Counter)
    sizes: set = field(default_factory=set)
    sums: np.ndarray = field(default_factory=lambda: np.zeros(3))
    squares: np.ndarray = field(default_factory=lambda: np.zeros(3))
    pixels: int = 0

    @property
    def samples(self) -> int:
        return len(self.lines) + len(self.skipped)

    def add(self, key: str, members: dict) -> None:
        """A sample's members {ext: [(TarInfo, bytes or None)]}: indexed, or skipped with why."""
        problem = self.check(members)
        if problem:
            self.skipped.append(f"{self.tar}:{key}: {problem}")
            return
        parts = [members[ext][0][0] for ext in PARTS]
        self.lines.append(
            index_line([(ext, m.offset_data, m.size, m.name) for ext, m in zip(PARTS, parts, strict=True)])
        )

    def check(self, members: dict) -> str | None:
        """Why the sample cannot be trained on, or None; a usable one's label, size and pixels counted."""
        twice = [ext for ext, found in members.items() if len(found) > 1]
        if twice:  # webdataset refuses a sample with two members of one extension
            return f"two .{twice[0]} members"
        if "jpg" not in members:
            return f"no .jpg image (has {', '.join('.' + ext for ext in members)})"
        if "cls" not in members:
            return "no .cls label"
        (jpg, image), (cls, text) = members["jpg"][0], members["cls"][0]
        spaced = [m.name for m in (jpg, cls) if len(m.name.split()) != 1]
        if spaced:  # the index file's fields are separated by spaces
            return f"member name {spaced[0]!r} has a space, which a DALI index file cannot hold"
        try:
            label = int(text.decode().strip())
        except (UnicodeDecodeError, ValueError):
            return f"label {text[:20]!r} is not an integer"
        if label < 0:
            return f"label {label} is negative"
        if self.num_classes is not None and label >= self.num_classes:
            return f"label {label} is outside the {self.num_classes} classes (0..{self.num_classes - 1})"
        try:
            picture = Image.open(io.BytesIO(image))
            size = picture.size  # the header only: nothing is decoded
        except Exception as exc:
            return f"the .jpg is no image PIL can read ({type(exc).__name__})"
        if self.decode > 0:
            try:
                a = np.asarray(picture.convert("RGB"), dtype=np.float64).reshape(-1, 3)
            except Exception as exc:  # a header that reads, data that does not (a cut file)
                return f"the .jpg cannot be decoded ({exc})"
            self.sums, self.squares = self.sums + a.sum(0), self.squares + (a * a).sum(0)
            self.pixels, self.decode = self.pixels + len(a), self.decode - 1
        self.labels[label] += 1
        self.sizes.add(size)
        return None


def read_tar(tar: str, num_classes: int | None, decode: int, stop: threading.Event) -> TarIndex:
    """One streaming pass over `tar` (mode "r|": a remote tar is fetched once, front to back),
    reading only the .jpg and .cls members' bytes. Given up, part-way, once `stop` is set."""
    found, at = TarIndex(tar, num_classes, decode), 0
    with store.open_file(tar) as f:  # a brace pattern names files whether or not they exist: Missing
        try:
            with tarfile.open(fileobj=f, mode="r|") as stream:
                key, members = None, {}
                for member in stream:
                    if stop.is_set():  # another tar failed, or Ctrl-C: this one's result is not wanted
                        return found
                    at = member.offset
                    name = KEY_EXT.match(member.name) if member.isfile() else None
                    if name is None:  # a folder, a link, a name without extension: as webdataset does
                        continue
                    if name[1] != key:
                        if key is not None:
                            found.add(key, members)
                        key, members = name[1], {}
                    ext = name[2].lower()  # as webdataset reads it: k.JPG is the image of k
                    data = stream.extractfile(member).read() if ext in PARTS else None
                    members.setdefault(ext, []).append((member, data))
                if key is not None:
                    found.add(key, members)
                at = stream.offset
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise damaged(found, at, str(exc)) from None
        check_end(f, found, at)
    return found


def check_end(f, found: TarIndex, end: int) -> None:
    """tarfile ends a stream quietly at a header it cannot read, as at the zero blocks that end
    a tar: damage part-way would pass for a shorter tar. After the real end come only zeros (the
    padding to a whole record). (A tar cut short inside a member is tarfile's "unexpected end".)"""
    f.seek(end)
    while chunk := f.read(1 << 16):
        if chunk.strip(b"\0"):
            raise damaged(found, end + len(chunk) - len(chunk.lstrip(b"\0")), "no tar header there")
        end += len(chunk)


def damaged(found: TarIndex, at: int, why: str) -> DataError:
    return DataError(
        f"{found.tar}: damaged at byte {at}, after {found.samples} samples ({why}); "
        "re-create it, or leave it out of the pattern"
    )


def read_split(split: str, tars: list[str], num_classes: int | None, decode: int, workers: int) -> list[TarIndex]:
    """Every tar of a split, several at a time (reading remote tars waits on the network)."""
    stop = threading.Event()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        try:
            jobs = pool.map(lambda tar: read_tar(tar, num_classes, decode, stop), tars)
            return list(tqdm(jobs, total=len(tars), desc=f"{split} tars", unit="tar", disable=None))
        except BaseException:
            # The first error (or Ctrl-C) is the answer: no more tars, and the ones being read are
            # given up at their next member rather than read to the end (threads cannot be killed).
            stop.set()
            pool.shutdown(cancel_futures=True)
            raise


def index_shards(
    train: str,
    val: str,
    out: Path | str,
    *,
    classes: str | None = None,
    sample: int = 10000,
    workers: int = 1,
    staging: Path | None = None,
) -> dict:
    """Indexes the tars the --train and --val patterns name; writes out/index/<split>/NNNNNN.idx
    and then out/manifest.json (tars by their full location). `out`: a folder or an s3:// prefix
    (store.Destination). Returns the manifest."""
    dest, patterns = store.Destination(out, staging, volatile=DESCRIPTIONS), {"train": train, "val": val}
    dest.check()
    out = dest.folder
    tars = {split: expand_split(split, pattern) for split, pattern in patterns.items()}
    names = read_classes(classes) if classes else None
    per_tar = -(-sample // len(tars["train"]))  # images decoded for the statistics: the first of each tar
    found = {"train": read_split("train", tars["train"], len(names) if names else None, per_tar, workers)}
    if names is None:  # the classes are the train split's labels, 0 up to the largest
        names = [str(k) for k in range(max((k for t in found["train"] for k in t.labels), default=-1) + 1)]
    found["val"] = read_split("val", tars["val"], len(names), 0, workers)
    for split, indexes in found.items():
        if not any(t.lines for t in indexes):
            skipped = [line for t in indexes for line in t.skipped]
            example = f", e.g. {skipped[0]}" if skipped else ""
            raise DataError(
                f"--{split} {patterns[split]}: no usable samples in its {len(indexes)} tars "
                f"({len(skipped)} skipped{example})"
            )
    manifest = {
        "version": MANIFEST_VERSION,
        "source": "index",
        "classes": names,
        "num_classes": len(names),
        "splits": {},
    }
    if dest.remote and not all(store.is_remote(t) for split_tars in tars.values() for t in split_tars):
        print(  # a shared file system may hold them at the same path everywhere; elsewhere they are missing
            f"notice: {dest.url(MANIFEST)} will name tars by their path on this machine's disk",
            file=sys.stderr,
        )
    try:
        forget_dataset(out)  # an old manifest would name index files this run rewrites
        for split in found:
            (out / "index" / split).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{exc.filename}: cannot write there ({exc.strerror}); pass --out a writable folder") from None
    for split, indexes in found.items():
        shards = []
        for number, t in enumerate(indexes):
            name = f"index/{split}/{number:06d}.idx"
            write_index(out / name, t.lines)
            dest.put(name)
            shards.append({"tar": t.tar, "index": name, "count": len(t.lines)})
        remove_stale(out / "index" / split, len(indexes))
        dest.prune(f"index/{split}", r"\d{6}\.idx")
        labels = sum((t.labels for t in indexes), Counter())
        manifest["splits"][split] = {
            "count": sum(s["count"] for s in shards),
            "shards": shards,
            "skipped": [line for t in indexes for line in t.skipped],
            "class_counts": {str(k): labels[k] for k in sorted(labels)},
        }
    train = found["train"]
    manifest.update(channel_stats(*(sum(getattr(t, k) for t in train) for k in ("sums", "squares", "pixels"))))
    manifest.update(size_stats({size for indexes in found.values() for t in indexes for size in t.sizes}))
    write_atomically(out / MANIFEST, json.dumps(manifest, indent=1))
    dest.put(MANIFEST)  # last: the index files it names are whole
    if report := dest.finish():
        print(report, flush=True)
    return manifest


def remove_stale(folder: Path, count: int) -> None:
    """Index files of an earlier run over more tars, and .tmp files of a killed one: none is listed."""
    for f in folder.iterdir():
        m = re.fullmatch(r"(\d{6})\.idx(\.tmp)?", f.name)
        if m and (m[2] or int(m[1]) >= count):
            f.unlink()
