"""Elastic and exact: a run stopped mid-epoch (SIGTERM or kill -9) and resumed on another number of
processes, with other loader workers or the other loader, trains the very global batches an
uninterrupted run trains, each sample of an epoch exactly once; the trace (data.trace) shows it.
A resume on a number of processes the order does not allow stops in one line."""

import json
import os
import random
import signal
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import run_cli, start_cli
from test_resume import wait_for_step_file

from alexnet_dist.data import sources
from alexnet_dist.data.shards import write_dataset

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("elastic")]
STEPS = 12  # 192 training images, global batch 16
ARGS = [
    "experiment=smoke",
    "logger=csv",
    "+trainer.enable_progress_bar=false",
    "trainer.max_epochs=2",
    "data.batch_size=16",
    "checkpoint.every_n_steps=2",
]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("elastic")
    write_dataset(sources.synthetic(8, 192, 32, 32), root, source_name="synthetic", min_shards=6, progress=False)
    return root


def world(n: int, loader: str, workers: int = 0) -> list[str]:
    extra = ["trainer.strategy=ddp"] if n > 1 else []
    own = f"loader.workers={workers}" if loader == "wds" else "loader.threads=1"
    return [f"trainer.devices={n}", f"loader={loader}", own, *extra]


def batches(trace: Path) -> dict[int, list[str]]:
    """The trace as global batches: step -> the keys every rank read for it."""
    steps = defaultdict(list)
    for path in trace.glob("rank-*.jsonl"):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            steps[entry["step"]] += entry["keys"]
    return dict(steps)


@pytest.fixture(scope="module")
def reference(small, tmp_path_factory) -> dict[int, list[str]]:
    """One process, never stopped."""
    cwd = tmp_path_factory.mktemp("ref")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    run_cli("alexnet-train", *ARGS, *world(1, "wds"), f"data.root={small}", f"data.trace={cwd}/trace", cwd=cwd, env=env)
    steps = batches(cwd / "trace")
    assert sorted(steps) == list(range(2 * STEPS))
    for epoch in range(2):  # each sample once an epoch, in batches of 16
        keys = [k for s in range(epoch * STEPS, (epoch + 1) * STEPS) for k in steps[s]]
        assert len(keys) == len(set(keys)) == 192 and all(len(steps[s]) == 16 for s in steps)
    return steps


def assert_same_training(trace: Path, reference: dict) -> None:
    steps = batches(trace)
    assert sorted(steps) == sorted(reference)  # every step once: none repeated, none missing
    for step, keys in reference.items():
        assert sorted(steps[step]) == sorted(keys), f"step {step}"


@pytest.mark.parametrize(
    "first, stop, then",
    [
        (world(2, "wds", 2), signal.SIGTERM, world(4, "dali")),
        (world(4, "dali"), signal.SIGKILL, world(1, "wds", 3)),
    ],
    ids=["2 wds, SIGTERM, 4 dali", "4 dali, kill -9, 1 wds"],
)
def test_a_run_stopped_mid_epoch_resumes_on_another_world_with_the_same_batches(
    small, reference, tmp_path, cli_env, first, stop, then
):
    trace = tmp_path / "trace"
    args = [*ARGS, f"data.root={small}", "run_id=cut", f"data.trace={trace}"]
    at = random.randrange(STEPS + 1, 2 * STEPS - 3)  # a step inside the second epoch
    proc = start_cli("alexnet-train", *args, *first, cwd=tmp_path, env=cli_env)
    wait_for_step_file(tmp_path / "runs/smoke/cut/checkpoints", at, proc, timeout=240)
    os.killpg(proc.pid, stop)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == (143 if stop == signal.SIGTERM else -9), err[-3000:]
    # 3 processes cannot divide a global batch of 16: refused in one line, nothing trained
    refused = run_cli("alexnet-train", *args, *world(3, "wds"), cwd=tmp_path, env=cli_env, check=False)
    assert refused.returncode != 0
    assert "error: 3 processes cannot share this run's order of samples" in refused.stderr
    assert "it trains on 1, 2, 4, 8, 16 processes" in refused.stderr, refused.stderr[-2000:]
    run_cli("alexnet-train", *args, *then, cwd=tmp_path, env=cli_env, timeout=400)
    assert_same_training(trace, reference)
