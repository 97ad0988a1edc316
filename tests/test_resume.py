"""Nothing lost: a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one;
damaged checkpoints are skipped; incompatible checkpoints and non-finite losses stop cleanly."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import BIN, run_cli, start_cli

# one pytest-xdist worker runs them all, so the reference run is trained once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("resume")]
ARGS = [
    "experiment=smoke",
    "logger=csv",
    "+trainer.enable_progress_bar=false",
    "trainer.max_epochs=2",
    "model.dropout=0.5",
]  # dropout: the resumed run must also continue the random generators


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.fixture(scope="session")
def reference(tmp_path_factory, synthetic_root):
    """One uninterrupted run, shared by the tests below."""
    cwd = tmp_path_factory.mktemp("reference")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # logger=csv: no W&B
    run_cli("alexnet-train", *ARGS, f"data.root={synthetic_root}", "run_id=ref", cwd=cwd, env=env)
    return cwd / "runs" / "smoke" / "ref"


def wait_for_step_file(ckpt_dir: Path, min_step: int, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.name[5:14]) for p in ckpt_dir.glob("step-*.ckpt")] if ckpt_dir.exists() else []
        if steps and max(steps) >= min_step:
            return max(steps)
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.parametrize(
    "where, min_step, extra",
    [
        ("mid-epoch", 70, []),  # epoch 1 has begun (62 steps per epoch); saves every 5 steps
        ("at an epoch end", 62, ["checkpoint.every_n_steps=null"]),  # saves after each epoch's validation only
    ],
)
def test_sigkill_then_resume_gives_bit_identical_weights(
    tmp_path, synthetic_root, cli_env, reference, where, min_step, extra
):
    args = [*ARGS, f"data.root={synthetic_root}", "run_id=killed", *extra]
    proc = subprocess.Popen(
        [str(BIN / "alexnet-train"), *args],
        cwd=tmp_path,
        env=cli_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpt_dir = tmp_path / "runs/smoke/killed/checkpoints"
    step = wait_for_step_file(ckpt_dir, min_step, proc)
    time.sleep(0.3 if where == "mid-epoch" else 0)  # mid-epoch: land somewhere between two saves
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, loader workers too, as a job kill does
    proc.wait()
    saved = weights(ckpt_dir.parent)["global_step"]
    assert saved >= step and saved < 124 and (saved % 5 == 0 if where == "mid-epoch" else saved == 62)
    out = run_cli("alexnet-train", *args, cwd=tmp_path, env=cli_env)
    assert f"resuming from {ckpt_dir}/last.ckpt" in out.stdout
    resumed, uninterrupted = weights(ckpt_dir.parent), weights(reference)
    assert resumed["global_step"] == uninterrupted["global_step"] == 124
    for name, tensor in uninterrupted["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], tensor), name
    for a, b in zip(
        resumed["optimizer_states"][0]["state"].values(),
        uninterrupted["optimizer_states"][0]["state"].values(),
        strict=True,
    ):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def logged_val_top1(run_dir: Path) -> dict:
    """{global step: val_top1} of every validation logged by every start of the run."""
    import csv

    scores = {}
    for path in (run_dir / "logs").glob("version_*/metrics.csv"):
        for row in csv.DictReader(path.open()):
            if row.get("val_top1"):
                scores[int(row["step"])] = float(row["val_top1"])
    return scores


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_saves_a_checkpoint_exits_non_zero_and_the_run_resumes(
    tmp_path, synthetic_root, cli_env, sig, code
):
    """SIGTERM (a scheduler's stop, `kill -TERM -PGID`) or SIGINT (Ctrl-C, which a terminal sends
    to the whole foreground group) reaching the run and its loader worker processes: a checkpoint
    at the next step, status 128 + signal (not 0: the run did not finish), one line saying so; the
    same command then finishes the run, and best.ckpt is still the best model of the whole run."""
    name = sig.name
    args = [*ARGS, f"data.root={synthetic_root}", f"run_id={name}", "checkpoint.every_n_steps=null"]
    args += ["loader=wds", "loader.workers=2", "data.batch_size=64", "trainer.limit_train_batches=16"]  # 16 an epoch
    proc = start_cli("alexnet-train", *args, cwd=tmp_path, env=cli_env)
    run_dir = tmp_path / f"runs/smoke/{name}"
    wait_for_step_file(run_dir / "checkpoints", 16, proc)  # epoch 0's checkpoint: epoch 1 is under way
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    saved = weights(run_dir)["global_step"]
    # at the next step's end, or at once where the signal finds the run waiting for epoch 1's first batch
    assert 16 <= saved < 32 and f"stopped by {name}: checkpoint saved at step {saved}" in out
    assert (
        f"error: stopped by {name} at step {saved}, before the end; the checkpoint is saved: run the same "
        "command again to resume" in err
    )
    assert not (run_dir / "results.json").exists()
    run_cli("alexnet-train", *args, cwd=tmp_path, env=cli_env)
    assert weights(run_dir)["global_step"] == 32 and (run_dir / "results.json").exists()
    # best.ckpt: one file, holding the model of the best validation before and after the resume
    scores = logged_val_top1(run_dir)  # no validation of the cut epoch; 32: the final one, after fit
    assert sorted(scores) == [15, 31, 32], scores
    top = max(scores[step] for step in (15, 31))
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["global_step"] == 1 + min(step for step in (15, 31) if scores[step] == top)
    assert best["callbacks"]["BestCheckpoint"]["best"] == top
    assert [p.name for p in (run_dir / "checkpoints").glob("best*")] == ["best.ckpt"]


def test_ctrl_c_twice_stops_in_one_line(tmp_path, synthetic_root, cli_env):
    """A second Ctrl-C: before the step boundary it stops at once, after it (the checkpoint saved,
    the run leaving) it changes nothing; either way status 130, one line, no traceback, and the
    checkpoints are intact. (Which of the two happens depends on where the steps are.)"""
    args = [*ARGS, f"data.root={synthetic_root}", "run_id=twice"]
    proc = start_cli("alexnet-train", *args, cwd=tmp_path, env=cli_env)
    run_dir = tmp_path / "runs/smoke/twice"
    wait_for_step_file(run_dir / "checkpoints", 5, proc)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.3)  # two signals sent together arrive as one
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    at_once = "error: stopped by SIGINT at once, without a new checkpoint; the last saved one is kept"
    saved = weights(run_dir)["global_step"]
    at_step = f"error: stopped by SIGINT at step {saved}, before the end; the checkpoint is saved: run the same"
    assert len(lines) == 1 and (lines[0] == at_once or lines[0].startswith(at_step)), err
    assert weights(run_dir)["global_step"] >= 5 and not list((run_dir / "checkpoints").glob("*.tmp"))


def test_only_the_newest_checkpoints_are_kept_and_last_points_at_the_newest(reference):
    ckpt_dir = reference / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.glob("step-*.ckpt")) == ["step-000000120.ckpt", "step-000000124.ckpt"]
    assert (ckpt_dir / "last.ckpt").stat().st_ino == (ckpt_dir / "step-000000124.ckpt").stat().st_ino
    assert not list(ckpt_dir.glob("*.tmp"))


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path, synthetic_root, cli_env, reference):
    import shutil

    run_dir = tmp_path / "runs/smoke/damaged"
    shutil.copytree(reference, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated, as by a full disk (copytree made it a file of its own)
    (run_dir / "checkpoints" / "step-000000999.ckpt.tmp").write_bytes(b"half a save")  # a crash mid-save
    out = run_cli("alexnet-train", *ARGS, f"data.root={synthetic_root}", "run_id=damaged", cwd=tmp_path, env=cli_env)
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"{last} cannot be loaded" in warnings[0], out.stderr[-2000:]
    assert f"resuming from {run_dir}/checkpoints/step-000000124.ckpt" in out.stdout
    assert weights(run_dir)["global_step"] == 124  # last.ckpt points at the good file again
    assert (run_dir / "checkpoints" / "last.ckpt.damaged").stat().st_size == 1000  # kept, not deleted


def test_resuming_with_another_model_names_both(tmp_path, synthetic_root, cli_env, reference):
    import shutil

    shutil.copytree(reference, tmp_path / "runs/smoke/other")
    out = run_cli(
        "alexnet-train",
        *ARGS,
        f"data.root={synthetic_root}",
        "run_id=other",
        "model.width=24",
        cwd=tmp_path,
        env=cli_env,
        check=False,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "the checkpoint holds" in error[0] and "width=16" in error[0] and "width=24" in error[0]


def test_init_from_starts_a_new_run_from_trained_weights(tmp_path, synthetic_root, cli_env, reference):
    src = reference / "checkpoints" / "last.ckpt"
    run_cli(
        "alexnet-train",
        *ARGS,
        f"data.root={synthetic_root}",
        "run_id=tuned",
        f"init_from={src}",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "optim.lr=0.0001",
        cwd=tmp_path,
        env=cli_env,
    )
    import json

    results = json.loads((tmp_path / "runs/smoke/tuned/results.json").read_text())
    assert results["global_step"] == 2  # a new run: its own step count
    # The source's weights, moved by two tiny steps: compared with the source run itself, not with
    # how well its short training learned (another CPU's rounding decides that). Measured: every
    # tensor within 0.013% of the source's; a fresh start differs from it by 4% to 100% per tensor.
    tuned, source = weights(tmp_path / "runs/smoke/tuned")["state_dict"], weights(reference)["state_dict"]
    assert tuned.keys() == source.keys()
    for name, tensor in source.items():
        assert (tuned[name] - tensor).norm() <= 0.01 * tensor.norm() + 1e-6, name
    before = json.loads((reference / "results.json").read_text())  # the same weights, evaluated at their run's end
    assert results["val_loss"] == pytest.approx(before["val_loss"], rel=0.01)  # measured: 2e-4 apart
    assert abs(results["val_top1"] - before["val_top1"]) <= 0.02  # measured: 0 and 1 image of 500 apart
    out = run_cli(
        "alexnet-train",
        *ARGS,
        f"data.root={synthetic_root}",
        "run_id=tuned2",
        f"init_from={src}",
        "model.fc=32",
        cwd=tmp_path,
        env=cli_env,
        check=False,
    )
    assert out.returncode == 2 and "init_from=" in out.stderr and "fc=64" in out.stderr


def test_a_non_finite_loss_stops_in_one_line_or_is_skipped_and_counted(tmp_path, synthetic_root, cli_env):
    bad = [*ARGS, f"data.root={synthetic_root}", "data.std=[0,0,0]", "trainer.max_epochs=1"]  # x / 0: inf inputs
    out = run_cli("alexnet-train", *bad, "run_id=nan", cwd=tmp_path, env=cli_env, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and error[0].startswith("error: loss is nan at step 0; the last checkpoint is kept")
    run_cli(
        "alexnet-train",
        *bad,
        "run_id=skip",
        "optim.on_nonfinite=skip",
        "trainer.limit_train_batches=7",
        cwd=tmp_path,
        env=cli_env,
    )
    import json

    results = json.loads((tmp_path / "runs/smoke/skip/results.json").read_text())
    assert results["skipped_steps"] == 7  # every step had a NaN loss: none changed the weights
    ckpt = weights(tmp_path / "runs/smoke/skip")
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())


def test_checkpoints_by_the_clock(tmp_path, synthetic_root, cli_env):
    """every_n_minutes alone (no step cadence): saves between epoch ends too."""
    run_cli(
        "alexnet-train",
        *ARGS,
        f"data.root={synthetic_root}",
        "run_id=clock",
        "trainer.max_epochs=1",
        "checkpoint.every_n_steps=null",
        "checkpoint.every_n_minutes=0.002",
        "checkpoint.keep=1000",
        cwd=tmp_path,
        env=cli_env,
    )
    steps = sorted(int(p.name[5:14]) for p in (tmp_path / "runs/smoke/clock/checkpoints").glob("step-*.ckpt"))
    assert steps[-1] == 62 and len(steps) >= 5 and steps[0] < 62  # epoch end, and several by time before it
