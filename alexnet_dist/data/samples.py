"""Samples read one at a time from their shards, through the shards' index files: one seek and one
read per sample, whatever its place in the tar, so a loader can read the samples of an epoch's
order (plan.py) in that order. Both loaders read through a SampleReader.

Each read checks what it can see on the way: a tar header stands where the index says a sample's
first member begins (its name the index's, for alexnet-prepare's own shards), the tar holds every
byte the index lists, and after the last sample of an alexnet-prepare shard comes the tar's end,
not another sample. Whatever is wrong is one line naming the tar. A tar or index file that a
training started with and that has changed since is found as it is opened (watch.py).
"""

import tarfile
from collections import OrderedDict

from ..errors import DataChanged, DataError
from . import shard_index, store, watch
from .manifest import Shard

# Tars a reader keeps open: a batch reads from every part of the rank, each within a window of a tar or two.
KEEP_OPEN = 64
SMALL_BUFFER = 8192  # reads larger than this go to the store as they are, not in buffer-sized pieces


class SampleReader:
    """Reads samples of shards, through the node's shard cache where there is one (data.cache_dir)
    and from the store otherwise. Keeps the index files it has read and a few tars open.

    `uses`: (batch, tar) of the pass's tars by the batch that first reads each (EpochPlan.first_uses);
    at each batch the cache is told the tars that come after it, to fetch them while this one trains."""

    def __init__(self, cache=None, uses: list[tuple[int, str]] = ()):
        self.opener = cache.open if cache is not None else open_for_samples
        self.cache, self.uses = cache, list(uses)
        self.indexes: dict[str, list[str]] = {}
        self.files: OrderedDict = OrderedDict()

    def reading(self, batch: int) -> None:
        """Batch `batch` of the pass is being read: the cache fetches the tars after it ahead."""
        if self.cache is not None:
            self.cache.prefetch([tar for first, tar in self.uses if first > batch])

    def lines(self, shard: Shard) -> list[str]:
        if shard.index not in self.indexes:
            if shard.started:  # rewritten since the training started: its lines may be another tar's
                watch.check(shard.index, shard.started[1])
            self.indexes[shard.index] = shard_index.read(shard, self.opener)
        return self.indexes[shard.index]

    def file(self, shard: Shard):
        tar = shard.tar
        f = self.files.pop(tar, None)
        if f is None:
            try:
                f = self.opener(tar)
            except store.Missing:  # removed since the start-up check
                if shard.started:
                    watch.check(tar, shard.started[0])  # the line that says the data changed under the run
                raise DataError(f"{tar}: listed in manifest.json but missing; re-run alexnet-prepare") from None
            if shard.started:  # replaced since the training started: it is not what the manifest counted
                try:
                    watch.check(tar, shard.started[0], watch.stamp_of(f))
                except DataChanged:
                    f.close()
                    raise
            while len(self.files) >= KEEP_OPEN:
                self.files.popitem(last=False)[1].close()
        self.files[tar] = f
        return f

    def read(self, shard: Shard, number: int) -> tuple[str, dict[str, bytes]]:
        """(key, {extension: bytes}) of sample `number` of `shard`: the members its index line lists."""
        line = self.lines(shard)[number]
        first, end, key = shard_index.entry(line, shard.index)
        fields = line.split()
        members = [
            (fields[i].lstrip("."), int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
            for i in range(0, len(fields), 4)
        ]
        f = self.file(shard)
        start = first - tarfile.BLOCKSIZE  # the first member's header
        try:
            f.seek(start)
            data = f.read(end - start)
            if len(data) < end - start:
                raise DataError(
                    f"{shard.tar}: ends inside sample {key} (byte {start + len(data)} of {end}); the tar is "
                    "truncated: re-create it with alexnet-prepare"
                )
            for _, offset, _, name in members:  # every member's header, where the index says
                check_header(
                    data[offset - tarfile.BLOCKSIZE - start : offset - start], shard, number, key, name, offset
                )
            if shard.exact and number == shard.count - 1:
                check_tail(f, shard.tar, end)
        except DataError:
            self.forget(shard.tar)
            raise
        except OSError as exc:
            self.forget(shard.tar)
            raise DataError(
                f"{shard.tar}: unreadable at sample {key} ({exc.strerror or exc}); the tar is damaged: "
                "re-create it with alexnet-prepare"
            ) from None
        return key, {ext: data[offset - start : offset - start + size] for ext, offset, size, _ in members}

    def forget(self, tar: str) -> None:
        f = self.files.pop(tar, None)
        if f is not None:
            f.close()

    def close(self) -> None:
        while self.files:
            self.files.popitem()[1].close()


def open_for_samples(location: str):
    """A tar opened for reading samples at random places: remote ones with a small buffer, so a
    sample costs about its own bytes from the store (a 1 MB buffer read a megabyte for each)."""
    return store.open_file(location, buffer=SMALL_BUFFER)


def check_header(block: bytes, shard: Shard, number: int, key: str, name: str, offset: int) -> None:
    """A tar header stands just before a member's data, as the index says (its name the index's, in
    alexnet-prepare's own shards: other tools' may keep long names in a pax header before it)."""
    try:
        header = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        why = "zeros" if isinstance(exc, tarfile.EOFHeaderError) else str(exc)
        at = offset - tarfile.BLOCKSIZE
        raise DataError(
            f"{shard.tar}: no tar header {'at its start' if at == 0 else f'at byte {at}'} ({why}), where its "
            f"index puts sample {key}; the tar is damaged: re-create it with alexnet-prepare"
        ) from None
    if shard.exact and header.name != name:
        raise DataError(
            f"{shard.tar}: its index file says sample {number} is {key}, the tar holds {header.name} there; "
            "re-run alexnet-prepare"
        )


def check_tail(f, tar: str, end: int) -> None:
    """After an alexnet-prepare shard's last sample (its data ending at `end`) comes the tar's end:
    zeros, or the end of the file. Another member there means the tar holds more samples than its
    index and the manifest count, which would otherwise be left out without a word."""
    f.seek(-(-end // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)  # after the last data, padded to a block
    after = f.read(tarfile.BLOCKSIZE)
    try:
        tarfile.TarInfo.frombuf(after, "utf-8", "surrogateescape")
    except (tarfile.EOFHeaderError, tarfile.EmptyHeaderError):
        return
    except tarfile.HeaderError:
        raise DataError(
            f"{tar}: damaged after its last sample (not a tar's end); re-create it with alexnet-prepare"
        ) from None
    raise DataError(
        f"{tar}: holds more samples than its index file and manifest.json count; "
        "re-run alexnet-prepare so shards and manifest agree"
    )
