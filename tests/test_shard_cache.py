"""The node-local shard cache (data/shard_cache.py) against real stores: moto's S3 server and an
http.server that counts the GET requests it answers. Processes are real processes; the disk that
fills is a real file size limit."""

import http.server
import json
import os
import random
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from alexnet_dist.config import Data, make
from alexnet_dist.data import store
from alexnet_dist.data.shard_cache import ShardCache, cache_key

TARS = 6


def make_tar(path: Path, seed: int) -> None:
    """A small tar of random members (about 170 KB): every tar's bytes differ."""
    rng = random.Random(seed)
    folder = path.parent / f"members-{seed}"
    folder.mkdir()
    with tarfile.open(path, "w") as tar:
        for i in range(3):
            member = folder / f"{seed:06d}-{i}.bin"
            member.write_bytes(rng.randbytes(50_000 + 1000 * seed))
            tar.add(member, arcname=member.name)


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> Path:
    """TARS tars, 000000.tar ... , in one folder."""
    folder = tmp_path_factory.mktemp("tars")
    for i in range(TARS):
        make_tar(folder / f"{i:06d}.tar", i)
    for sub in folder.glob("members-*"):
        for f in sub.iterdir():
            f.unlink()
        sub.rmdir()
    return folder


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves `folder`; counts per path the GETs that ask for a file's bytes (not the one-byte
    reads that tell its size); `delay`: seconds before answering those."""

    folder, delay, gets = "", 0.0, {}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=self.folder, **kwargs)

    def do_GET(self):
        if self.headers.get("Range") != "bytes=0-0":
            self.gets[self.path] = self.gets.get(self.path, 0) + 1
            time.sleep(self.delay)
        super().do_GET()

    def log_message(self, *args):
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a size request hangs up before the whole file is sent


@pytest.fixture(scope="module")
def http_tars(tars):
    """The tars served over HTTP; yields the base URL. CountingHandler.gets counts the requests."""
    CountingHandler.folder = str(tars)
    server = QuietServer(("127.0.0.1", 0), CountingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def http_counts():
    CountingHandler.gets.clear()
    CountingHandler.delay = 0.0
    yield CountingHandler.gets
    CountingHandler.delay = 0.0


@pytest.fixture(scope="module")
def s3_tars(object_store, tars) -> str:
    return object_store.upload(tars, "s3://cache-test/tars")


def moto_gets(object_store, url: str) -> int:
    """The GET requests for `url`'s object that moto's server has logged."""
    path = "/" + url.removeprefix("s3://")
    log = object_store.workdir / f"moto-{object_store.port}.log"
    return sum(f"GET {path} HTTP/" in line for line in log.read_text(errors="replace").splitlines())


def cached_bytes(folder: Path) -> int:
    """What the cache's tars take, those being downloaded included."""
    return sum(p.stat().st_size for p in folder.glob("*-*.tar*") if p.name.endswith((".tar", ".tar.part")))


def run_script(script: str, *args, env: dict | None = None, timeout: float = 60):
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# One process reading one tar through a cache: prints {"sha": ..., "fetched": bytes from the store,
# "waited": seconds the open took}. Starts at time argv[4], so that two start together.
READER = """
import hashlib, json, sys, time
from pathlib import Path
from alexnet_dist.data import store
from alexnet_dist.data.shard_cache import ShardCache
folder, limit, url, start = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
store.size(url)  # the client made and the store reached before the start, as by a loader
while time.time() < start:
    time.sleep(0.005)
cache = ShardCache(Path(folder), limit)
began = time.monotonic()
with cache.open(url) as f:
    waited = time.monotonic() - began
    data = f.read()
print(json.dumps({"sha": hashlib.sha256(data).hexdigest(), "fetched": store.fetched_bytes(), "waited": waited}))
"""


def sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def two_readers(folder: Path, url: str) -> list[dict]:
    start = time.time() + 1.5
    procs = [run_script(READER, folder, 10**9, url, start) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        assert err == ""  # no warning
        results.append(json.loads(out))
    return results


def test_two_processes_download_an_http_tar_once_and_read_the_same_bytes(tmp_path, tars, http_tars, http_counts):
    CountingHandler.delay = 0.5  # the download takes a while: the second process comes during it
    url = f"{http_tars}/000001.tar"
    results = two_readers(tmp_path / "cache", url)
    assert [r["sha"] for r in results] == [sha(tars / "000001.tar")] * 2
    assert http_counts == {"/000001.tar": 1}  # one GET of the file's bytes on this node
    assert sorted(r["fetched"] for r in results) == [0, (tars / "000001.tar").stat().st_size]
    assert max(r["waited"] for r in results) > 0.4  # the one that did not download waited for it
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")) == [
        f"{cache_key(url)}.size",
        f"{cache_key(url)}.tar",
    ]


