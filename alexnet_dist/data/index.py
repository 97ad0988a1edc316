"""alexnet-prepare index: a manifest and DALI index files for WebDataset tars made by other tools
(webdataset's ShardWriter, img2dataset, another lab's shards), left where they lie: local,
s3:// or http(s)://. Nothing is copied or re-encoded; each tar is read once, front to back.

A sample is a run of members with one key, by webdataset's rule: the key is the member's folder
and its name up to the first dot, the extension the rest (a/b.seg.jpg: key a/b, ext seg.jpg).
Which member is its image and which its label, and what the label means, members.py says (--image,
--label); other members are passed over. A sample that cannot train (no image, a label that is no
class, an image PIL cannot read or the loaders would decode differently) stays out of the index
and is listed, with why, in the manifest's `skipped`; when more than --max-skipped of a split's
samples are, nothing is written (a data set that lost most of its samples is no success).

A tar must be plain (not gzip-compressed: DALI and the index read members at byte offsets) and
hold each sample's members next to each other, as webdataset and DALI read them; a tar made
with plain `tar cf` from a folder stores files in directory order instead. Either stops in one
line saying how to re-create the tar.

Without --val tars, --val-fraction F holds out round(F x N) of the N usable training samples
for validation: those whose SHA-256 of "<tar file name>:<key>" is smallest, so the choice
depends on the data alone, the same on every run and machine and wherever the tars lie. Both
splits then name the same tars, each with its own index files listing its own samples.
"""

import hashlib
import io
import json
import re
import sys
import tarfile
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import DataError
from . import shard_index, store
from .images import shown_size
from .manifest import MANIFEST, MANIFEST_VERSION
from .members import BadLabel, SampleFormat, class_number, image_problem, index_format, label_value
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
MAX_SKIPPED = 0.01  # --max-skipped: the part of a split's samples that may be unusable
GZIP = b"\x1f\x8b"  # the first bytes of every gzip file
GZIP_ENDS = (".tar.gz", ".tgz")
HOLD_OUT_RULE = 'the round(fraction x N) usable train samples with the smallest SHA-256 of "<tar file name>:<key>"'


def expand_split(split: str, pattern: str) -> list[str]:
    tars = store.expand(pattern)
    if not tars:
        folder = Path(pattern).expanduser()
        packed = sorted(p for end in GZIP_ENDS for p in folder.rglob(f"*{end}")) if folder.is_dir() else []
        if packed:  # a folder lists its plain .tar files only: compressed ones deserve a word
            raise DataError(
                f"--{split} {pattern}: holds no plain tar, only gzip-compressed ones such as {packed[0].name}; "
                f"unpack them (`gzip -dc {packed[0].name} > {unpacked(packed[0].name)}`) and index the .tar files"
            )
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


@dataclass(frozen=True)
class Classes:
    """What a split's labels are checked against: the class names, number i at place i, and where
    they come from (for the reason a label is refused). names None: the train split's labels make
    them, known once it is read (see TarIndex.settle)."""

    names: list[str] | None
    source: str


