"""alexnet-train [hydra overrides]: compose the config, wire data, model, loggers and trainer, fit,
evaluate, and write results.json into the run directory."""

import inspect
import json
import os
import re
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf

from ..config import Train, load
from ..data.datamodule import ShardDataModule
from ..errors import ConfigError, TrainingError
from ..training.agreement import StepAgreement
from ..training.callbacks import SkippedImages, Throughput
from ..training.checkpoint import (
    BestCheckpoint,
    LastCheckpoint,
    check_compatible,
    load_weights,
    resume_checkpoint,
    set_aside_damaged_last,
)
from ..training.ckpt_format import CheckpointParts, FormatIO
from ..training.module import Classifier
from ..training.pictures import Pictures
from ..training.preemption import Preemption
from ..training.run_dir import RunDirectory, first_process
from . import one_line_errors

# conf/ of the repository, installed as the package alexnet_dist.conf; a user's own folder adds to
# it with --config-dir DIR (or hydra.searchpath=[file://DIR]).
CONFIG_PATH = "pkg://alexnet_dist.conf"
# Our loaders define __len__ exactly (batches per worker are counted from the manifest).
warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined")
# The train loader takes its place in the epoch from the restored global step (see EpochLoader),
# not from Lightning's loader-state protocol that this warning asks for.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
# Evaluation metrics are summed over ranks by the module itself (one all-reduce per epoch).
warnings.filterwarnings("ignore", message="It is recommended to use `self.log\\(.*sync_dist=True")


# What a collective reports when a peer process died (gloo) or never answered (a timeout).
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "timed out", "Timed out", "Timeout")


def wandb_sweep(cfg: DictConfig, run_dir: Path) -> dict:
    """In a multirun (-m), each job is its own W&B run, grouped by the sweep's folder and tagged
    with the job's command-line overrides."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return {}
    tags = [o for o in hydra_cfg.overrides.task if len(o) <= 64]  # W&B's limit for a tag
    return {"group": f"{cfg.experiment_name}-{run_dir.parent.name}", "tags": tags}


def make_loggers(cfg: DictConfig, settings: Train, run_dir: Path, run_id: str) -> list:
    # logs/version_N/metrics.csv: each start (first run, resume, requeue) gets its own file, so
    # nothing written by an earlier part of the run is overwritten.
    loggers = [CSVLogger(save_dir=str(run_dir), name="logs")]
    if settings.logger.name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_MODE", settings.logger.mode)
        # One W&B run per run directory: a resumed or requeued run continues the same id.
        wandb_id = re.sub(r"[^A-Za-z0-9_-]", "-", f"{settings.experiment_name}-{run_id}")
        loggers.append(
            WandbLogger(
                save_dir=str(run_dir),
                project=settings.logger.project,
                entity=settings.logger.entity,
                name=f"{settings.experiment_name}/{run_id}",
                id=wandb_id,
                resume="allow",
                config=OmegaConf.to_container(cfg, resolve=True),
                **wandb_sweep(cfg, run_dir),
            )
        )
    return loggers


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


# What make_trainer passes to the Trainer itself.
TRAINER_ARGS_SET_HERE = {"default_root_dir", "callbacks", "logger", "plugins", "use_distributed_sampler"}


def check_trainer_keys(trainer: dict) -> None:
    """trainer.* are lightning.pytorch.Trainer's arguments; a name it does not take is one line."""
    known = set(inspect.signature(pl.Trainer).parameters)
    if unknown := sorted(set(trainer) - known):
        raise ConfigError(
            f"trainer.{unknown[0]}: not an argument of lightning.pytorch.Trainer "
            f"(lightning {pl.__version__}); check the spelling, or remove it"
        )
    if taken := sorted(set(trainer) & TRAINER_ARGS_SET_HERE):
        raise ConfigError(
            f"trainer.{taken[0]}: set by alexnet-train itself (run directory, loggers, callbacks, SLURM plugin, "
            "sampler); use logger=..., paths.runs=..., or the checkpoint.* settings instead"
        )