def test_two_processes_download_an_s3_tar_once_and_read_the_same_bytes(tmp_path, tars, s3_tars, object_store):
    url = f"{s3_tars}/000002.tar"
    results = two_readers(tmp_path / "cache", url)
    assert [r["sha"] for r in results] == [sha(tars / "000002.tar")] * 2
    assert sorted(r["fetched"] for r in results) == [0, (tars / "000002.tar").stat().st_size]
    deadline = time.time() + 5
    while moto_gets(object_store, url) < 1 and time.time() < deadline:
        time.sleep(0.1)  # moto logs a request once it has answered it
    time.sleep(0.2)
    assert moto_gets(object_store, url) == 1


def test_the_cache_stays_under_its_limit_with_more_data_than_it_holds(tmp_path, tars, s3_tars, capfd):
    sizes = [(tars / f"{i:06d}.tar").stat().st_size for i in range(TARS)]
    limit = int(2.5 * max(sizes))
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "000000.tar").write_bytes(b"the user's own" * 100_000)  # a cache_dir that holds other tars
    cache = ShardCache(folder, limit)
    order = list(range(TARS)) + [5, 4, 0, 1, 5, 2]  # recent ones again, and evicted ones
    fetched = store.fetched_bytes()
    for i in order:
        with cache.open(f"{s3_tars}/{i:06d}.tar") as f:
            assert cached_bytes(folder) <= limit
            assert f.read() == (tars / f"{i:06d}.tar").read_bytes()
    # two tars fit: of those read again, 5 and 4 were still there; 0, 1, then 5 and 2 had been evicted
    assert store.fetched_bytes() - fetched == sum(sizes[i] for i in order[:6] + [0, 1, 5, 2])
    assert len(list(folder.glob("*-*.tar"))) == 2 and cached_bytes(folder) <= limit
    assert capfd.readouterr().err == ""

    # everything cached in use by readers: the next tar comes from the store, with one warning
    with cache.open(f"{s3_tars}/000001.tar") as a, cache.open(f"{s3_tars}/000002.tar") as b:
        fetched = store.fetched_bytes()
        for i in (3, 4):
            with cache.open(f"{s3_tars}/{i:06d}.tar") as c:
                assert c.read() == (tars / f"{i:06d}.tar").read_bytes()
        assert store.fetched_bytes() - fetched == sizes[3] + sizes[4]  # streaming counts too
        assert a.read() + b.read() == (tars / "000001.tar").read_bytes() + (tars / "000002.tar").read_bytes()
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"warning: shard cache {folder}: a tar of {sizes[3] / 1e6:.1f} MB does not fit under")
    assert (
        f"its limit of {limit / 1e6:.1f} MB (data.cache_limit_gb), with {(sizes[1] + sizes[2]) / 1e6:.1f} MB of"
        in err[0]
    )
    assert err[0].endswith("; reading such tars from the store")
    assert (folder / "000000.tar").read_bytes() == b"the user's own" * 100_000  # neither counted nor evicted
    assert sorted(folder.glob("*-*.tar")) == sorted(
        folder / f"{cache_key(f'{s3_tars}/{i:06d}.tar')}.tar" for i in (1, 2)
    )

    # a tar larger than the whole limit is read from the store
    small = ShardCache(tmp_path / "small", 1000)
    with small.open(f"{s3_tars}/000000.tar") as f:
        assert f.read() == (tars / "000000.tar").read_bytes()
    assert cached_bytes(tmp_path / "small") == 0
    assert f"a tar of {sizes[0] / 1e6:.1f} MB does not fit under its limit of 0.0 MB (data.cache_limit_gb); read" in (
        capfd.readouterr().err
    )