@dataclass
class TarIndex:
    """What one pass over a tar found."""

    tar: str
    fmt: SampleFormat  # which members are the image and the label, and what the label means
    classes: Classes
    decode: int  # images to decode for the channel statistics
    # (key, index line or None, class number or label value or why it was skipped, image size) per
    # sample in tar order; settle() makes the lines, skipped, labels and sizes from them
    entries: list[tuple] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # DALI index lines of the samples kept
    skipped: list[str] = field(default_factory=list)  # "<tar>:<key>: why" of the others
    labels: Counter = field(default_factory=Counter)
    line_labels: list[int] = field(default_factory=list)  # the label of each line's sample
    sizes: set = field(default_factory=set)
    sums: np.ndarray = field(default_factory=lambda: np.zeros(3))
    squares: np.ndarray = field(default_factory=lambda: np.zeros(3))
    pixels: int = 0
    # the keys and image and label bytes of its samples, in order: equal for two copies of one tar
    digest: object = field(default_factory=hashlib.sha256)

    @property
    def samples(self) -> int:
        return len(self.entries)

    @property
    def wanted(self) -> set[str]:
        """The extensions of the members whose bytes are read: the images and the label."""
        return {*self.fmt.images, self.fmt.label_ext}

    def values(self) -> list:
        """The label values of the samples kept so far (class names among them before settle)."""
        return [value for _, line, value, _ in self.entries if line is not None]

    def add(self, key: str, members: dict) -> None:
        """A sample's members {ext: [(TarInfo, bytes or None)]}: indexed, or skipped with why."""
        self.digest.update(f"{key}\0".encode())
        for ext in sorted(members):
            for _, data in members[ext]:
                if data is not None:
                    self.digest.update(b"%s\0%d\0" % (ext.encode(), len(data)))
                    self.digest.update(data)
        found = self.check(members)
        if isinstance(found, str):
            self.entries.append((key, None, found, None))
            return
        parts, value, size = found
        line = index_line([(ext, m.offset_data, m.size, m.name) for ext, m in parts])
        self.entries.append((key, line, value, size))

    def check(self, members: dict) -> str | tuple:
        """Why the sample cannot be trained on, or its ([(ext, image member), (ext, label member)],
        label, image size): the label a class number where the classes are known, else as read.
        The first `decode` usable images are decoded for the channel statistics."""
        fmt = self.fmt
        twice = [ext for ext, found in members.items() if len(found) > 1]
        if twice:  # webdataset refuses a sample with two members of one extension, whichever
            return f"two .{twice[0]} members"
        image_ext = fmt.image_of(members)
        if image_ext is None:
            return f"no {fmt.describe_images()} image (has {', '.join('.' + ext for ext in members)})"
        if fmt.label_ext not in members:
            return f"no .{fmt.label_ext} label"
        (image_member, image), (label_member, text) = members[image_ext][0], members[fmt.label_ext][0]
        spaced = [m.name for m in (image_member, label_member) if len(m.name.split()) != 1]
        if spaced:  # the index file's fields are separated by spaces
            return f"member name {spaced[0]!r} has a space, which a DALI index file cannot hold"
        try:
            value = label_value(fmt, text)
            if self.classes.names is not None:
                value = class_number(value, self.classes.names, self.classes.source)
        except BadLabel as exc:
            return str(exc)
        try:
            picture = Image.open(io.BytesIO(image))
            size = shown_size(picture)  # the header only: nothing is decoded
        except Exception as exc:
            return f"the .{image_ext} is no image PIL can read ({type(exc).__name__})"
        problem = image_problem(picture, image, image_ext)
        if problem:
            return problem
        if self.decode > 0:
            try:
                a = np.asarray(picture.convert("RGB"), dtype=np.float64).reshape(-1, 3)
            except Exception as exc:  # a header that reads, data that does not (a cut file)
                return f"the .{image_ext} cannot be decoded ({exc})"
            self.sums, self.squares = self.sums + a.sum(0), self.squares + (a * a).sum(0)
            self.pixels, self.decode = self.pixels + len(a), self.decode - 1
        return [(image_ext, image_member), (fmt.label_ext, label_member)], value, size

    def settle(self, classes: Classes) -> None:
        """The index lines, skipped samples, label counts and image sizes, in tar order, once the
        classes are known: a label that names none of them is skipped here."""
        self.lines, self.line_labels, self.skipped = [], [], []
        self.labels, self.sizes = Counter(), set()
        for key, line, value, size in self.entries:
            if line is not None:
                try:
                    number = class_number(value, classes.names, classes.source)
                except BadLabel as exc:
                    line, value = None, str(exc)
            if line is None:
                self.skipped.append(f"{self.tar}:{key}: {value}")
                continue
            self.lines.append(line)
            self.line_labels.append(number)
            self.labels[number] += 1
            self.sizes.add(size)


