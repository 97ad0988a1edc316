"""Shards on object storage and behind HTTP, read over real sockets: a moto S3 server and
python -m http.server on 127.0.0.1 (fixtures in conftest.py). Training from them gives the very
weights training from the local copy gives, a SIGKILLed run resumes bit-identically, and a store
that goes away stops the run in one line within the retry bound, its checkpoint kept."""

import http.server
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import ObjectStore, run_cli, start_cli

from alexnet_dist.config import StoreLimits
from alexnet_dist.data import store
from alexnet_dist.errors import DataError

# one pytest-xdist worker runs them all: the local runs, the S3 server and the upload are made once
pytestmark = pytest.mark.xdist_group("remote")
ARGS = ["experiment=smoke", "logger=csv", "+trainer.enable_progress_bar=false", "trainer.max_epochs=1"]
STEPS = 62  # 2000 images, batch 32


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == STEPS
    for name, tensor in b["state_dict"].items():
        assert torch.equal(a["state_dict"][name], tensor), name


# Session-scoped: tests of other modules run between these on the same worker, and a module-scoped
# fixture would be made again after each such interleaving (two trainings each time).
@pytest.fixture(scope="session")
def local_runs(tmp_path_factory, synthetic_root, store_env):
    """Uninterrupted runs from the local shards, one per loader: what every remote run must equal."""
    cwd = tmp_path_factory.mktemp("local")
    for loader in ("wds", "dali"):
        run_cli(
            "alexnet-train",
            *ARGS,
            f"loader={loader}",
            f"data.root={synthetic_root}",
            f"run_id={loader}",
            cwd=cwd,
            env=store_env,
        )
    return {loader: final_weights(cwd / "runs/smoke" / loader) for loader in ("wds", "dali")}


@pytest.fixture(scope="session")
def store_env(object_store) -> dict:
    """The test process's environment (the S3 server's AWS_* variables included), no SLURM job."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


@pytest.fixture(scope="module")
def s3_shards(object_store, synthetic_root) -> str:
    return object_store.upload(synthetic_root, "s3://shards/synthetic")


def wait_for_checkpoint(ckpt_dir: Path, proc, min_step: int, timeout: float = 180) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.name[5:14]) for p in ckpt_dir.glob("step-*.ckpt")] if ckpt_dir.exists() else []
        if steps and max(steps) >= min_step:
            return max(steps)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["wds", "dali"])
def test_training_from_s3_killed_and_resumed_equals_training_from_local_disk(
    tmp_path, s3_shards, local_runs, store_env, loader
):
    """The DALI run reads through a shard cache (data.cache_dir), the webdataset run streams."""
    cache = tmp_path / "cache"
    args = [*ARGS, f"loader={loader}", f"data.root={s3_shards}", "run_id=s3"]
    args += [f"data.cache_dir={cache}"] if loader == "dali" else []
    proc = start_cli("alexnet-train", *args, cwd=tmp_path, env=store_env)
    ckpt_dir = tmp_path / "runs/smoke/s3/checkpoints"
    wait_for_checkpoint(ckpt_dir, proc, min_step=20)  # mid-epoch (62 steps), saved every 5
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, loader workers too
    proc.communicate()
    saved = final_weights(ckpt_dir.parent)["global_step"]
    assert 20 <= saved < STEPS
    out = run_cli("alexnet-train", *args, cwd=tmp_path, env=store_env)
    assert f"resuming from {ckpt_dir}/last.ckpt" in out.stdout
    assert_same_weights(final_weights(ckpt_dir.parent), local_runs[loader])
    if loader == "dali":  # the 8 + 8 tars were read from the cache
        assert len([p for p in cache.glob("*.tar") if not p.name.endswith(".idx.tar")]) == 16
        assert "notice: the shards are remote" not in out.stderr
    else:
        assert "notice: the shards are remote (s3://shards/synthetic/" in out.stderr


@pytest.mark.slow
def test_dali_trains_over_http_as_from_local_disk(tmp_path, http_server, synthetic_root, local_runs, store_env):
    """Both loaders read samples through the same Python reader, so DALI takes http(s):// too."""
    folder, base = http_server
    shutil.copytree(synthetic_root, folder / "synthetic")
    url = f"{base}/synthetic"
    out = run_cli("alexnet-train", *ARGS, "loader=dali", f"data.root={url}", "run_id=http", cwd=tmp_path, env=store_env)
    assert "notice: the shards are remote" in out.stderr and "data.cache_dir=" in out.stderr
    assert_same_weights(final_weights(tmp_path / "runs/smoke/http"), local_runs["dali"])


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["wds", "dali"])
def test_a_store_gone_mid_epoch_stops_the_run_in_one_line_and_keeps_its_checkpoint(
    tmp_path, synthetic_root, store_env, loader
):
    server = ObjectStore(tmp_path)  # its own server: this test stops it
    try:
        url = server.upload(synthetic_root, "s3://gone/synthetic")
        env = {**store_env, **server.env}
        args = [*ARGS, f"loader={loader}", f"data.root={url}", "run_id=gone"]
        proc = start_cli("alexnet-train", *args, cwd=tmp_path, env=env)
        ckpt_dir = tmp_path / "runs/smoke/gone/checkpoints"
        step = wait_for_checkpoint(ckpt_dir, proc, min_step=5)
        server.stop()
        stopped = time.time()
        out, err = proc.communicate(timeout=180)
        took = time.time() - stopped
    finally:
        server.stop()
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 2, err[-3000:]
    assert last.startswith("error: ") and "s3://gone/synthetic/" in last and "Traceback" not in err, err[-3000:]
    assert took < sum(store.limits().waits) + 60, took  # the retries' waits, plus the requests' own time-outs
    assert final_weights(ckpt_dir.parent)["global_step"] >= step  # the last checkpoint is kept, whole


