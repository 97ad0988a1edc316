"""alexnet-train [hydra overrides]: compose the config, type it, and wire the data module, the model
and the loggers into a Run (training/run.py), which owns the rest of the run's life."""

import os
import re
import sys
import traceback
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from ..config import Train, load
from ..data.datamodule import ShardDataModule
from ..models import complete
from ..training.module import Classifier
from ..training.run import Run
from . import hydra_command, one_line_errors

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


def train(cfg: DictConfig) -> dict:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    # runs/<experiment>/<run_id>, or .../<run_id>/<job number> in a sweep: both parts name the run
    base = Path(cfg.paths.runs).resolve() / cfg.experiment_name
    run_id = "-".join(run_dir.relative_to(base).parts) if run_dir.is_relative_to(base) else run_dir.name
    s = load(cfg)  # typed and checked, from here on
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)  # this job's own, in a sweep
    model_name = hydra_cfg.runtime.choices.get("model")
    run = Run(s, run_dir, run_id, OmegaConf.to_yaml(cfg, resolve=True), overrides=overrides, model_name=model_name)
    data = ShardDataModule(s.data, s.loader, seed=s.seed, worker_signals=run.worker_signals)
    module = Classifier(
        model=complete(s.model, data.num_classes, s.data.crop, data=f"data.root={s.data.root}"),
        optim=s.optim,
        global_batch=s.data.batch_size,
        seed=s.seed,
        channels_last=s.compute.channels_last,
        compile=s.compute.compile,
        fuse_norms=s.compute.fuse_norms,
    )
    return run.execute(module, data, lambda: make_loggers(cfg, s, run_dir, run_id))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def hydra_main(cfg: DictConfig) -> None:
    try:
        one_line_errors(train)(cfg)
    except (SystemExit, Exception) as exc:
        # In a sweep, a job that fails (its one error line and exit status 2, or an unexpected
        # error) leaves the others to run: the table the sweep ends with (training/summary.py)
        # shows it failed, and the sweep then exits 2. A stop signal or Ctrl-C still ends the sweep.
        stopped = isinstance(exc, SystemExit) and exc.code != 2
        if stopped or HydraConfig.get().mode != RunMode.MULTIRUN:
            raise
        if not isinstance(exc, SystemExit):
            traceback.print_exc()  # no error of the user's: its whole story, as Python tells it


main = hydra_command(hydra_main)


if __name__ == "__main__":
    sys.exit(main())
