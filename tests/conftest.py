import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# Imported here, at the start of the session: Lightning binds its log handler to the stderr of the
# moment of import, which must not be one test's captured stream (train_here).
from alexnet_dist.cli import train as train_cli
from alexnet_dist.data import sources
from alexnet_dist.data.shards import write_dataset

BIN = Path(sys.executable).parent


# The longest tests, started first so that no worker is left running one alone at the end.
LONGEST_FIRST = ("slurm", "test_install.py", "test_gpu_check.py")


def pytest_collection_modifyitems(items):
    """The SLURM tests run one after another on one pytest-xdist worker (the local cluster's two
    nodes hold one job at a time), and the longest tests come first."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))

    def rank(item) -> int:
        tags = ["slurm"] if item.get_closest_marker("slurm") else [item.path.name]
        return next((i for i, name in enumerate(LONGEST_FIRST) if name in tags), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: the rest keep their order


def pytest_configure(config):
    """Each process that runs tests (each pytest-xdist worker, and what it starts) compiles into an
    inductor cache of its own: two compiling at once into one cache broke a precompiled header.
    (The controller of the workers runs no test; the workers would inherit its environment.)"""
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        folder = tempfile.mkdtemp(prefix="inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
        config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """2000 + 500 learnable synthetic images in 8 + 8 shards, shared by the whole session."""
    root = tmp_path_factory.mktemp("synthetic")
    write_dataset(sources.synthetic(10, 2000, 500, 32), root, source_name="synthetic", progress=False)
    return root


@pytest.fixture
def cli_env(tmp_path) -> dict:
    """An environment for CLI subprocesses: W&B offline, nothing written to the home directory."""
    env = dict(os.environ)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        env[var] = str(tmp_path / "wandb-home")
    env["WANDB_MODE"] = "offline"
    env["WANDB_SILENT"] = "true"
    env.pop("SLURM_JOB_ID", None)
    env.pop("SLURM_NTASKS", None)
    env["ALEXNET_VENV"] = str(BIN.parent)  # the launch scripts take alexnet-train and torchrun from there
    return env


def wandb_records(path: Path):
    """The records of an offline W&B run file (run-<id>.wandb): a ':W&B' header, then 32 KiB
    blocks of length-prefixed chunks (4-byte checksum, 2-byte length, 1-byte kind: 1 whole, 2 first,
    3 middle, 4 last) that make up serialised protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, parts = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room for a chunk header: the block is padded
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def start_cli(name: str, *args, cwd: Path, env: dict) -> subprocess.Popen:
    """A command started in a session of its own (so a test can signal its whole process group,
    loader workers included), its output piped as text."""
    return subprocess.Popen(
        [str(BIN / name), *map(str, args)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@dataclass
class Outcome:
    """How a command run inside the test process ended: its exit status and what it printed."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def train_here(tmp_path, monkeypatch, capsys, cli_env):
    """alexnet-train run inside the test process, from tmp_path, as a user's command line would run
    it (Hydra's own main, the one-line errors, exit status): for what is decided before or as
    training starts, without paying for a new Python that imports torch each time. Training itself,
    DDP and signals are tested through real processes (run_cli)."""
    from hydra.core.global_hydra import GlobalHydra

    def run(*args) -> Outcome:
        monkeypatch.chdir(tmp_path)
        for key in set(os.environ) - set(cli_env):
            monkeypatch.delenv(key)
        for key, value in cli_env.items():
            if os.environ.get(key) != value:
                monkeypatch.setenv(key, value)
        monkeypatch.setattr(sys, "argv", ["alexnet-train", *map(str, args)])
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
        root_handlers = logging.root.handlers[:]  # Hydra sets its own, on this test's captured streams
        capsys.readouterr()
        GlobalHydra.instance().clear()
        try:
            train_cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            GlobalHydra.instance().clear()
            logging.root.handlers[:] = root_handlers
            for signum, handler in handlers.items():  # the training installs its own
                signal.signal(signum, handler)
        out = capsys.readouterr()
        return Outcome(code, out.out, out.err)

    return run


def run_here(main, *args, capsys, check: bool = True) -> Outcome:
    """A command's main (alexnet-eval's, -export's, ...: what its console script calls) run inside
    the test process with these arguments, its output captured: for commands that load a large
    network, without paying for a new Python that imports torch each time."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    if check and code != 0:
        raise AssertionError(f"{main.__module__} {' '.join(map(str, args))} exited {code}\nstderr:\n{out.err[-5000:]}")
    return Outcome(code, out.out, out.err)


def run_cli(
    name: str, *args, cwd: Path, env: dict, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / name), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{name} {' '.join(map(str, args))} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
        )
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the server exited {proc.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class ObjectStore:
    """A real S3-compatible server (moto's standalone server) on 127.0.0.1, in its own process,
    and the environment that points AWS clients (boto3, DALI's AWS SDK) at it."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self.workdir, self.proc = workdir, None
        self.start()

    def start(self) -> None:
        log = open(self.workdir / f"moto-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)], stdout=log, stderr=log
        )
        wait_for_port(self.port, self.proc)

    def stop(self) -> None:
        """The server gone, with everything it held (moto keeps objects in memory)."""
        self.proc.kill()
        self.proc.wait()

    def client(self):
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.env["AWS_ENDPOINT_URL"],
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        )

    def upload(self, folder: Path, url: str) -> str:
        """Every file under `folder` to s3://BUCKET/PREFIX (the bucket made when new); returns the URL."""
        bucket, _, prefix = url[len("s3://") :].partition("/")
        client = self.client()
        if bucket not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
            client.create_bucket(Bucket=bucket)
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix.rstrip('/')}/{path.relative_to(folder)}".lstrip("/"))
        return url.rstrip("/")


@pytest.fixture(scope="session")
def object_store(tmp_path_factory):
    store = ObjectStore(tmp_path_factory.mktemp("s3"))
    saved = {k: os.environ.get(k) for k in store.env}
    os.environ.update(store.env)  # for the test process itself; CLI subprocesses inherit it
    yield store
    store.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def http_server(tmp_path_factory):
    """python -m http.server on 127.0.0.1 serving a folder; yields (folder, base URL)."""
    folder = tmp_path_factory.mktemp("www")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", "-b", "127.0.0.1", "-d", str(folder), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, proc)
    yield folder, f"http://127.0.0.1:{port}"
    proc.kill()
    proc.wait()
