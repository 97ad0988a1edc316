"""One training run's life, owned in one place: it claims the run directory, picks where training
starts (a checkpoint to resume, weights to start from), builds the parts that keep the run safe
(the step agreement, the checkpoint saver, preemption, the run's pictures and counters) and hands
them to the Trainer, fits, validates, writes results.json, closes the loggers, and decides how
the process ends: 0, 128 + a stop signal, or a requeue.

The LightningModule and the data module are the caller's: any LightningModule gets checkpoints,
preemption and the checkpoint clock without knowing about them, since the callbacks below settle
the step's agreement themselves (agreement.py).
"""

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl

from ..config import Train
from ..errors import TrainingError
from .agreement import StepAgreement
from .callbacks import SkippedImages, Throughput
from .checkpoint import (
    BestCheckpoint,
    LastCheckpoint,
    check_compatible,
    load_weights,
    resume_checkpoint,
    set_aside_damaged_last,
)
from .ckpt_format import CheckpointParts
from .pictures import Pictures, steps_per_epoch
from .preemption import Preemption, StopWhileWaiting
from .run_dir import RunDirectory, first_process
from .trainer import build_trainer, check_launch, check_trainer_keys, slurm_tasks
from .unchanged_data import UnchangedData

# What a collective reports when a peer process died (gloo) or never answered (a timeout).
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "timed out", "Timed out", "Timeout")


def finish_loggers(trainer: pl.Trainer, exit_code: int = 0) -> None:
    """Closes this job's W&B run (rank zero), so that the next job of a sweep starts its own and a
    requeue's cancel cannot cut the upload short. Its service process is stopped here too: left to
    W&B's exit hook, it may already have been killed by the requeue's TERM, and the hook then prints
    a traceback."""
    if not trainer.is_global_zero or not any(type(lg).__name__ == "WandbLogger" for lg in trainer.loggers):
        return
    import wandb

    try:
        wandb.finish(exit_code=exit_code)
        wandb.teardown(exit_code)
    except Exception as exc:  # its service may be gone: SLURM's TERM reaches every process of the job
        print(f"warning: the W&B run could not be closed cleanly ({type(exc).__name__}: {exc})", file=sys.stderr)


