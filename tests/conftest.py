import os
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
    return env


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
