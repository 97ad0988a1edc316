"""Stores that answer but trickle or stall (docs/reliability.md, "Slow stores"): every remote read
has a deadline and a minimum rate (config.StoreLimits, made short here through ALEXNET_STORE_*),
`alexnet-prepare index` stops within the bound it prints, and a training run that waits for data
honours SIGTERM with the checkpoint of its last finished step."""

import http.server
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli, start_cli
from test_index import good, write_tars

from alexnet_dist.config import StoreLimits
from alexnet_dist.data import sources, store
from alexnet_dist.data.index import index_shards
from alexnet_dist.data.shards import write_dataset
from alexnet_dist.errors import ConfigError, DataError

SHORT = {"ALEXNET_STORE_DEADLINE_S": "1", "ALEXNET_STORE_MIN_RATE_KBS": "64", "ALEXNET_STORE_WAITS": "0.1,0.2"}


class SlowStore(http.server.ThreadingHTTPServer):
    """Serves a folder over HTTP with Range, on a free port of 127.0.0.1. Files whose name
    matches `slow` (a regex; None: none) are answered with their headers and `head` bytes, then
    one byte every `gap` seconds ("trickle") or nothing more ("stall"); `served` counts the bytes
    sent of files that are not slow, so a test can turn it slow once training has begun."""

    daemon_threads = True

    def __init__(self, folder: Path, mode: str = "trickle", gap: float = 0.4, head: int = 100):
        super().__init__(("127.0.0.1", 0), Handler)
        self.folder, self.mode, self.gap, self.head = folder, mode, gap, head
        self.slow, self.served, self.closing = None, 0, threading.Event()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.closing.set()
        self.shutdown()
        self.server_close()


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server: SlowStore = self.server
        path = server.folder / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start, end = 0, len(data)
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if ranged:
            start, end = int(ranged[1]), int(ranged[2]) + 1 if ranged[2] else len(data)
        self.send_response(206 if ranged else 200)
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        body = data[start:end]
        try:
            if not (server.slow and re.search(server.slow, path.name)):
                self.wfile.write(body)
                server.served += len(body)
                return
            self.wfile.write(body[: server.head])
            self.wfile.flush()
            for byte in body[server.head :]:
                if server.closing.wait(server.gap) or server.mode == "stall":
                    server.closing.wait() if server.mode == "stall" else None
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
        except OSError:  # the reader gave up and closed the connection
            pass


@pytest.fixture
def short_limits(monkeypatch):
    """This process's store limits as the SHORT variables give them to a command."""
    for key, value in SHORT.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(store, "_limits", None)
    assert store.limits() == StoreLimits(deadline_s=1.0, min_rate_kbs=64.0, waits=[0.1, 0.2])


