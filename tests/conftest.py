import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from alexnet_dist.data import sources
from alexnet_dist.data.shards import write_dataset

BIN = Path(sys.executable).parent


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
