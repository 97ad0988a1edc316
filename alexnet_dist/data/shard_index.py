"""DALI's index files, read in one place. alexnet-prepare writes one beside each tar: a first line
"v1.2 <count>", then one line per sample, "ext offset size name" for each of its members (.jpg,
.cls), where offset is where the member's data starts in the tar. DALI's reader needs them; the
webdataset loader seeks through them to a rank's first sample; the start-up check reads their first
and last lines.

Whatever is wrong with one (missing, unreadable, garbled, a count the manifest does not share)
is one line naming the index file (or its tar) and, for a sample's line, what the line reads.
"""

import os
import tarfile

from ..errors import DataError
from . import store

VERSION = "v1.2"  # the format of DALI's index files that alexnet-prepare writes


def text(lines: list[str]) -> str:
    """An index file holding these samples' lines."""
    return f"{VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines)


def count(first: str, index: str) -> int:
    """The sample count that an index file's first line, "v1.2 <count>", gives."""
    fields = first.split()
    if len(fields) != 2 or not fields[1].isdigit():
        raise DataError(f"{index}: not a DALI index file (no '{VERSION} <count>' first line); re-run alexnet-prepare")
    return int(fields[1])


def entry(line: str, index: str) -> tuple[int, int, str]:
    """(data offset, end, key) of a sample's line: where its first member's data starts, where its
    last one's ends, and its key. Anything else (a hand edit, a cut or garbled file) is one line
    naming the index file."""
    fields = line.split()
    try:
        offsets, sizes = [int(f) for f in fields[1::4]], [int(f) for f in fields[2::4]]
        # every member's data follows its own tar header, so no offset is below one block
        if len(fields) < 4 or len(fields) % 4 or min(offsets) < tarfile.BLOCKSIZE or min(sizes) < 0:
            raise ValueError
    except ValueError:
        raise DataError(
            f"{index}: not a DALI index file (a sample's line reads {line.strip()[:80]!r}); re-run alexnet-prepare"
        ) from None
    return min(offsets), max(o + s for o, s in zip(offsets, sizes, strict=True)), sample_key(fields[3])


def sample_key(member: str) -> str:
    """The sample a tar member belongs to, by webdataset's rule: its folder and its name up to the
    first dot (`a/b.seg.jpg` belongs to `a/b`)."""
    folder, _, name = member.rpartition("/")
    return f"{folder}/{name.split('.', 1)[0]}" if folder else name.split(".", 1)[0]


def opened(shard, opener=store.open_file):
    """`shard`'s index file (shard: a manifest.Shard) open for reading (through `opener`: the store,
    or a node's shard cache); one line where it cannot be."""
    try:
        return opener(shard.index)
    except store.Missing:
        raise DataError(
            f"{shard.index}: DALI index file of {shard.tar} missing; re-run alexnet-prepare (it writes them)"
        ) from None
    except OSError as exc:
        raise unreadable(shard.index, exc) from None


def unreadable(index: str, exc: OSError) -> DataError:
    return DataError(f"{index}: cannot be read ({exc.strerror or exc}); fix its permissions or re-run alexnet-prepare")


def ends(shard) -> tuple[int, str]:
    """(the count its first line gives, its last line) of `shard`'s index file, reading only those:
    at start-up every rank looks at its share of the shards' index files this way."""
    try:
        with opened(shard) as f:
            first = f.readline(100).decode(errors="replace")
            f.seek(max(f.tell(), f.seek(0, os.SEEK_END) - 4096))  # the last line is far shorter
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError as exc:  # removed or made unreadable while being read
        raise unreadable(shard.index, exc) from None
    return count(first, shard.index), (lines[-1] if lines else "")


def read(shard, opener=store.open_file) -> list[str]:
    """The sample lines of `shard`'s index file, as many as the manifest counts (shard.count);
    each one is checked by `entry` where it is used."""
    try:
        with opened(shard, opener) as f:
            lines = f.read().decode(errors="replace").splitlines()
    except OSError as exc:  # removed or made unreadable since the start-up check
        raise unreadable(shard.index, exc) from None
    count(lines[0] if lines else "", shard.index)
    lines = lines[1:]
    if len(lines) != shard.count:
        raise DataError(
            f"{shard.index}: lists {len(lines)} samples but manifest.json says {shard.count}; re-run alexnet-prepare"
        )
    return lines
