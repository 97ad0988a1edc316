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
from helpers.shards import data_module
from test_resume import wait_for_step_file

from alexnet_dist.data import sources
from alexnet_dist.data.shards import write_dataset
from alexnet_dist.data.trace import Trace
from alexnet_dist.errors import ConfigError

pytestmark = pytest.mark.xdist_group("elastic")
STEPS = 12  # 192 training images, global batch 16
ARGS = [
    "experiment=smoke",
    "logger=csv",
    "+trainer.enable_progress_bar=false",
    "trainer.max_epochs=2",
    "data.batch_size=16",
    "data.partitions=4",  # the order in 4 parts: 1, 2 or 4 processes
    "checkpoint.every_n_steps=2",
]


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
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


def global_batches(root, world: int, loader: dict, epoch: int = 1, done: int = 0) -> list[set]:
    """Each global batch of the pass from batch `done` of `epoch`, as the set of its keys: every
    rank's loader built as the data module builds it, their batches put together."""
    per_rank = []
    for rank in range(world):
        dm = data_module(root, loader, rank=rank, world=world, epoch=epoch, done=done, batch_size=16, crop=28)
        per_rank.append([{f"{tar}:{key}" for tar, key in batch.keys} for batch in dm.train_dataloader()])
    return [set().union(*parts) for parts in zip(*per_rank, strict=True)]


def test_the_global_batches_are_the_same_for_every_world_loader_workers_and_start(small):
    """In process, for speed: 1, 2 and 4 ranks, both loaders, 0 to 3 workers, starting at batch 0 or 5."""
    whole = global_batches(small, 1, {"name": "wds", "workers": 0})
    assert len(whole) == STEPS and all(len(b) == 16 for b in whole)
    assert len(set().union(*whole)) == 192  # each sample once in the epoch
    assert global_batches(small, 1, {"name": "wds", "workers": 0}, epoch=2) != whole  # a new order each epoch
    for world, loader, done in [
        (2, {"name": "wds", "workers": 2}, 0),
        (4, {"name": "wds", "workers": 3}, 5),
        (2, {"name": "dali", "threads": 1}, 5),
        (4, {"name": "dali", "threads": 2}, 0),
        (1, {"name": "dali", "threads": 1}, 7),
    ]:
        assert global_batches(small, world, loader, done=done) == whole[done:], (world, loader, done)


def test_a_mid_epoch_resume_in_another_order_is_refused_and_one_at_an_epoch_end_is_not(small):
    saved = data_module(small, {"name": "wds"}, batch_size=16, crop=28, partitions=96).order_state()
    for done, refused in ((3, True), (0, False)):
        dm = data_module(small, {"name": "wds"}, epoch=1, done=done, batch_size=16, crop=28)
        dm.restore_order(saved)
        if refused:
            with pytest.raises(
                ConfigError,
                match=r"stopped mid-epoch in an order of samples made with "
                r"data.partitions=96 \(now 192\); resume with those settings",
            ):
                dm.train_dataloader()
        else:
            assert len(dm.train_dataloader()) == STEPS


def test_the_trace_drops_the_steps_a_resumed_checkpoint_does_not_hold(tmp_path):
    """Lines written after the checkpoint by a run that died, in the files of ranks the resumed run
    has and of those it has not, go; a line cut short by the kill too."""
    for rank in range(4):
        trace = Trace(str(tmp_path), "/data", rank, 4)
        for step in range(6):
            trace.write(0, step, [("/data/train/000000.tar", f"k{rank}{step}")])
        trace.close()
    with open(tmp_path / "rank-1.jsonl", "a") as f:
        f.write('{"epoch": 0, "step": 2, "rank"')  # cut short
    for rank in range(2):  # resumed at step 4 on 2 ranks
        trace = Trace(str(tmp_path), "/data", rank, 2)
        trace.write(0, 4, [("/data/train/000001.tar", "new")])
        trace.close()
    lines = {
        r: [json.loads(line) for line in (tmp_path / f"rank-{r}.jsonl").read_text().splitlines()] for r in range(4)
    }
    assert [e["step"] for e in lines[0]] == [0, 1, 2, 3, 4] and lines[0][-1]["keys"] == ["train/000001.tar:new"]
    assert lines[0][0] == {"epoch": 0, "step": 0, "rank": 0, "keys": ["train/000000.tar:k00"]}
    assert [e["step"] for e in lines[1]] == [0, 1, 2, 3, 4]  # the cut line gone
    assert [e["step"] for e in lines[2]] == [e["step"] for e in lines[3]] == [0, 1, 2, 3]


@pytest.mark.slow
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
    # 8 processes divide the global batch of 16 but not the order's 4 parts: refused in one line
    refused = run_cli("alexnet-train", *args, *world(8, "wds"), cwd=tmp_path, env=cli_env, check=False)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "error: 8 processes cannot share this run's order of samples (data.partitions=4, data.batch_size=16): "
        "it trains on 1, 2, 4 processes; run on one of those, or start the run with data.partitions and "
        "data.batch_size multiples of 8"
    ], refused.stderr[-2000:]
    run_cli("alexnet-train", *args, *then, cwd=tmp_path, env=cli_env, timeout=400)
    assert_same_training(trace, reference)
