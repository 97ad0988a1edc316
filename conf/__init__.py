"""alexnet-train's Hydra configuration, installed as the package alexnet_dist.conf. Hydra imports
this package before it composes (config_path="pkg://alexnet_dist.conf"), so the resolver below is
there in every process that reads these files: the command, its submitit jobs, the tests."""

import os
import time
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf


def started(pid: int) -> float:
    """When process `pid` started (Linux's /proc), else now."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        boot = next(int(line[6:]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def default_run_id() -> str:
    """${run_id:} of train.yaml: the SLURM job id, so that a requeued job finds its run directory
    again; outside SLURM the start time and the process id of the command, which no two commands
    share (two started in the same second once shared a run directory). Under torchrun that is the
    torchrun agent, the parent every local rank has in common, so they agree. Resolved once per
    command: Hydra hands the cached value to every job of a sweep, the submitit launcher's jobs on
    the cluster included, so a sweep's jobs and submitit's own files share runs/<experiment>/<run_id>/."""
    if job := os.environ.get("SLURM_JOB_ID"):
        return job
    pid = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else os.getpid()
    return f"{datetime.fromtimestamp(started(pid)):%Y%m%d-%H%M%S}-{pid}"


OmegaConf.register_new_resolver("run_id", default_run_id, use_cache=True, replace=True)