def read_tar(tar: str, found: TarIndex, stop: threading.Event) -> TarIndex:
    """One streaming pass over `tar` (mode "r|": a remote tar is fetched once, front to back) into
    `found`, reading only the bytes of image and label members. Given up, part-way, once `stop` is set."""
    at = 0
    with store.open_file(tar, stop=stop) as f:  # a brace pattern names files whether or not they exist: Missing
        if f.read(len(GZIP)) == GZIP:  # known by its bytes: a gzip file may be named .tar
            raise gzipped(tar)
        f.seek(0)
        try:
            with tarfile.open(fileobj=f, mode="r|") as stream:
                key, members, done = None, {}, set()
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
                            done.add(key)
                        if name[1] in done:  # a sample's members apart: each run would read as a sample
                            raise scattered(tar, name[1], member.name)
                        key, members = name[1], {}
                    ext = name[2].lower()  # as webdataset reads it: k.JPG is the image of k
                    data = stream.extractfile(member).read() if ext in found.wanted else None
                    members.setdefault(ext, []).append((member, data))
                if key is not None:
                    found.add(key, members)
                at = stream.offset
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise damaged(found, at, str(exc)) from None
        check_end(f, found, at)
    return found


ONE_PLACE = (
    "a tar belongs to one split, once (validation tars trained on inflate the validation score, and a tar read "
    "twice counts its samples twice)"
)


def check_named_once(tars: dict[str, list[str]], patterns: dict[str, str]) -> None:
    """A tar named twice, by the patterns of both splits or twice by one split's pattern (a folder
    holding the val tars, {a,./a}.tar, a link to it), stops in one line naming it and both places.
    store.expand gives local tars by their resolved path, so a.tar, ./a.tar and links are one."""
    seen = {}
    for split, names in tars.items():
        for tar in names:
            place = f"--{split} {patterns[split]}"
            if tar in seen:
                where = f"twice by {place}" if seen[tar] == place else f"by {seen[tar]} and by {place}"
                raise DataError(f"{tar}: named {where}; {ONE_PLACE}: change the patterns so that each tar matches once")
            seen[tar] = place


def check_copies(found: dict[str, list["TarIndex"]], patterns: dict[str, str]) -> None:
    """Two tars by different names holding the same samples (an s3:// tar and its local copy, a
    copied file) stop in one line naming both and where each was named."""
    seen = {}
    for split, indexes in found.items():
        for t in indexes:
            if not t.samples:
                continue
            fingerprint = t.digest.digest()
            if fingerprint in seen:
                first, place = seen[fingerprint]
                raise DataError(
                    f"{t.tar} (--{split} {patterns[split]}) holds the same samples as {first} ({place}), a copy of "
                    f"it; {ONE_PLACE}: leave one of the two out of the patterns"
                )
            seen[fingerprint] = (t.tar, f"--{split} {patterns[split]}")


def unpacked(name: str) -> str:
    """The name to give a gzip-compressed tar's plain copy."""
    return next(
        (name.removesuffix(end) + ".tar" for end in (*GZIP_ENDS, ".gz") if name.endswith(end)),
        name.removesuffix(".tar") + "-plain.tar",
    )


def gzipped(tar: str) -> DataError:
    name = tar.rsplit("/", 1)[-1]
    plain = unpacked(name)
    return DataError(
        f"{tar}: gzip-compressed; the index needs a plain tar (DALI reads members at their byte offsets): "
        f"unpack it with `gzip -dc {name} > {plain}` and point the pattern at {plain}"
    )


def scattered(tar: str, key: str, name: str) -> DataError:
    return DataError(
        f"{tar}: the members of sample {key} are not next to each other ({name} comes after other samples' "
        "members), but webdataset and DALI read a sample as one run of members; re-create the tar sorted by "
        "name, e.g. `tar --sort=name -cf NAME.tar -C FOLDER .` (GNU tar: plain `tar cf` stores files in "
        "the folder's own order)"
    )


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


