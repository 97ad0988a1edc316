"""A node-local cache of remote tars (s3://, http(s)://): each tar is downloaded once per node,
however many processes want it, and read from local disk from then on (data.cache_dir).

The cache folder holds, per tar, `KEY.tar` (the tar), `KEY.size` (the size the store gave, written
before the tar is renamed into place, so a cut or damaged copy is noticed at open) and `KEY.lock`
(what a download holds), where KEY is a hash of the location and the tar's file name. Three kinds
of fcntl.flock lock keep the processes of a node apart:

- KEY.lock, exclusive: the one process downloading KEY. The others wait on it, then find the tar
  there and read it. A download is written to KEY.tar.part, made its full size first (so what is
  being downloaded counts against the limit), its size checked, then os.replace()d to KEY.tar.
- KEY.tar, shared: every reader of the cached tar holds it while its file is open. Eviction takes
  it exclusive without waiting and passes over a tar it cannot lock: a tar being read stays.
- .cache.lock, exclusive: taken while room is made for a new tar, so two downloads do not both
  count the same free space.

The cache keeps under its limit by evicting the least recently opened tars first (each open sets
the tar's mtime). A tar that cannot fit (larger than the limit, or the rest of the cache in use) is
read from the store, with one warning per process. A disk that fills, or any other failure of the
cache's own folder, makes this process read from the store from then on, with one warning line:
training never stops because of the cache. The store's own failures (a missing file, a store that
is gone) are what they are when streaming: the same retry policy, the same one-line errors.
"""

import errno
import fcntl
import hashlib
import os
import re
import sys
import threading
import urllib.parse
from collections import deque
from contextlib import contextmanager
from pathlib import Path

from . import store

CHUNK = 4 << 20  # bytes per read of a download
# The cache's own tars and downloads: only these count against the limit and may be evicted, so a
# cache_dir pointed at a folder of the user's tars by mistake deletes none of them.
OWN = re.compile(r"([0-9a-f]{16}-[A-Za-z0-9._-]*)\.tar(\.part)?")
GLOBAL_LOCK = ".cache.lock"
FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


# File descriptors this process holds cache locks through, besides those handed to callers. A
# forked child (a loader worker) closes its copies at once: an inherited copy of a lock's file
# descriptor would hold that lock for as long as the child lives, and every other process that
# wants the tar would wait for it. `_fds_lock` keeps a fork from coming between opening a
# descriptor and noting it.
_held_fds: set[int] = set()
_fds_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _fds_lock
    for fd in _held_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()
    _fds_lock = threading.Lock()


os.register_at_fork(
    before=lambda: _fds_lock.acquire(),
    after_in_parent=lambda: _fds_lock.release(),
    after_in_child=_after_fork_in_child,
)


def _open_fd(path: Path, flags: int) -> int:
    with _fds_lock:
        fd = os.open(path, flags | os.O_CLOEXEC, 0o666)
        _held_fds.add(fd)
    return fd


def _open_reader(path: Path):
    """`path` opened for reading, its descriptor noted as held (see _held_fds)."""
    with _fds_lock:
        f = open(path, "rb")
        _held_fds.add(f.fileno())
    return f


def _forget(f) -> None:
    """`f` is the caller's now: a forked child keeps its copy, as of any file the caller opened."""
    with _fds_lock:
        _held_fds.discard(f.fileno())


def _close(f) -> None:
    with _fds_lock:
        _held_fds.discard(f.fileno())
        f.close()


def _close_fd(fd: int) -> None:
    with _fds_lock:
        _held_fds.discard(fd)
        os.close(fd)


@contextmanager
def _locked(path: Path, how: int = fcntl.LOCK_EX):
    """An exclusive (by default) flock on the file `path` (made if missing) while in the block."""
    fd = _open_fd(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, how)
        yield fd
    finally:
        _close_fd(fd)


def cache_key(location: str) -> str:
    """The name of a location's files in the cache: a hash of the whole location (two tars of one
    name in different places stay apart), then the tar's own name for the reader of the folder."""
    name = os.path.basename(urllib.parse.urlsplit(location).path) or "tar"
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name.removesuffix(".tar"))[:80]
    return f"{hashlib.sha256(location.encode()).hexdigest()[:16]}-{name}"