@pytest.mark.parametrize(
    "variable, value, expected",
    [
        ("DEADLINE_S", "abc", "deadline_s: Value 'abc' of type 'str' could not be converted to Float"),
        ("WAITS", "1,x", "waits[1]: Value 'x' of type 'str' could not be converted to Float"),
        ("MIN_RATE_KBS", "0", "the deadline and the rate must be above 0, the waits 0 or more"),
    ],
)
def test_a_bad_store_limit_is_one_line_naming_the_variable(monkeypatch, variable, value, expected):
    monkeypatch.setenv(f"ALEXNET_STORE_{variable}", value)
    monkeypatch.setattr(store, "_limits", None)
    with pytest.raises(ConfigError) as caught:
        store.size("http://127.0.0.1:9/x.tar")
    message = str(caught.value)
    assert message.startswith(f"ALEXNET_STORE_{variable}={value}: ") and expected in message, message
    assert message.endswith("; give numbers: seconds (the waits comma-separated), a rate in kB/s")
    monkeypatch.setattr(store, "_limits", None)  # the next test reads its own


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> Path:
    """24 training samples in 4 tars and 6 validation samples in 1."""
    folder = tmp_path_factory.mktemp("slow")
    write_tars(folder / "train", [good(f"t{i:03d}", i % 3) for i in range(24)], per_tar=6)
    write_tars(folder / "val", [good(f"v{i:03d}", i % 3) for i in range(6)], per_tar=6)
    return folder


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "mode, slow, workers",
    [
        ("trickle", r"shard-000001", 1),  # one tar trickles, read alone
        ("stall", r"shard-000002", 2),  # one tar stalls after its first bytes, read beside another
        ("trickle", r"shard-00000[0-3]", 3),  # every train tar trickles, three read at once
    ],
)
def test_index_over_a_trickling_or_stalled_store_stops_within_the_bound_it_prints(
    tars, tmp_path, short_limits, mode, slow, workers
):
    server = SlowStore(tars, mode=mode, gap=0.3, head=2000)
    server.slow = slow
    started = time.monotonic()
    try:
        with pytest.raises(DataError) as caught:
            index_shards(
                f"{server.url}/train/shard-{{000000..000003}}.tar",
                f"{server.url}/val/shard-000000.tar",
                tmp_path / "out",
                workers=workers,
            )
        took = time.monotonic() - started
    finally:
        server.close()
    message = str(caught.value)
    found = re.fullmatch(
        rf"{re.escape(server.url)}/train/shard-00000\d\.tar: cannot be read \((.*)\) after 3 tries over (\d+) s; "
        r"check that the store is reachable, then run the same command again \(.*\)",
        message,
    )
    assert found, message
    assert re.search(slow, message)
    assert found[1].startswith("too slow: ") if mode == "trickle" else "timed out" in found[1], found[1]
    # the tries: 3 reads of at most 1 s + 1 MiB / 64 kB/s, waits of 0.3 s; then the other threads stop
    # within one socket timeout (1 s), so the command ends when its line says, not a tar later
    assert int(found[2]) <= StoreLimits(1.0, 64.0, [0.1, 0.2]).bound(1 << 20)
    assert took <= int(found[2]) + 1 + 2.5, (took, message)
    assert not (tmp_path / "out" / "manifest.json").exists()


ARGS = ["experiment=smoke", "logger=csv", "+trainer.enable_progress_bar=false", "trainer.max_epochs=1"]
STEPS = 15  # 480 images, batch 32


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    write_dataset(sources.synthetic(10, 480, 64, 32), root, source_name="synthetic", progress=False)
    return root


def saved_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


def steps_saved(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.name[5:14]) for p in ckpt_dir.glob("step-*.ckpt")) if ckpt_dir.exists() else []


def start_training(tmp_path, root_url, loader, env, *extra):
    args = [*ARGS, f"loader={loader}", f"data.root={root_url}", "run_id=slow", *extra]
    return start_cli("alexnet-train", *args, cwd=tmp_path, env=env)


