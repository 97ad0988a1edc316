"""Run directories: one run per directory, default run ids that cannot collide, and storage that
fills up or turns read-only (a real tmpfs) ending in one line with every checkpoint kept."""

import json
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import run_cli, start_cli

from alexnet_dist.training.checkpoint import newest_good_checkpoint

pytestmark = pytest.mark.slow
SMOKE = ["experiment=smoke", "logger=csv", "+trainer.enable_progress_bar=false"]
SHORT = ["trainer.max_steps=4", "trainer.limit_val_batches=2"]


def wait_for(path: Path, proc: subprocess.Popen, timeout=120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended early:\n{proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def step_files(run_dir: Path) -> list[int]:
    return [int(p.name[5:14]) for p in (run_dir / "checkpoints").glob("step-*.ckpt")]


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_second_run_on_a_live_run_directory_stops_at_once_on_every_rank(tmp_path, synthetic_root, cli_env):
    """The same run_id given twice at the same moment: the second (two DDP ranks) stops in one line
    naming the first's pid, and leaves the first's config.yaml and training alone."""
    first = start_cli(
        "alexnet-train",
        *SMOKE,
        f"data.root={synthetic_root}",
        "run_id=same",
        "optim.lr=0.01",
        cwd=tmp_path,
        env=cli_env,
    )
    run_dir = tmp_path / "runs/smoke/same"
    try:
        wait_for(run_dir / "checkpoints" / "last.ckpt", first)
        # the first held still (it keeps its lock) while the second starts: the cores go to the second
        os.killpg(first.pid, signal.SIGSTOP)
        second = run_cli(
            "alexnet-train",
            *SMOKE,
            f"data.root={synthetic_root}",
            "run_id=same",
            "optim.lr=0.02",
            "logger=wandb",
            "trainer.devices=2",
            "trainer.strategy=ddp",
            cwd=tmp_path,
            env=cli_env,
            check=False,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr[-3000:]
        lines = error_lines(second.stderr)
        assert lines and all(line == lines[0] for line in lines), lines  # each rank says the same
        assert lines[0].startswith(f"error: {run_dir}: in use by another run (pid {first.pid} on ")
        assert "give this one its own run_id=NAME" in lines[0]
        assert "lr: 0.01" in (run_dir / "config.yaml").read_text()
        # nothing of the refused run beside the live one: no W&B run, no log of its own
        assert not (run_dir / "wandb").exists() and [p.name for p in (run_dir / "logs").iterdir()] == ["version_0"]
        assert first.poll() is None
        # the first goes on: it saves another checkpoint
        saved = max(step_files(run_dir))
        os.killpg(first.pid, signal.SIGCONT)
        deadline = time.time() + 60
        while max(step_files(run_dir)) <= saved:
            assert first.poll() is None and time.time() < deadline, f"the first run did not go on from step {saved}"
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


def test_runs_started_together_without_a_run_id_get_directories_of_their_own(tmp_path, synthetic_root, cli_env):
    runs = [
        start_cli(
            "alexnet-train", *SMOKE, *SHORT, f"data.root={synthetic_root}", f"optim.lr={lr}", cwd=tmp_path, env=cli_env
        )
        for lr in (1, 2)
    ]
    for proc in runs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
    dirs = sorted((tmp_path / "runs/smoke").iterdir())
    assert len(dirs) == 2 and all((d / "results.json").exists() for d in dirs)
    assert sorted((d / "config.yaml").read_text().count("lr: 1\n") for d in dirs) == [0, 1]


@contextmanager
def tmpfs(path: Path, size: str):
    """A real, small file system (root only: CI and the SLURM tests run as root)."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(folder: Path) -> Path:
    """Writes zeros into `folder` until its file system is full."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    return filler


def test_a_disk_that_fills_during_training_is_one_line_and_the_run_resumes(tmp_path, synthetic_root, cli_env):
    args = [*SMOKE, f"data.root={synthetic_root}", "run_id=full", "trainer.max_epochs=1", "checkpoint.keep=1"]
    args += ["trainer.limit_train_batches=20", "trainer.limit_val_batches=2"]  # an epoch of 20 steps
    with tmpfs(tmp_path / "disk", "64m") as disk:
        args.append(f"paths.runs={disk}")
        proc = start_cli("alexnet-train", *args, cwd=tmp_path, env=cli_env)
        ckpt_dir = disk / "smoke/full/checkpoints"
        wait_for(ckpt_dir / "last.ckpt", proc)
        filler = fill(disk)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err[-3000:]
        lines = error_lines(err)
        assert len(lines) == 1 and "No space left on device" in lines[0], err[-3000:]
        assert not list(ckpt_dir.glob("*.tmp"))  # no partial file left behind
        saved = torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"]  # still loads
        filler.unlink()
        out = run_cli("alexnet-train", *args, cwd=tmp_path, env=cli_env)
        assert f"resuming from {ckpt_dir}/last.ckpt" in out.stdout and saved > 0
        assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 20


def test_a_reused_run_directory_says_what_changed_and_a_read_only_one_is_one_line_before_anything_runs(
    tmp_path, synthetic_root, cli_env, train_here
):
    args = [*SMOKE, *SHORT, f"data.root={synthetic_root}", "run_id=ro"]
    with tmpfs(tmp_path / "disk", "64m") as disk:
        run_cli("alexnet-train", *args, f"paths.runs={disk}", cwd=tmp_path, env=cli_env)
        # the same run directory again with another setting: it resumes, and says what differs
        again = run_cli("alexnet-train", *args, f"paths.runs={disk}", "optim.lr=0.5", cwd=tmp_path, env=cli_env)
        warning = [line for line in again.stderr.splitlines() if line.startswith("warning:")]
        assert (
            len(warning) == 1 and f"warning: {disk}/smoke/ro was started with other settings (optim.lr: " in warning[0]
        )
        assert "-> 0.5); this run continues it with the new ones" in warning[0]
        before = sorted(p.relative_to(disk) for p in disk.rglob("*"))
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        for extra in ([], ["-m"]):  # a single run, and a sweep (in this process: nothing of them runs)
            proc = train_here(*extra, *args, f"paths.runs={disk}")
            assert proc.returncode == 2
            assert error_lines(proc.stderr) == [
                f"error: run directory {disk}/smoke/ro: cannot be written ({disk}/smoke/ro: read-only file system); "
                "make it writable or point paths.runs=DIR at a writable folder "
                "(to resume, copy the run directory there)"
            ]
        assert sorted(p.relative_to(disk) for p in disk.rglob("*")) == before


def snapshot(folder: Path) -> dict:
    """Every file under `folder`: what it is and when it last changed."""
    return {p.relative_to(folder): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_a_run_started_from_another_runs_checkpoint_leaves_that_run_as_it_was(tmp_path, synthetic_root, train_here):
    """Forking: run B from run A's older step file writes nothing into A (whose resume=auto still
    finds its own newest), works from a read-only copy too, and B's same command run again goes on
    from B's own newest, as does a command naming an older step file of B's own folder."""
    base = [*SMOKE, f"data.root={synthetic_root}", "checkpoint.every_n_steps=2", "checkpoint.keep=3"]
    base += ["trainer.limit_val_batches=2"]
    with tmpfs(tmp_path / "disk", "64m") as disk:
        assert train_here(*base, "trainer.max_steps=6", f"paths.runs={disk}", "run_id=A").returncode == 0
        a_ckpts = disk / "smoke/A/checkpoints"
        assert sorted(step_files(a_ckpts.parent)) == [2, 4, 6]
        before = snapshot(disk)
        fork = [*base, "trainer.max_steps=8", "run_id=B", f"resume={a_ckpts}/step-000000004.ckpt"]
        b = train_here(*fork)
        assert b.returncode == 0, b.stderr[-3000:]
        assert f"resuming from {a_ckpts}/step-000000004.ckpt" in b.stdout
        assert snapshot(disk) == before  # not a file of A renamed, linked, rewritten or added
        assert newest_good_checkpoint(a_ckpts).samefile(a_ckpts / "step-000000006.ckpt")
        b_ckpts = tmp_path / "runs/smoke/B/checkpoints"
        assert torch.load(b_ckpts / "last.ckpt", weights_only=True)["global_step"] == 8
        assert min(step_files(b_ckpts.parent)) > 4

        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        c = train_here(*base, "trainer.max_steps=4", "run_id=C", f"resume={a_ckpts}/step-000000004.ckpt")
        assert c.returncode == 0, c.stderr[-3000:]
        assert json.loads((tmp_path / "runs/smoke/C/results.json").read_text())["global_step"] == 4

    # the same command after a crash or a requeue, A's folder gone by now: B no longer needs it
    again = train_here(*fork)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {b_ckpts}/last.ckpt" in again.stdout
    assert (
        f"notice: resume={a_ckpts}/step-000000004.ckpt: this run has checkpoints of its own and continues from its "
        f"newest, {b_ckpts}/last.ckpt (to go on from step-000000004.ckpt instead, start a new run from it: "
        f"run_id=NEW resume={a_ckpts}/step-000000004.ckpt)"
    ) in again.stderr
    # an older step file of B's own folder (a requeue of a command that named one): B goes on from its
    # newest, and nothing in its folder is overwritten or lost
    mine = snapshot(b_ckpts)
    older = b_ckpts / f"step-{min(step_files(b_ckpts.parent)):09d}.ckpt"
    back = train_here(*base, "trainer.max_steps=8", "run_id=B", f"resume={older}")
    assert back.returncode == 0, back.stderr[-3000:]
    assert f"notice: resume={older}: this run has checkpoints of its own and continues from its newest" in back.stderr
    assert f"resuming from {b_ckpts}/last.ckpt" in back.stdout
    assert snapshot(b_ckpts) == mine
