"""alexnet-train's Hydra configuration, installed as the package alexnet_dist.conf. Hydra imports
this package before it composes (config_path="pkg://alexnet_dist.conf"), so the resolver below is
there in every process that reads these files: the command, its submitit jobs, the tests."""

import os
from datetime import datetime

from omegaconf import OmegaConf


def default_run_id() -> str:
    """${run_id:} of train.yaml: the SLURM job id, so that a requeued job finds its run directory
    again; outside SLURM the start time. Resolved once per command: Hydra hands the cached value to
    every job of a sweep, the submitit launcher's jobs on the cluster included, so a sweep's jobs and
    submitit's own files share runs/<experiment>/<run_id>/."""
    return os.environ.get("SLURM_JOB_ID") or datetime.now().strftime("%Y%m%d-%H%M%S")


OmegaConf.register_new_resolver("run_id", default_run_id, use_cache=True, replace=True)