def slow_once_trained(server: SlowStore, proc, ckpt_dir: Path, slow: str) -> None:
    """Once the run has saved step 5, every file matching `slow` is answered slowly."""
    deadline = time.time() + 120
    while not steps_saved(ckpt_dir) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    assert steps_saved(ckpt_dir), "no checkpoint appeared"
    server.slow = slow


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_root) -> dict:
    """The weights of a run from the local shards, never stopped: what a resumed run must equal."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    run_cli("alexnet-train", *ARGS, "loader=wds", f"data.root={small_root}", "run_id=local", cwd=cwd, env=env)
    return final_weights(cwd / "runs/smoke/local")


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "loader, mode, signals",
    [
        ("wds", "stall", ["SIGTERM"]),
        ("dali", "trickle", ["SIGTERM"]),
        ("dali", "stall", ["SIGTERM", "SIGTERM"]),  # sent twice, as in the issue: the same end
        ("wds", "trickle", ["SIGINT", "SIGINT"]),  # Ctrl-C twice: at once, one line, no traceback
    ],
)
def test_a_stop_signal_while_training_waits_for_a_slow_store_saves_the_last_step_and_exits(
    tmp_path, small_root, cli_env, loader, mode, signals, request
):
    """The store's limits stay the defaults (a stalled read waits 20 s a try, minutes in all): the
    signal, not the store's failure, must end the wait."""
    server = SlowStore(small_root, mode=mode, gap=1.0, head=0)
    try:
        proc = start_training(tmp_path, server.url, loader, cli_env)
        ckpt_dir = tmp_path / "runs/smoke/slow/checkpoints"
        slow_once_trained(server, proc, ckpt_dir, r"\.tar$")
        time.sleep(4)  # the batches read ahead are trained on; then the run waits for the store
        assert proc.poll() is None, proc.communicate()
        for name in signals:
            os.kill(proc.pid, getattr(signal, name))  # the training process only, as `kill PID`
            time.sleep(0.1)
        sent = time.time()
        out, err = proc.communicate(timeout=60)
        took = time.time() - sent
    finally:
        server.close()
    code = 128 + getattr(signal, signals[0])
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    assert took < 15, took
    last = err.strip().splitlines()[-1]
    if last.startswith(f"error: stopped by {signals[0]} at once"):  # the second Ctrl-C came during the save
        assert signals == ["SIGINT", "SIGINT"] and last.endswith("without a new checkpoint; the last saved one is kept")
        return
    step = int(re.search(rf"^stopped by {signals[0]}: checkpoint saved at step (\d+)$", out, re.M)[1])
    assert 5 <= step < STEPS
    assert saved_step(ckpt_dir.parent) == step == max(steps_saved(ckpt_dir))
    assert last == (
        f"error: stopped by {signals[0]} at step {step}, before the end; the checkpoint is saved: run the same "
        "command again to resume"
    )
    if loader == "wds" and mode == "stall":  # the checkpoint is whole: resumed, the run ends as one never stopped
        server = SlowStore(small_root)
        try:
            out = run_cli(
                "alexnet-train",
                *ARGS,
                "loader=wds",
                f"data.root={server.url}",
                "run_id=slow",
                cwd=tmp_path,
                env=cli_env,
            )
        finally:
            server.close()
        assert f"resuming from {ckpt_dir}/last.ckpt" in out.stdout
        assert saved_step(ckpt_dir.parent) == STEPS
        for name, tensor in request.getfixturevalue("uninterrupted").items():
            assert torch.equal(final_weights(ckpt_dir.parent)[name], tensor), name


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("loader, mode", [("wds", "trickle"), ("dali", "stall")])
def test_training_over_a_store_that_slows_to_a_trickle_stops_in_one_line_within_its_limits(
    tmp_path, small_root, cli_env, loader, mode
):
    server = SlowStore(small_root, mode=mode, gap=0.3, head=0)
    try:
        proc = start_training(tmp_path, server.url, loader, {**cli_env, **SHORT})
        ckpt_dir = tmp_path / "runs/smoke/slow/checkpoints"
        slow_once_trained(server, proc, ckpt_dir, r"^0000\d\d\.tar$")
        slowed = time.time()
        out, err = proc.communicate(timeout=120)
        took = time.time() - slowed
    finally:
        server.close()
    assert proc.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    why = "too slow: " if mode == "trickle" else "timed out"
    assert re.fullmatch(
        rf"error: {re.escape(server.url)}/train/0000\d\d\.tar: cannot be read \({why}.*\) after 3 tries over \d+ s; "
        r"check that the store is reachable, then run the same command again \(a training run resumes from its "
        r"last checkpoint\)",
        last,
    ), last
    assert "Traceback" not in err, err[-3000:]
    assert took < StoreLimits(1.0, 64.0, [0.1, 0.2]).bound(8192) + 10, took
    assert saved_step(ckpt_dir.parent) >= 5  # the last checkpoint is kept
