"""The run directory: writable before anything is written into it, and one run per directory.

Hydra writes its own files there (.hydra/, the log) before alexnet-train's code runs, so the first
check is a Hydra callback (conf/train.yaml's hydra.callbacks). Then the run's first process holds
an exclusive lock on RUN_DIR/run.lock while it lives (locks.py), so that a second run given the
same directory (the same run_id, or a sweep started twice) stops at once instead of training into
it beside the first.
"""

import os
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import yaml
from hydra.experimental.callback import Callback as HydraCallback

from .. import locks
from ..config import flat
from ..errors import ConfigError

LOCK = "run.lock"


def take_lock(run_dir: Path, requeue_wait_s: float):
    """The open, locked RUN_DIR/run.lock (keep it open to hold the lock), or a one-line refusal
    naming the holder. A requeued SLURM job (the same job id) waits up to `requeue_wait_s` for its
    previous incarnation to finish exiting."""
    job = os.environ.get("SLURM_JOB_ID")
    deadline = time.monotonic() + requeue_wait_s

    def our_requeued_job(holder: dict) -> bool:  # our own job before its requeue, still exiting
        return bool(job) and holder.get("slurm_job") == job and time.monotonic() < deadline

    claim = locks.take(
        run_dir / LOCK,
        {"slurm_job": job},
        "nothing stops a second run from using this run directory at the same time",
        wait=our_requeued_job,
    )
    if isinstance(claim, dict):
        return (
            f"{run_dir}: in use by another run ({locks.describe(claim)}); one run per run directory: give "
            "this one its own run_id=NAME, or wait for that one to end and run again to resume it"
        )
    return claim


# Settings that say where a run lives or how it starts, not what it does: a run directory copied or
# moved elsewhere, or resumed from a named checkpoint, is the same experiment.
WHERE_NOT_WHAT = ("run_id", "paths.", "resume")


def changed_settings(old_file: Path, new_yaml: str, show: int = 3) -> str:
    """The settings in which an earlier start's config.yaml differs from this one ('' if none or
    if there is no readable earlier one): a run directory reused by another experiment (two runs
    of one SLURM job share its id) would otherwise continue it silently."""
    try:
        old = flat(yaml.safe_load(old_file.read_text()))
    except (OSError, yaml.YAMLError):
        return ""
    new = flat(yaml.safe_load(new_yaml))
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and not k.startswith(WHERE_NOT_WHAT))
    shown = [f"{k}: {old.get(k)} -> {new.get(k)}" for k in keys[:show]]
    return "; ".join(shown) + (f"; {len(keys) - show} more" if len(keys) > show else "")


def first_process() -> bool:
    """Whether this process is the run's global rank zero, read from what launchers set before
    any process group exists: torchrun (RANK, GROUP_RANK), srun (SLURM_PROCID), Lightning's own
    DDP processes (LOCAL_RANK, NODE_RANK)."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "GROUP_RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))


class RunDirectory(pl.Callback):
    """Claims the run directory before anything is written into it: the run's first process takes
    the lock when this is made, before the Trainer and its loggers exist (a refused run must not
    open a W&B run or a log beside the live one: build the Trainer without loggers when
    `refused`). When the run starts, every rank learns whether the claim held (one collective,
    once), so that all ranks of a refused run stop together with the same line; then rank zero
    writes config.yaml."""

    def __init__(self, run_dir: Path, config_yaml: str, first: bool, requeue_wait_s: float = 120.0):
        self.run_dir, self.config_yaml = Path(run_dir), config_yaml
        claim = take_lock(self.run_dir, requeue_wait_s) if first else None
        self.refused = claim if isinstance(claim, str) else None
        self.lock = None if self.refused else claim
        self.checked = False

    def setup(self, trainer, pl_module, stage):
        if self.checked:
            return  # since fit: the final validation runs under the same claim
        refusal = trainer.strategy.broadcast(self.refused, src=0)
        if refusal:
            raise ConfigError(refusal)
        self.checked = True
        if trainer.is_global_zero:
            if changed := changed_settings(self.run_dir / "config.yaml", self.config_yaml):
                print(
                    f"warning: {self.run_dir} was started with other settings ({changed}); this run continues "
                    "it with the new ones (give it its own run_id=NAME if it is another experiment)",
                    file=sys.stderr,
                    flush=True,
                )
            (self.run_dir / "config.yaml").write_text(self.config_yaml)
            print(f"run directory: {self.run_dir}", flush=True)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()  # closing the file drops the lock
            self.lock = None


def unwritable(folder: Path) -> str | None:
    """Why files cannot be made in `folder` (or in its nearest existing parent, which would hold
    it), else None."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if os.access(existing, os.W_OK):
        return None
    try:  # how the file system itself answers: read-only, or no permission
        os.close(os.open(existing / ".alexnet-write-check", os.O_CREAT | os.O_WRONLY))
        os.unlink(existing / ".alexnet-write-check")
        return None
    except OSError as exc:
        return f"{existing}: {exc.strerror.lower()}"


class WritableRunDir(HydraCallback):
    """Stops a command whose run (or sweep) directory cannot be written, in one line, before
    Hydra's own first write there would end in a traceback."""

    def _check(self, folder: str) -> None:
        if problem := unwritable(Path(folder)):
            print(
                f"error: run directory {folder}: cannot be written ({problem}); make it writable or point "
                "paths.runs=DIR at a writable folder (to resume, copy the run directory there)",
                file=sys.stderr,
            )
            raise SystemExit(2)

    def on_run_start(self, config, **kwargs) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(config.hydra.sweep.dir)