class Run:
    """A run of settings `s` in `run_dir`. Made before the data module (whose loader workers must
    ignore the run's signals: `worker_signals`); `execute` then trains."""

    def __init__(
        self,
        s: Train,
        run_dir: Path,
        run_id: str,
        config_yaml: str,
        overrides: list[str] = (),
        model_name: str | None = None,
    ):
        """`overrides`: the command line's settings (Hydra's task overrides) and `model_name`: the
        model config chosen (model=NAME), both kept in results.json."""
        self.s, self.run_dir, self.run_id, self.config_yaml = s, Path(run_dir), run_id, config_yaml
        self.overrides, self.model_name = list(overrides), model_name
        self.slurm = slurm_tasks()
        check_launch(s.trainer, self.slurm)
        check_trainer_keys(s.trainer)
        pl.seed_everything(s.seed, workers=True, verbose=False)  # before the caller builds the model's weights
        self.ckpt_dir = self.run_dir / "checkpoints"
        c = s.checkpoint
        self.agreement = StepAgreement()  # the per-step questions of all ranks, in one collective
        self.saver = LastCheckpoint(self.ckpt_dir, self.agreement, c.every_n_steps, c.every_n_minutes, c.keep)
        self.preemption = Preemption(self.saver, str(s.preemption.signal), s.preemption.requeue, self.agreement)
        self.throughput, self.skipped_images = Throughput(), SkippedImages()

    @property
    def worker_signals(self) -> tuple[int, ...]:
        return self.preemption.worker_signals

    def callbacks(self, claim: RunDirectory, module, data) -> list[pl.Callback]:
        """The run's callbacks. Two orders matter, each tested in tests/test_run.py: the claim
        first (nothing is written into the run directory before it is held), and the pictures
        before the saver (a checkpoint holds the curves up to its own step). Lightning moves
        BestCheckpoint, a Checkpoint, to the end of the list; nothing depends on where it lands."""
        parts = CheckpointParts()  # what of the module's and the data's own state checkpoints hold
        if hasattr(module, "training_state"):
            parts.register("training", module.training_state, module.restore_training_state)
        if hasattr(data, "checkpointed_order"):
            parts.register("loader", data.checkpointed_order, data.restore_order)
        if hasattr(data, "description"):  # read by alexnet-eval, -export and -predict; nothing to restore
            parts.register("data", data.description, lambda state: None)
        # a data module that can tell whether its data changed under the run (ShardDataModule) is asked
        watching = [UnchangedData(data.check_unchanged, self.saver.save)] if hasattr(data, "check_unchanged") else []
        return [
            claim,
            parts,
            *watching,
            Pictures(
                self.run_dir / "pictures",
                augmented=getattr(data, "augmented_batch", lambda: None),
                classes=getattr(getattr(data, "manifest", None), "classes", None),
            ),
            self.saver,
            self.preemption,
            self.agreement,
            BestCheckpoint(self.ckpt_dir, monitor="val_top1"),
            self.throughput,
            self.skipped_images,
        ]

    def starting_point(self, module: pl.LightningModule) -> Path | None:
        """The checkpoint to resume from (resume=auto|never|PATH), checked against `module`; else
        the weights of init_from, loaded into `module` (a new run from trained weights)."""
        ckpt_path = resume_checkpoint(self.s.resume, self.ckpt_dir)
        if ckpt_path:
            check_compatible(ckpt_path, module, "resume")
        elif self.s.init_from:
            load_weights(module, Path(self.s.init_from))
        return ckpt_path

    def execute(
        self, module: pl.LightningModule, data: pl.LightningDataModule, make_loggers: Callable[[], list]
    ) -> dict:
        """Trains `module` on `data` to the end and returns the results (also in results.json), or
        {"preempted_at": step} after a requeue; a stop signal ends the process with 128 + it."""
        ckpt_path = self.starting_point(module)
        claim = RunDirectory(self.run_dir, self.config_yaml, first_process())
        # a refused run (the directory is another live run's) writes no log or W&B run beside that one
        loggers = [] if claim.refused else make_loggers()
        trainer = build_trainer(self.s, self.run_dir, self.slurm, self.callbacks(claim, module, data), loggers)
        if ckpt_path and trainer.is_global_zero and not claim.refused:
            print(f"resuming from {ckpt_path}", flush=True)
            set_aside_damaged_last(ckpt_path, self.ckpt_dir)
        try:
            results = self._fit_and_report(trainer, module, data, ckpt_path)
        except BaseException:
            finish_loggers(trainer, exit_code=1)  # the next job of a sweep must start a W&B run of its own
            raise
        finally:
            claim.release()
        finish_loggers(trainer)
        return results

    def _fit_and_report(self, trainer: pl.Trainer, module, data, ckpt_path: Path | None) -> dict:
        try:
            trainer.fit(module, datamodule=data, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
        except StopWhileWaiting:  # a stop signal while waiting for data: the checkpoint is saved
            self._leave_stopped(trainer)
        except RuntimeError as exc:  # torch.distributed's errors included
            if any(sign in str(exc) for sign in PEER_LOST):
                raise TrainingError(
                    f"rank {trainer.global_rank}: another rank of this run failed or stopped answering "
                    f"within ddp.timeout_s={self.s.ddp.timeout_s} (its error is above); stopping too"
                ) from None
            raise
        preemption = self.preemption
        preemption.after_fit(trainer)
        if preemption.terminated_at is not None:
            self._leave_stopped(trainer)
        if preemption.preempted_at is not None:
            trainer.strategy.barrier("preempted")
            finish_loggers(trainer)
            preemption.requeue(trainer)
            if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and self.s.preemption.requeue:
                # submitit takes a returning job for a finished one and hands its result to the sweep;
                # leave without one, as submitit's own requeue does: the requeued job returns it.
                raise SystemExit(0)
            return {"preempted_at": preemption.preempted_at}
        metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
        return self.report(trainer, metrics, getattr(module, "skipped_steps", 0), getattr(data, "loader_name", None))

    def _leave_stopped(self, trainer: pl.Trainer) -> None:
        """After a stop signal (SIGTERM, Ctrl-C) whose checkpoint is saved: exit as if the signal
        had ended the process (143, 130), so that whatever started the run sees it did not finish."""
        preemption = self.preemption
        preemption.leaving()
        trainer.strategy.barrier("terminated")
        code = 128 + preemption.terminated_by
        finish_loggers(trainer, exit_code=code)
        if trainer.is_global_zero:
            print(
                f"error: stopped by {preemption.terminated_by.name} at step {preemption.terminated_at}, before the "
                "end; the checkpoint is saved: run the same command again to resume",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(code)

    def report(self, trainer: pl.Trainer, metrics: dict, skipped_steps: int, loader: str | None) -> dict:
        """results.json and the closing lines (rank zero writes and prints)."""
        s, throughput = self.s, self.throughput
        results = {
            "run_id": self.run_id,
            "experiment": s.experiment_name,
            "overrides": self.overrides,
            "model": self.model_name or s.model["_target_"],
            "model_target": s.model["_target_"],
            "global_batch": s.data.batch_size,
            "lr": s.optim.lr,  # as set, at the reference batch (optim.reference_batch)
            "optimizer": str(s.optim.name),
            "max_epochs": s.trainer.get("max_epochs"),
            "val_top1": metrics["val_top1"],
            "val_top5": metrics["val_top5"],
            "val_loss": metrics["val_loss"],
            "val_count": int(metrics["val_count"]),
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "steps_per_epoch": steps_per_epoch(trainer),
            "train_images_per_sec": round(throughput.images_per_sec, 1),
            "train_step_ms": round(throughput.step_ms, 2),
            "train_data_wait": round(throughput.data_wait, 3),
            "world_size": trainer.world_size,
            "loader": loader,
            "skipped_steps": skipped_steps,
            "skipped_images": len(self.skipped_images.seen),
        }
        if trainer.is_global_zero:
            (self.run_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
            print(
                f"run directory: {self.run_dir}\nval top-1: {results['val_top1']:.4f}  "
                f"top-5: {results['val_top5']:.4f}  ({results['val_count']} images, {results['epochs']} epochs, "
                f"{results['global_step']} steps, {results['train_images_per_sec']} img/s)",
                flush=True,
            )
        return results