def read_split(
    split: str, tars: list[str], fmt: SampleFormat, classes: Classes, decode: int, workers: int
) -> list[TarIndex]:
    """Every tar of a split, several at a time (reading remote tars waits on the network)."""
    stop = threading.Event()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        try:
            jobs = [pool.submit(read_tar, tar, TarIndex(tar, fmt, classes, decode), stop) for tar in tars]
            # as they finish, not in order: the first tar that fails for good, whichever, is the answer
            for job in tqdm(as_completed(jobs), total=len(tars), desc=f"{split} tars", unit="tar", disable=None):
                job.result()
            return [job.result() for job in jobs]
        except BaseException:
            # No more tars, and the ones being read are given up (threads cannot be killed): at their
            # next member, or in the store's read or retry wait (store.Stopped), within one socket
            # timeout, so the command ends within the bound its line prints.
            stop.set()
            pool.shutdown(cancel_futures=True)
            raise


def index_shards(
    train: str,
    val: str | None,
    out: Path | str,
    *,
    classes: str | None = None,
    sample: int = 10000,
    workers: int = 1,
    fmt: SampleFormat | None = None,
    val_fraction: float | None = None,
    max_skipped: float = MAX_SKIPPED,
    staging: Path | None = None,
) -> dict:
    """Indexes the tars the --train and --val patterns name, or without --val holds out
    `val_fraction` of the training samples for validation, reading their samples as `fmt` says
    (None: what the command reads by default, members.index_format); writes
    out/index/<split>/NNNNNN.idx and then out/manifest.json (tars by their full location). `out`: a
    folder or an s3:// prefix (store.Destination). Returns the manifest."""
    assert (val is None) != (val_fraction is None), "--val or --val-fraction, one of them"
    fmt = fmt or index_format(None, None)
    dest, patterns = (
        store.Destination(out, staging, volatile=DESCRIPTIONS),
        {"train": train, "val": val if val is not None else train},
    )
    dest.check()
    out = dest.folder
    read = ("train", "val") if val is not None else ("train",)  # held out: the train tars, read once
    tars = {split: expand_split(split, patterns[split]) for split in read}
    check_named_once(tars, patterns)
    known = Classes(None, "")
    if classes:
        names = read_classes(classes)
        known = Classes(names, f"the {len(names)} classes of --classes {classes}")
    per_tar = -(-sample // len(tars["train"]))  # images decoded for the statistics: the first of each tar
    found = {"train": read_split("train", tars["train"], fmt, known, per_tar, workers)}
    if known.names is None:
        names = train_classes([value for t in found["train"] for value in t.values()])
        known = Classes(names, f"the train split's {len(names)} classes")
    if val is not None:
        found["val"] = read_split("val", tars["val"], fmt, known, 0, workers)
    check_copies(found, patterns)
    for indexes in found.values():
        for t in indexes:
            t.settle(known)
    for split, indexes in found.items():
        check_usable(split, patterns[split], indexes, max_skipped)
    splits = found if val is not None else hold_out(found["train"], val_fraction)
    manifest = {
        "version": MANIFEST_VERSION,
        "source": "index",
        "classes": names,
        "num_classes": len(names),
        **fmt.record(),
        **({"val_fraction": {"fraction": val_fraction, "rule": HOLD_OUT_RULE}} if val is None else {}),
        "splits": {},
    }
    if dest.remote and not all(store.is_remote(t) for split_tars in tars.values() for t in split_tars):
        print(  # a shared file system may hold them at the same path everywhere; elsewhere they are missing
            f"notice: {dest.url(MANIFEST)} will name tars by their path on this machine's disk",
            file=sys.stderr,
        )
    try:
        forget_dataset(out)  # an old manifest would name index files this run rewrites
        for split in splits:
            (out / "index" / split).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{exc.filename}: cannot write there ({exc.strerror}); pass --out a writable folder") from None
    for split, indexes in splits.items():
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
            "pattern": patterns[split],
            **({"held_out_from": "train"} if split == "val" and val is None else {}),
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


def train_classes(values: list) -> list[str]:
    """The class names the train split's labels make: its class names, sorted, when it gives any
    (a number then means the class at that place), else "0" up to the largest class number."""
    names = sorted({v for v in values if isinstance(v, str)})
    return names or [str(k) for k in range(max(values, default=-1) + 1)]


def check_usable(split: str, pattern: str, indexes: list[TarIndex], max_skipped: float) -> None:
    """A split with no usable sample, or more than `max_skipped` of its samples unusable, stops in
    one line: how many, the commonest reason and an example of it."""
    skipped = [line for t in indexes for line in t.skipped]
    if not any(t.lines for t in indexes):
        example = f", e.g. {skipped[0]}" if skipped else ""
        raise DataError(
            f"--{split} {pattern}: no usable samples in its {len(indexes)} tars ({len(skipped)} skipped{example})"
        )
    total = sum(t.samples for t in indexes)
    if len(skipped) <= max_skipped * total:
        return
    # (tar, key, why) of each: a skipped line is "<tar>:<key>: why", and a tar's name may hold colons
    found = [(t.tar, *line[len(t.tar) + 1 :].split(": ", 1)) for t in indexes for line in t.skipped]
    kind, count = Counter(reason_kind(why) for _, _, why in found).most_common(1)[0]
    tar, key, why = next(f for f in found if reason_kind(f[2]) == kind)
    need = -(-len(skipped) * 100 // total) / 100  # the fraction skipped, rounded up to a hundredth
    raise DataError(
        f"--{split} {pattern}: {len(skipped)} of {total} samples are unusable, more than --max-skipped "
        f"{max_skipped:g} allows; the commonest reason ({count} of them) as in {tar}:{key}: {why}; fix the tars, "
        f"or pass --max-skipped {need:g} to index the {total - len(skipped)} usable ones"
    )


def reason_kind(why: str) -> str:
    """A skip reason without its particulars (numbers, quoted names, the part in brackets), so that
    "label 7 is outside ..." and "label 8 is outside ..." count as one reason."""
    return re.sub(r"\(.*\)|b?'.*?'|-?\d+", "_", why)


def hold_out(train: list[TarIndex], fraction: float) -> dict[str, list[TarIndex]]:
    """The training tars' usable samples parted into train and val: round(fraction x N) of the N
    held out for validation by HOLD_OUT_RULE. Every tar stays in train (as the tars listed
    without --val-fraction do, those all held out with no samples); val lists only the tars
    holding held-out samples. The skipped samples stay with train, where they were found."""

    def rank(t: TarIndex, line: str) -> bytes:
        key = shard_index.sample_key(line.split()[3])  # the first member's name: the sample's key
        return hashlib.sha256(f"{t.tar.rsplit('/', 1)[-1]}:{key}".encode()).digest()

    order = sorted((rank(t, line), n, i) for n, t in enumerate(train) for i, line in enumerate(t.lines))
    count = round(fraction * len(order))
    if not 0 < count < len(order):
        raise DataError(
            f"--val-fraction {fraction:g} holds out {count} of the {len(order)} usable training samples, and "
            "training and validation each need some; choose a fraction that leaves both, or give --val tars"
        )
    held = {(n, i) for _, n, i in order[:count]}
    splits = {"train": [], "val": []}
    for n, t in enumerate(train):
        for split in splits:
            rows = [i for i in range(len(t.lines)) if ((n, i) in held) == (split == "val")]
            if rows or split == "train":
                labels = [t.line_labels[i] for i in rows]
                splits[split].append(
                    replace(
                        t,
                        lines=[t.lines[i] for i in rows],
                        line_labels=labels,
                        labels=Counter(labels),
                        skipped=t.skipped if split == "train" else [],
                    )
                )
    return splits


def remove_stale(folder: Path, count: int) -> None:
    """Index files of an earlier run over more tars, and .tmp files of a killed one: none is listed."""
    for f in folder.iterdir():
        m = re.fullmatch(r"(\d{6})\.idx(\.tmp)?", f.name)
        if m and (m[2] or int(m[1]) >= count):
            f.unlink()
