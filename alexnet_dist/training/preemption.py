"""Preemption on SLURM: on the warning signal, checkpoint at the next step boundary, stop, and
requeue the job once training has wound down.

This callback is the only owner of the requeue: Lightning's own SLURM auto-requeue is switched off
(see cli/train.py), and inside a job of the submitit launcher it also takes the signal submitit
asked SLURM for, so that submitit's handler never acts on its own. The requeued job keeps its job
id, hence its run directory and W&B run, and resumes from the checkpoint saved here.
"""

import multiprocessing
import os
import signal
import subprocess
import sys
import threading

import lightning.pytorch as pl
import torch

from .agreement import StepAgreement
from .checkpoint import LastCheckpoint
from .lightning_seams import silence_sigterm_broadcast, stop_without_validating, waiting_for_training_batch


def submitit_signal() -> int | None:
    """The signal submitit's SLURM executor asks for (`--signal=USR2@...` unless
    SUBMITIT_PREEMPT_SIGNAL says otherwise) when this process is one of its jobs, else None."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return None
    from submitit import JobEnvironment

    return signal_number(JobEnvironment.USR_SIG)


def stop_now(signum, frame):
    """Ends the process at once with 128 + the signal and one line (Lightning would turn a
    KeyboardInterrupt into its own message and status 1). os._exit, not SystemExit: the signal may
    come while an object's __del__ runs (a loader iterator shutting its workers down), where an
    exception is printed as a traceback and lost."""
    name = signal.Signals(signum).name
    print(f"error: stopped by {name} at once, without a new checkpoint; the last saved one is kept", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    end_loader_workers()  # os._exit runs no atexit handler: they would outlive it, holding run.lock
    os._exit(128 + signum)


def end_loader_workers() -> None:
    """Kills this process's loader worker processes (they ignore stop signals, and may be waiting on
    a slow store), its SIGCHLD handler first set aside: the DataLoader's would take their deaths for a
    worker failure and raise in the main thread."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        child.kill()


