"""The Trainer a run executes on: devices, strategy (DDP and its options), precision and the SLURM
plugin, apart from the training loop itself; and the checks that the launch (srun, torchrun) and
the trainer.* settings agree before any process group exists."""

import inspect
import os
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy

from ..config import Train
from ..errors import ConfigError
from .ckpt_format import FormatIO
from .sync_batchnorm import SyncBatchNorm

# What build_trainer passes to the Trainer itself.
TRAINER_ARGS_SET_HERE = {"default_root_dir", "callbacks", "logger", "plugins", "use_distributed_sampler"}


def check_trainer_keys(trainer: dict) -> None:
    """trainer.* are lightning.pytorch.Trainer's arguments; a name it does not take is one line."""
    known = set(inspect.signature(pl.Trainer).parameters)
    if unknown := sorted(set(trainer) - known):
        raise ConfigError(
            f"trainer.{unknown[0]}: not an argument of lightning.pytorch.Trainer "
            f"(lightning {pl.__version__}); check the spelling, or remove it"
        )
    if "sync_batchnorm" in trainer:
        raise ConfigError("trainer.sync_batchnorm: use ddp.sync_batchnorm=true (it works on CPUs too)")
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


def comm_hook(name: str):
    """DDP gradient compression: gradients are cast to bf16/fp16 for the all-reduce, halving the
    bytes on the wire, and back to float32 after."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return {"none": None, "bf16": default_hooks.bf16_compress_hook, "fp16": default_hooks.fp16_compress_hook}[name]


def build_trainer(s: Train, run_dir: Path, slurm, callbacks: list, loggers: list) -> pl.Trainer:
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
    if s.ddp.sync_batchnorm:
        args["plugins"].append(SyncBatchNorm())
    if slurm:  # the run's Preemption callback owns the requeue, not Lightning's SLURM plugin
        args["plugins"].append(SLURMEnvironment(auto_requeue=False))
    return pl.Trainer(
        **args,
        default_root_dir=str(run_dir),
        callbacks=callbacks,
        logger=loggers or False,
        use_distributed_sampler=False,
    )