def test_a_missing_remote_manifest_or_file_is_one_line(object_store, s3_shards):
    from alexnet_dist.data.manifest import Manifest

    with pytest.raises(DataError, match=r"^s3://shards/none/manifest.json: missing; .*alexnet-prepare"):
        Manifest.read("s3://shards/none")
    with pytest.raises(store.Missing, match=r"^s3://shards/synthetic/train/nope.tar: no such file"):
        store.open_file("s3://shards/synthetic/train/nope.tar")
    manifest = Manifest.read(s3_shards + "/")
    assert manifest.root == s3_shards and manifest.count("train") == 2000
    assert manifest.shards("val")[0].tar == f"{s3_shards}/val/000000.tar"
    manifest.check_share(0, 1)  # every shard's size and index file, over the wire


def test_remote_files_read_as_local_ones_from_any_position(object_store, s3_shards, synthetic_root, http_server):
    folder, base = http_server
    shutil.copy(synthetic_root / "train/000003.tar", folder / "t.tar")
    local = (synthetic_root / "train/000003.tar").read_bytes()
    for url in (f"{s3_shards}/train/000003.tar", f"{base}/t.tar"):
        assert store.size(url) == len(local)
        with store.open_file(url, buffer=4096) as f:
            assert f.read(100) == local[:100]
            f.seek(50_000)
            assert f.read(10_000) == local[50_000:60_000]
            f.seek(-10, os.SEEK_END)
            assert f.read() == local[-10:] and f.read() == b""
        assert store.read_bytes(url) == local


def test_a_refused_connection_is_tried_again_then_named_in_one_line(monkeypatch):
    monkeypatch.setattr(store, "_limits", StoreLimits(waits=[0.01, 0.02]))
    with pytest.raises(DataError) as caught:
        store.size("http://127.0.0.1:9/x.tar")  # the discard port: nothing listens
    message = str(caught.value)
    assert message.startswith("http://127.0.0.1:9/x.tar: cannot be read (") and "after 3 tries over 0 s" in message
    assert "\n" not in message


def test_expand_names_brace_patterns_prefixes_and_folders(object_store, s3_shards, synthetic_root):
    assert store.expand(f"{s3_shards}/train/") == [f"{s3_shards}/train/{i:06d}.tar" for i in range(8)]
    assert store.expand(f"{s3_shards}/val/{{000000..000002}}.tar") == [f"{s3_shards}/val/{i:06d}.tar" for i in range(3)]
    assert store.expand(str(synthetic_root / "val")) == [str(synthetic_root / f"val/{i:06d}.tar") for i in range(8)]
    with pytest.raises(DataError, match="an HTTP server lists no folders; name the tars with a brace pattern"):
        store.expand("http://127.0.0.1:9/shards/")


def test_the_loader_benchmark_gives_the_remote_to_local_ratio_in_one_run(
    tmp_path, s3_shards, synthetic_root, store_env
):
    out = run_cli(
        "alexnet-bench",
        "loader",
        "--data",
        s3_shards,
        "--against",
        synthetic_root,
        "--loader",
        "wds",
        "--device",
        "cpu",
        "--batch-size",
        "32",
        "--size",
        "28",
        "--steps",
        "5",
        "--warmup",
        "1",
        "--workers",
        "1",
        cwd=tmp_path,
        env=store_env,
    )
    remote, local, ratio = (json.loads(line) for line in out.stdout.strip().splitlines())
    assert (remote["data"], local["data"]) == (s3_shards, str(synthetic_root))
    assert remote["images"] == local["images"] == 5 * 32
    assert ratio["name"] == "loader/wds/ratio" and (ratio["data"], ratio["against"]) == (s3_shards, str(synthetic_root))
    assert ratio["ratio"] == round(remote["images_per_sec"] / local["images_per_sec"], 3)


class CuttingHandler(http.server.BaseHTTPRequestHandler):
    """Serves one file with Range support; the first answer to a read of its body is cut after
    100,000 bytes, as a dropped connection would cut it."""

    data, cut, requests = b"", [True], []

    def do_GET(self):
        start, end = 0, len(self.data) - 1
        if found := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
            start, end = int(found[1]), int(found[2] or end)
        self.requests.append((start, end))
        self.send_response(206 if self.headers.get("Range") else 200)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(self.data)}")
        self.end_headers()
        body = self.data[start : end + 1]
        if self.cut[0] and len(body) > 100_000:
            self.cut[0] = False
            self.wfile.write(body[:100_000])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the rest never comes
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_read_cut_mid_way_goes_on_from_the_byte_it_stopped_at(synthetic_root):
    CuttingHandler.data = (synthetic_root / "train/000000.tar").read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CuttingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/000000.tar"
        assert store.read_bytes(url) == CuttingHandler.data
    finally:
        server.shutdown()
    reads = [r for r in CuttingHandler.requests if r != (0, 0)]  # (0, 0): the size, from the first byte
    assert reads == [(0, len(CuttingHandler.data) - 1), (100_000, len(CuttingHandler.data) - 1)]