def slurm_tasks() -> tuple[int, int] | None:
    """(tasks per node, nodes) when running as tasks of a SLURM job step (srun), else None. Jobs
    named bash or interactive are shells, as Lightning also assumes."""
    env = os.environ
    if "SLURM_NTASKS" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
    per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    return (int(per_node) if per_node.isdigit() else int(env["SLURM_NTASKS"]) // nodes), nodes


def check_launch(trainer: dict, slurm: tuple[int, int] | None) -> None:
    """Every rank stops at once, before any collective, when the launch and the config disagree."""
    if slurm and (trainer["devices"], trainer["num_nodes"]) != slurm:
        raise ConfigError(
            f"trainer.devices={trainer['devices']} x trainer.num_nodes={trainer['num_nodes']} does not "
            f"match the SLURM job ({slurm[1]} nodes x {slurm[0]} tasks per node); launch/slurm/"
            "train.sbatch sets both from SLURM, or pass them to match"
        )
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if not slurm and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ and missing:
        raise ConfigError(
            f"{' and '.join(missing)} not set for a distributed launch (WORLD_SIZE is); "
            "start with launch/torchrun.sh or set the rendezvous address"
        )


def train(cfg: DictConfig) -> dict:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    # runs/<experiment>/<run_id>, or .../<run_id>/<job number> in a sweep: both parts name the run
    base = Path(cfg.paths.runs).resolve() / cfg.experiment_name
    run_id = "-".join(run_dir.relative_to(base).parts) if run_dir.is_relative_to(base) else run_dir.name
    s = load(cfg)  # typed and checked, from here on
    slurm = slurm_tasks()
    check_launch(s.trainer, slurm)
    check_trainer_keys(s.trainer)
    pl.seed_everything(s.seed, workers=True, verbose=False)
    ckpt_dir = run_dir / "checkpoints"
    agreement = StepAgreement()  # the per-step questions of all ranks, in one collective
    c = s.checkpoint
    saver = LastCheckpoint(ckpt_dir, agreement, c.every_n_steps, c.every_n_minutes, c.keep)
    preemption = Preemption(saver, str(s.preemption.signal), s.preemption.requeue, agreement)
    data = ShardDataModule(s.data, s.loader, seed=s.seed, worker_signals=preemption.worker_signals)
    module = Classifier(
        model={**s.model, "num_classes": data.num_classes},
        optim=s.optim,
        global_batch=s.data.batch_size,
        seed=s.seed,
        channels_last=s.compute.channels_last,
        compile=s.compute.compile,
        fuse_norms=s.compute.fuse_norms,
        agreement=agreement,
    )
    ckpt_path = resume_checkpoint(s.resume, ckpt_dir)
    if ckpt_path:
        check_compatible(ckpt_path, module, "resume")
    elif s.init_from:
        load_weights(module, Path(s.init_from))
    throughput, skipped_images = Throughput(), SkippedImages()
    run_directory = RunDirectory(run_dir, OmegaConf.to_yaml(cfg, resolve=True), first_process())
    parts = CheckpointParts()  # what of this run's own state its checkpoints hold
    parts.register("training", module.training_state, module.restore_training_state)
    parts.register("loader", data.gather_loader_states, data.restore_loader_states)
    callbacks = [
        run_directory,  # first: nothing is written into the run directory before it is claimed
        parts,
        # before the saver: the epoch-end checkpoint holds its curves
        Pictures(run_dir / "pictures", augmented=data.augmented_images),
        saver,
        preemption,
        BestCheckpoint(ckpt_dir, monitor="val_top1"),
        throughput,
        skipped_images,
    ]
    # a refused run (the directory is another live run's) writes no log or W&B run beside that one
    loggers = [] if run_directory.refused else make_loggers(cfg, s, run_dir, run_id)
    trainer = make_trainer(s, run_dir, slurm, callbacks, loggers)
    if ckpt_path and trainer.is_global_zero and not run_directory.refused:
        print(f"resuming from {ckpt_path}", flush=True)
        set_aside_damaged_last(ckpt_path)
    try:
        results = fit_and_report(
            trainer, module, data, ckpt_path, s, run_dir, run_id, preemption, throughput, skipped_images
        )
    except BaseException:
        finish_loggers(trainer, exit_code=1)  # the next job of a sweep must start a W&B run of its own
        raise
    finally:
        run_directory.release()
    finish_loggers(trainer)
    return results


def fit_and_report(
    trainer, module, data, ckpt_path, s: Train, run_dir: Path, run_id: str, preemption, throughput, skipped_images
) -> dict:
    """Fits, then validates and writes results.json; a preempted fit requeues the job instead."""
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    except RuntimeError as exc:  # torch.distributed's errors included
        if any(sign in str(exc) for sign in PEER_LOST):
            raise TrainingError(
                f"rank {trainer.global_rank}: another rank of this run failed or stopped answering "
                f"within ddp.timeout_s={s.ddp.timeout_s} (its error is above); stopping too"
            ) from None
        raise
    preemption.after_fit(trainer)
    if preemption.terminated_at is not None:
        preemption.leaving()
        trainer.strategy.barrier("terminated")
        code = 128 + preemption.terminated_by  # as if the signal had ended the process: 143, 130
        finish_loggers(trainer, exit_code=code)
        if trainer.is_global_zero:
            print(
                f"error: stopped by {preemption.terminated_by.name} at step {preemption.terminated_at}, before the "
                "end; the checkpoint is saved: run the same command again to resume",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(code)
    if preemption.preempted_at is not None:
        trainer.strategy.barrier("preempted")
        finish_loggers(trainer)
        preemption.requeue(trainer)
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and s.preemption.requeue:
            # submitit takes a returning job for a finished one and hands its result to the sweep;
            # leave without one, as submitit's own requeue does: the requeued job returns it.
            raise SystemExit(0)
        return {"preempted_at": preemption.preempted_at}
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    skipped = (module.skipped_steps, len(skipped_images.seen))
    return report(trainer, s, run_dir, run_id, metrics, throughput, skipped, data.loader_name)


def comm_hook(name: str):
    """DDP gradient compression: gradients are cast to bf16/fp16 for the all-reduce, halving the
    bytes on the wire, and back to float32 after."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return {"none": None, "bf16": default_hooks.bf16_compress_hook, "fp16": default_hooks.fp16_compress_hook}[name]


def make_trainer(s: Train, run_dir: Path, slurm, callbacks: list, loggers: list) -> pl.Trainer:
    args = dict(s.trainer)
    backend = None if s.ddp.backend == "auto" else str(s.ddp.backend)  # auto: Lightning's pick
    if backend == "nccl" and not (torch.distributed.is_nccl_available() and torch.cuda.is_available()):
        raise ConfigError("ddp.backend=nccl: NCCL needs CUDA GPUs and a CUDA build of torch; use ddp.backend=gloo")
    if args["strategy"] == "ddp":  # the same, with a bound on how long a collective may wait
        args["strategy"] = DDPStrategy(
            timeout=timedelta(seconds=s.ddp.timeout_s),
            bucket_cap_mb=s.ddp.bucket_cap_mb,
            ddp_comm_hook=comm_hook(str(s.ddp.comm_hook)),
            process_group_backend=backend,
        )
    args["plugins"] = [FormatIO()]  # every checkpoint saved and loaded in the current format
    if slurm:  # our Preemption callback owns the requeue, not Lightning's SLURM plugin
        args["plugins"].append(SLURMEnvironment(auto_requeue=False))
    return pl.Trainer(
        **args,
        default_root_dir=str(run_dir),
        callbacks=callbacks,
        logger=loggers or False,
        use_distributed_sampler=False,
    )


def report(
    trainer, s: Train, run_dir: Path, run_id: str, metrics: dict, throughput, skipped: tuple[int, int], loader: str
) -> dict:
    """results.json and the closing lines (rank zero writes and prints)."""
    results = {
        "run_id": run_id,
        "experiment": s.experiment_name,
        "model": s.model["name"],
        "val_top1": metrics["val_top1"],
        "val_top5": metrics["val_top5"],
        "val_loss": metrics["val_loss"],
        "val_count": int(metrics["val_count"]),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "train_images_per_sec": round(throughput.images_per_sec, 1),
        "train_step_ms": round(throughput.step_ms, 2),
        "train_data_wait": round(throughput.data_wait, 3),
        "world_size": trainer.world_size,
        "loader": loader,
        "skipped_steps": skipped[0],
        "skipped_images": skipped[1],
    }
    if trainer.is_global_zero:
        (run_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        print(
            f"run directory: {run_dir}\nval top-1: {results['val_top1']:.4f}  top-5: {results['val_top5']:.4f}  "
            f"({results['val_count']} images, {results['epochs']} epochs, {results['global_step']} steps, "
            f"{results['train_images_per_sec']} img/s)",
            flush=True,
        )
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> None:
    one_line_errors(train)(cfg)


if __name__ == "__main__":
    sys.exit(main())