def amount(n: int) -> str:
    """A number of bytes for a message: GB from 1 GB on, else MB."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


class _Stop(Exception):
    """close() was called during a background download."""


class ShardCache:
    """The node-local cache of remote tars in `folder`, kept under `limit_bytes`; `ahead`: how many
    tars `prefetch` downloads ahead of the reader. Local locations are read where they are."""

    def __init__(self, folder: Path, limit_bytes: int, ahead: int = 2):
        self.folder, self.limit, self.ahead = Path(folder).expanduser(), int(limit_bytes), int(ahead)
        self.streaming = False  # True once this process's cache failed: every tar from the store
        self._warned: set[str] = set()
        self._start_threads()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._give_up(exc)

    @classmethod
    def of(cls, data) -> "ShardCache | None":
        """The cache that settings `data` (config.Data) ask for: data.cache_dir, limited to
        data.cache_limit_gb (10^9 bytes), data.prefetch_shards ahead; None without a cache_dir."""
        if not data.cache_dir:
            return None
        return cls(Path(data.cache_dir), int(data.cache_limit_gb * 1e9), data.prefetch_shards)

    # -- reading

    def open(self, location: str):
        """`location` opened for reading (binary, seekable; a context manager): a local path as it
        is; a remote tar from the cache, downloaded there first if it is not, or from the store
        where the cache cannot hold it."""
        location = str(location)
        if not store.is_remote(location) or self.streaming:
            return store.open_file(location)
        f = self._cached(location)
        if f is None:
            return store.open_file(location)
        _forget(f)
        return f

    @contextmanager
    def local(self, location: str):
        """For readers that take a file name (DALI): a local path holding `location`'s bytes while
        in the block (the cached copy, kept from eviction), or the location itself where the cache
        cannot hold it."""
        location = str(location)
        f = None if not store.is_remote(location) or self.streaming else self._cached(location)
        try:
            yield location if f is None else str(self._path(cache_key(location), ".tar"))
        finally:
            if f is not None:
                _close(f)

    def _cached(self, location: str):
        """The cached copy of `location`, opened and read-locked, downloaded first if needed; None
        when it is to be read from the store instead."""
        key = cache_key(location)
        try:
            f = self._open_cached(key)
            if f is not None:
                return f
            return self._download(location, key)
        except _Stop:
            return None
        except OSError as exc:  # the cache's own folder; the store's failures are DataErrors
            self._give_up(exc)
            return None

    def _path(self, key: str, suffix: str) -> Path:
        return self.folder / (key + suffix)

    def _expected(self, key: str) -> int | None:
        """The size KEY.size records, or None when it is missing or unreadable."""
        try:
            return int(self._path(key, ".size").read_text())
        except (OSError, ValueError):
            return None

    def _open_cached(self, key: str):
        """KEY.tar opened with a shared lock if it is there whole, its recency noted; else None."""
        path = self._path(key, ".tar")
        try:
            f = _open_reader(path)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)
            held = os.fstat(f.fileno())
            try:
                there = os.stat(path)
            except FileNotFoundError:
                there = None
            if there is None or (there.st_dev, there.st_ino) != (held.st_dev, held.st_ino):
                _close(f)  # evicted or replaced between the open and the lock
                return None
            if held.st_size != self._expected(key):
                _close(f)  # cut short or damaged: _download replaces it
                return None
            try:
                os.utime(f.fileno())
            except OSError:  # another user's file: recency is a hint
                pass
            return f
        except BaseException:
            _close(f)
            raise

    def _download(self, location: str, key: str):
        """Downloads `location` into the cache unless another process did while this one waited
        for the tar's lock; returns it opened as `_open_cached` does, or None (read the store)."""
        with _locked(self._path(key, ".lock")):
            f = self._open_cached(key)
            if f is not None:
                return f  # another process downloaded it meanwhile
            for suffix in (".tar", ".size"):  # a cut or damaged copy
                self._path(key, suffix).unlink(missing_ok=True)
            remote = store.RemoteFile(location)  # asks the store for the size: Missing at once
            part, f = self._path(key, ".tar.part"), None
            try:
                with _locked(self.folder / GLOBAL_LOCK):
                    if not self._make_room(remote.size, key):
                        return None
                    out = open(part, "wb")  # noqa: SIM115 - closed below, and on every failure
                    try:
                        os.ftruncate(out.fileno(), remote.size)  # the whole size counts from now on
                    except BaseException:
                        out.close()
                        raise
                with out:
                    written = self._copy(remote, out)
                    out.flush()
                    os.fsync(out.fileno())
                if written != remote.size or os.path.getsize(part) != remote.size:
                    return None  # the file changed in the store while it was read: read it from there
                self._write_size(key, remote.size)
                f = _open_reader(part)  # locked before the rename: nothing evicts it before it is read
                fcntl.flock(f.fileno(), fcntl.LOCK_SH)
                os.replace(part, self._path(key, ".tar"))
                f.raw.name = str(self._path(key, ".tar"))  # its name now, for messages
                return f
            except BaseException:
                if f is not None:
                    _close(f)
                raise
            finally:
                remote.close()
                part.unlink(missing_ok=True)

    def _copy(self, remote: store.RemoteFile, out) -> int:
        """remote's bytes into `out`, through the store's retry policy (RemoteFile); stops between
        reads when close() is called."""
        buffer, written = bytearray(CHUNK), 0
        view = memoryview(buffer)
        while n := remote.readinto(view):
            out.write(view[:n])
            written += n
            if self._stopping.is_set() and threading.current_thread() is self._thread:
                raise _Stop()
        return written

    def _write_size(self, key: str, size: int) -> None:
        tmp = self._path(key, f".size.{os.getpid()}-{threading.get_ident()}")
        try:
            tmp.write_text(str(size))
            os.replace(tmp, self._path(key, ".size"))
        finally:
            tmp.unlink(missing_ok=True)

    # -- the limit

    def _make_room(self, size: int, key: str) -> bool:
        """Under the folder's lock: evicts the least recently opened tars that no process reads
        until `size` more bytes fit under the limit; False (and one warning) when they cannot."""
        used, tars = 0, []
        for entry in os.scandir(self.folder):
            own = OWN.fullmatch(entry.name)
            if not own:
                continue
            try:
                if own[2]:
                    if own[1] == key or self._unused(own[1]):
                        os.unlink(entry.path)  # left by a download that died
                    else:
                        used += entry.stat().st_size
                else:
                    stat = entry.stat()
                    used += stat.st_size
                    tars.append((stat.st_mtime, entry.path, stat.st_size))
            except FileNotFoundError:
                continue
        if size <= self.limit:
            for _, path, tar_size in sorted(tars):
                if used + size <= self.limit:
                    break
                if self._evict(Path(path)):
                    used -= tar_size
        if used + size <= self.limit:
            return True
        in_use = "" if size > self.limit else f", with {amount(used)} of it in use by readers"
        self._warn(
            "fit",
            f"warning: shard cache {self.folder}: a tar of {amount(size)} does not fit under its limit of "
            f"{amount(self.limit)} (data.cache_limit_gb){in_use}; reading such tars from the store",
        )
        return False

    def _unused(self, key: str) -> bool:
        """No process holds KEY.lock (no download of KEY is under way)."""
        fd = _open_fd(self._path(key, ".lock"), os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            _close_fd(fd)

    def _evict(self, path: Path) -> bool:
        """Removes a cached tar (and its size) unless a process reads it; True when it is gone."""
        try:
            f = _open_reader(path)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _close(f)
            return False
        try:
            there = os.stat(path)
            held = os.fstat(f.fileno())
            if (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino):
                os.unlink(path)
                path.with_suffix(".size").unlink(missing_ok=True)
            return True
        except FileNotFoundError:
            return True
        finally:
            _close(f)

    # -- failures

    def _give_up(self, exc: OSError) -> None:
        """The cache's folder failed this process: one warning, then every tar from the store."""
        self.streaming = True
        why = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        what = "disk full" if exc.errno in FULL else "cannot be used"
        self._warn("failed", f"warning: shard cache {self.folder}: {what} ({why}); reading shards from the store")

    def _warn(self, kind: str, line: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            print(line, file=sys.stderr, flush=True)

    # -- prefetching

    def _start_threads(self) -> None:
        self._pid = os.getpid()
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._queue: deque[str] = deque()
        self._current: str | None = None
        self._thread: threading.Thread | None = None

    def prefetch(self, locations) -> None:
        """Downloads in the background, one after another, the first `ahead` of `locations` (the
        tars the caller reads next, in order) that are remote and not cached yet. A later call
        replaces what this one queued and has not started; returns at once."""
        if self.ahead <= 0 or self.streaming:
            return
        if self._pid != os.getpid():  # a forked child: the parent's thread is not here
            self._start_threads()
        with self._wake:
            busy = self._current is not None
            wanted = []
            for location in map(str, locations):
                if len(wanted) + busy >= self.ahead:
                    break
                if store.is_remote(location) and location != self._current and not self._is_cached(location):
                    wanted.append(location)
            self._queue = deque(wanted)
            if self._thread is None and wanted:
                self._thread = threading.Thread(target=self._prefetching, name="shard-cache-prefetch", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _is_cached(self, location: str) -> bool:
        key = cache_key(location)
        try:
            return os.path.getsize(self._path(key, ".tar")) == self._expected(key)
        except OSError:
            return False

    def _prefetching(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._stopping.is_set():
                    self._wake.wait()
                if self._stopping.is_set():
                    return
                self._current = self._queue.popleft()
            try:
                if not self.streaming:
                    f = self._cached(self._current)
                    if f is not None:
                        _close(f)
            except Exception:  # the store's failure: the reader meets it, in one line, when it opens the tar
                pass
            finally:
                with self._wake:
                    self._current = None

    def close(self) -> None:
        """Stops the prefetching thread (a download under way is dropped)."""
        if self._pid != os.getpid() or self._thread is None:
            return
        with self._wake:
            self._stopping.set()
            self._queue.clear()
            self._wake.notify()
        self._thread.join(timeout=60)
        self._thread = None

    def __enter__(self) -> "ShardCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # a ShardCache goes to spawned loader workers as its settings; their threads are their own
    def __getstate__(self) -> dict:
        return {"folder": self.folder, "limit": self.limit, "ahead": self.ahead, "streaming": self.streaming}

    def __setstate__(self, state: dict) -> None:
        self.folder, self.limit, self.ahead = state["folder"], state["limit"], state["ahead"]
        self.streaming, self._warned = state["streaming"], set()
        self._start_threads()