class StopWhileWaiting(BaseException):
    """A stop signal that came while the rank waited for its next training batch (a slow or stalled
    store): raised from the handler to end that wait, caught by Preemption.on_exception, which saves
    the checkpoint of the last finished step. A BaseException, so that no reader's `except
    Exception` (the store's retries) takes it for a failed read."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_number(name: str) -> int:
    return int(getattr(signal, f"SIG{name.upper().removeprefix('SIG')}"))


class Preemption(pl.Callback):
    """The training process's signals. The preemption signal (preemption.signal, and submitit's):
    checkpoint at the next step boundary, stop, requeue. SIGTERM, when it is not that signal (a
    plain `kill`, a scheduler's stop or cancel), and SIGINT (Ctrl-C): checkpoint at the next step
    boundary, stop, and exit with status 128 + the signal (143, 130) so that whatever started the
    run sees it did not finish; a second Ctrl-C stops at once, without a checkpoint. A signal may
    reach some ranks only: all act on it if any got it, through the step's agreement.

    A stop signal while a run of one process waits for its next training batch (a store that
    stalls or trickles, whose reads may take minutes to fail) does not wait for that batch: the
    wait ends there (StopWhileWaiting), the last finished step is saved, and the run exits as above.
    (With several ranks the others may be inside a collective of the step, so each waits for its
    batch, bounded by the store's limits, and all stop at the next step boundary together.)
    """

    def __init__(self, saver: LastCheckpoint, signal_name: str, requeue: bool, agreement: StepAgreement):
        self.saver, self.requeue_job, self.agreement = saver, requeue, agreement
        self.signums = sorted({signal_number(signal_name), submitit_signal()} - {None})
        self.requested = False
        self.stop_signals = [s for s in (signal.SIGINT, signal.SIGTERM) if s not in self.signums]
        self.terminated = 0  # the stop signal this rank got, if any
        self.preempted_at = None  # the global step saved before stopping
        self.terminated_at = None  # the same, after a stop signal
        self.terminated_by = None  # that signal's name (SIGTERM, SIGINT)
        self.single = False  # one process: a stop signal may end a wait for data (setup knows)
        agreement.ask("preempt", lambda: self.requested)
        agreement.ask("terminate", lambda: self.terminated)

    @property
    def worker_signals(self) -> tuple[int, ...]:
        """What loader worker processes ignore: these signals are for the training process, and a
        worker killed by one (SLURM signals every process of a job step) would break the very
        step that should save the checkpoint."""
        return tuple(sorted({*self.signums, signal.SIGTERM, signal.SIGINT}))

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return  # the final validation: a signal there stops at once (on_train_end)
        self.single = trainer.world_size == 1
        self._listen()
        silence_sigterm_broadcast(trainer)  # SIGTERM is handled here and travels in the step's agreement

    def on_train_start(self, trainer, pl_module):
        # Again, now that the Trainer has set its own handlers: its SIGTERM handler would end the
        # fit at once, before the checkpoint (and stall DDP ranks).
        self._listen()

    def _listen(self):
        for signum in self.signums:
            signal.signal(signum, self._on_signal)
        for signum in self.stop_signals:
            signal.signal(signum, self._on_terminate)

    def _on_signal(self, signum, frame):
        self.requested = True  # acted on at the next step boundary, never inside a step

    def _on_terminate(self, signum, frame):
        if signum == signal.SIGINT and self.terminated:
            stop_now(signum, frame)  # Ctrl-C twice: the user will not wait for the checkpoint
        self.terminated = int(signum)
        if self.single and waiting_for_training_batch(frame):
            raise StopWhileWaiting(signum)

    def on_exception(self, trainer, pl_module, exception):
        """The stop signal ended a wait for data: the checkpoint of the last finished step, and the
        loader's worker processes (which ignore the signal, and may wait on the store) ended."""
        if not isinstance(exception, StopWhileWaiting):
            return
        self.saver.save(trainer)
        end_loader_workers()
        self.terminated_at, self.terminated_by = trainer.global_step, signal.Signals(exception.signum)
        print(f"stopped by {self.terminated_by.name}: checkpoint saved at step {trainer.global_step}", flush=True)

    def leaving(self) -> None:
        """The run is stopping and its checkpoint is saved: a further Ctrl-C or SIGTERM while it
        closes its loggers and exits has nothing left to save and must not cut the exit short."""
        for signum in self.stop_signals:
            signal.signal(signum, signal.SIG_IGN)

    def after_fit(self, trainer) -> None:
        """A stop signal that came after the last training step (during the last validation) had
        no step left to act at: all ranks agree on it once here, and the run ends as if stopped at
        its last step, whose epoch-end checkpoint is saved. Training is over: from here a stop
        signal (during the final validation) ends the run at once."""
        if self.terminated_at is not None or self.preempted_at is not None:
            return
        mine = torch.tensor(float(self.terminated), device=trainer.strategy.root_device)
        got = trainer.strategy.reduce(mine, reduce_op="max")
        if got > 0:
            self.terminated_at, self.terminated_by = trainer.global_step, signal.Signals(int(got))
        for signum in self.stop_signals:
            signal.signal(signum, stop_now)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        preempt, terminate = self.agreement.take("preempt"), self.agreement.take("terminate")
        if not (preempt or terminate):
            return
        self.saver.save(trainer)
        stop_without_validating(trainer)
        if preempt:
            self.preempted_at = trainer.global_step
        else:
            self.terminated_at = trainer.global_step
            self.terminated_by = signal.Signals(terminate)
        if trainer.is_global_zero:
            what = "preempted" if preempt else f"stopped by {self.terminated_by.name}"
            print(f"{what}: checkpoint saved at step {trainer.global_step}", flush=True)

    def requeue(self, trainer) -> None:
        """After fit has returned on every rank and the loggers are closed: requeue the job (rank
        zero), as the very last thing, since SLURM then cancels what still runs of this allocation."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # that cancel may not cut this process's exit short
        job = os.environ.get("SLURM_JOB_ID")
        if trainer.is_global_zero and self.requeue_job and job:
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            print(
                f"requeued job {job}"
                if done.returncode == 0
                else f"warning: scontrol requeue {job} failed: {done.stderr.strip()}",
                file=sys.stderr,
                flush=True,
            )
