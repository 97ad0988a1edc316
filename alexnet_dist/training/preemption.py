"""Preemption on SLURM: on the warning signal, checkpoint at the next step boundary, stop, and
requeue the job once training has wound down.

This callback is the only owner of the requeue: Lightning's own SLURM auto-requeue is switched off
(see cli/train.py). The requeued job keeps its job id, hence its run directory and W&B run, and
resumes from the checkpoint saved here.
"""

import os
import signal
import subprocess
import sys

import lightning.pytorch as pl

from ..data.wds_loader import SIGNAL_ENV
from .checkpoint import LastCheckpoint


class Preemption(pl.Callback):
    def __init__(self, saver: LastCheckpoint, signal_name: str = "USR1", requeue: bool = True):
        self.saver, self.requeue = saver, requeue
        self.signum = getattr(signal, f"SIG{signal_name.upper().removeprefix('SIG')}")
        self.requested = False
        self.preempted_at = None  # the global step saved before stopping

    def setup(self, trainer, pl_module, stage):
        os.environ[SIGNAL_ENV] = str(int(self.signum))
        signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum, frame):
        self.requested = True  # acted on at the next step boundary, never inside a step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # The signal may reach some ranks only: all stop if any was told to.
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        self.saver.save(trainer)
        self.preempted_at = trainer.global_step
        trainer.should_stop = True
        if trainer.is_global_zero:
            print(f"preempted: checkpoint saved at step {trainer.global_step}", flush=True)

    def finish(self, trainer) -> None:
        """After fit has returned on every rank: requeue the job, as the very last thing, since
        SLURM then cancels what is still running of this allocation."""
        trainer.strategy.barrier("preempted")
        for logger in trainer.loggers:  # close the W&B run now: the requeue's cancel would cut it short
            if type(logger).__name__ == "WandbLogger" and trainer.is_global_zero:
                logger.experiment.finish()
                import wandb

                wandb.teardown()  # and stop its service, which the cancel kills: its exit hook would fail
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # nor may it cut this process's exit short
        job = os.environ.get("SLURM_JOB_ID")
        if trainer.is_global_zero and self.requeue and job:
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            print(
                f"requeued job {job}"
                if done.returncode == 0
                else f"warning: scontrol requeue {job} failed: {done.stderr.strip()}",
                file=sys.stderr,
                flush=True,
            )
