"""What a training started with, and whether it is still there. A folder re-prepared (or a tar or
manifest.json rewritten) while a training reads it would otherwise go unnoticed: the later
epochs would train on other images with the old manifest's classes, counts, mean and std.

At start the training notes manifest.json's contents (a digest, locally and remotely alike) and,
for every local tar and index file it lists, its size, modification time and inode (a file
replaced by a rename is another inode even where the size and time agree). The whole set is
looked at again at each epoch's start (training/unchanged_data.py), and a tar or index file each
time a reader opens it (samples.py). Remote tars and index files are named by their manifest
only: looking at each again would be a request per file per epoch.
"""

import os
import time
from dataclasses import replace

from ..errors import DataChanged
from . import store
from .manifest import text_digest

# What a stopped run says about going on, after naming what changed.
HOW_TO_GO_ON = (
    "the run stops rather than mix data (its last checkpoint is kept): train the new data as a new run "
    "(another run_id=NAME), or put back the data this run started with and run the same command to resume"
)


def stamp(location: str) -> tuple[int, int, int] | None:
    """(size, modification time in ns, inode) of a local file; None for a remote one or one that
    is not there."""
    if store.is_remote(location):
        return None
    try:
        st = os.stat(location)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def stamp_of(f) -> tuple[int, int, int] | None:
    """The stamp of the file open as `f`: what was opened, whatever its name holds by now."""
    try:
        st = os.fstat(f.fileno())
    except (AttributeError, OSError, ValueError):  # not a plain file (a cache's stream)
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def difference(was: tuple, now: tuple | None) -> str | None:
    """What changed between two stamps of one file, in words; None if nothing did."""
    if now == was:
        return None
    if now is None:
        return "removed"
    if now[0] != was[0]:
        return f"{was[0]} bytes when the run started, {now[0]} now"
    if now[2] != was[2]:
        return "replaced by another file of the same size"
    return f"rewritten at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now[1] / 1e9))}"


def check(location: str, was: tuple | None, now: tuple | None = None) -> None:
    """Stops with one line when the local file `location`, stamped `was` at the start (None: not
    watched), is not as it was (`now`: its stamp as just opened, else looked up)."""
    if was is None:
        return
    if changed := difference(was, now or stamp(location)):
        raise DataChanged(f"{location}: changed since this training started ({changed}); {HOW_TO_GO_ON}")


class Watch:
    """The data a training started with: manifest.json (its digest) and each local shard's tar
    and index file (their stamps)."""

    def __init__(self, manifest):
        self.manifest, self.digest = manifest.path, manifest.digest
        self.stamps = {
            location: stamp(location)
            for split in manifest.data["splits"]
            for shard in manifest.shards(split)
            for location in (shard.tar, shard.index)
        }

    def stamped(self, shards: list) -> list:
        """The shards (manifest.Shard) carrying their stamps from the start, for the readers."""
        return [replace(s, started=(self.stamps.get(s.tar), self.stamps.get(s.index))) for s in shards]

    def check(self) -> None:
        """Stops with one line naming the first file that is not as the training started with it."""
        try:
            now = text_digest(store.read_text(self.manifest))
        except store.Missing:
            now = None
        except (OSError, UnicodeDecodeError) as exc:
            now = f"unreadable ({getattr(exc, 'strerror', None) or exc})"
        if now != self.digest:
            what = "removed" if now is None else (now if now.startswith("unreadable") else "rewritten")
            raise DataChanged(f"{self.manifest}: changed since this training started ({what}); {HOW_TO_GO_ON}")
        for location, was in self.stamps.items():
            check(location, was)