def test_a_truncated_cached_tar_is_fetched_again(tmp_path, tars, http_tars, http_counts):
    url, original = f"{http_tars}/000003.tar", (tars / "000003.tar").read_bytes()
    cache = ShardCache(tmp_path / "cache", 10**9)
    with cache.open(url) as f:
        assert f.read() == original
    cached = tmp_path / "cache" / f"{cache_key(url)}.tar"
    os.truncate(cached, len(original) // 2)
    with cache.open(url) as f:
        assert f.read() == original
    assert http_counts == {"/000003.tar": 2}
    assert cached.stat().st_size == len(original)
    cached.write_bytes(original[:-512] + b"\0" * 1024)  # too long: damaged as well
    with cache.open(url) as f:
        assert f.read() == original
    assert http_counts == {"/000003.tar": 3}
    with cache.open(url) as f:  # whole: read from the cache
        assert f.read() == original
    assert http_counts == {"/000003.tar": 3}


# Reads tars through a cache with files limited to argv[2] bytes, as on a disk that fills.
DISK_FULL = """
import resource, signal, sys
from pathlib import Path
from alexnet_dist.data.shard_cache import ShardCache
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
cache = ShardCache(Path(sys.argv[1]), 10**9)
for url in sys.argv[3:]:
    with cache.open(url) as f:
        sys.stdout.buffer.write(f.read())
"""


def test_a_disk_that_fills_streams_the_tars_with_one_warning(tmp_path, tars, s3_tars, http_tars):
    urls = [f"{s3_tars}/000004.tar", f"{http_tars}/000005.tar", f"{s3_tars}/000004.tar"]
    proc = subprocess.run(
        [sys.executable, "-c", DISK_FULL, str(tmp_path / "cache"), "100000", *urls], capture_output=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    expected = b"".join((tars / Path(url).name).read_bytes() for url in urls)
    assert proc.stdout == expected
    assert proc.stderr.decode().splitlines() == [
        f"warning: shard cache {tmp_path / 'cache'}: disk full (File too large); reading shards from the store"
    ]
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]  # nothing left


def test_prefetched_tars_are_read_without_fetching_again(tmp_path, tars, http_tars, http_counts):
    urls = [f"{http_tars}/{i:06d}.tar" for i in range(4)]
    CountingHandler.delay = 0.5  # each download takes a while
    with ShardCache(tmp_path / "cache", 10**9, ahead=2) as cache:
        started = time.monotonic()
        cache.prefetch(urls)  # the first two only: ahead=2
        assert time.monotonic() - started < 0.3  # it does not wait
        deadline = time.time() + 10
        while len(list((tmp_path / "cache").glob("*.tar"))) < 2 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        assert http_counts == {"/000000.tar": 1, "/000001.tar": 1}
        fetched = store.fetched_bytes()
        for i in (0, 1):
            with cache.open(urls[i]) as f:
                assert f.read() == (tars / f"{i:06d}.tar").read_bytes()
        assert store.fetched_bytes() == fetched and http_counts == {"/000000.tar": 1, "/000001.tar": 1}

        # a reader that comes while its tar is being prefetched waits for that download
        cache.prefetch(urls[1:])  # 1 is there: 2 and 3 are fetched
        time.sleep(0.1)
        with cache.open(urls[2]) as f:
            assert f.read() == (tars / "000002.tar").read_bytes()
    assert http_counts["/000002.tar"] == 1


# Prefetches a slow tar, forks a child that outlives the download, and opens the tar in a third
# process: the child's copies of the cache's lock files hold no lock.
FORKED = """
import os, sys, time, subprocess
from pathlib import Path
from alexnet_dist.data.shard_cache import ShardCache
folder, url = Path(sys.argv[1]), sys.argv[2]
cache = ShardCache(folder, 10**9)
cache.prefetch([url])
while not list(folder.glob("*.part")):
    time.sleep(0.01)
child = os.fork()
if child == 0:
    time.sleep(6)
    os._exit(0)
reader = "import sys; from alexnet_dist.data.shard_cache import ShardCache as C; C(sys.argv[1], 9**9).open(sys.argv[2])"
started = time.monotonic()
subprocess.run([sys.executable, "-c", reader, str(folder), url], check=True, timeout=30)
print(time.monotonic() - started)
os.kill(child, 9)
os.waitpid(child, 0)
"""


def test_a_forked_loader_worker_holds_none_of_the_caches_locks(tmp_path, tars, http_tars, http_counts):
    CountingHandler.delay = 1.0
    proc = subprocess.run(
        [sys.executable, "-c", FORKED, str(tmp_path / "cache"), f"{http_tars}/000004.tar"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout) < 4  # the download's second, not the child's six
    assert http_counts == {"/000004.tar": 1}


def test_local_tars_are_read_in_place_and_the_settings_make_the_cache(tmp_path, tars, http_tars):
    cache = ShardCache(tmp_path / "cache", 10**9)
    with cache.open(str(tars / "000000.tar")) as f:
        assert f.name == str(tars / "000000.tar")
    with cache.local(str(tars / "000000.tar")) as path:
        assert path == str(tars / "000000.tar")
    with cache.local(f"{http_tars}/000000.tar") as path:  # for DALI: a local file while in the block
        assert Path(path).read_bytes() == (tars / "000000.tar").read_bytes()
        assert Path(path).parent == tmp_path / "cache"
    assert list((tmp_path / "cache").glob("*.tar")) == [Path(path)]
    with cache.open(f"{http_tars}/000001.tar") as f:  # downloaded, and named as its cached copy
        assert f.name == str(tmp_path / "cache" / f"{cache_key(f'{http_tars}/000001.tar')}.tar")
    fetched = store.fetched_bytes()
    with store.open_file(f"{http_tars}/000002.tar") as f:  # a server that ignores Range: skipped bytes count
        f.seek(1000)
        assert f.read() == (tars / "000002.tar").read_bytes()[1000:]
    assert store.fetched_bytes() - fetched == (tars / "000002.tar").stat().st_size
    with pytest.raises(store.Missing, match="no-such.tar: no such file"):
        cache.open(f"{http_tars}/no-such.tar")

    assert ShardCache.of(make(Data, {"root": "/data"})) is None
    made = ShardCache.of(make(Data, {"root": "/d", "cache_dir": str(tmp_path / "c"), "cache_limit_gb": 2.5}))
    assert (made.folder, made.limit, made.ahead) == (tmp_path / "c", 2_500_000_000, 2)
