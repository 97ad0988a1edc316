import importlib.resources
import subprocess

import pytest
from conftest import BIN
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from alexnet_dist.config import load
from alexnet_dist.models import create_model

CONF = importlib.resources.files("alexnet_dist.conf")
EXPERIMENTS = sorted(p.name.removesuffix(".yaml") for p in (CONF / "experiment").iterdir() if p.name.endswith(".yaml"))


def test_every_experiment_file_is_found():
    assert {"fashion_mnist", "smoke", "alexnet2012"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds_its_model(experiment):
    with initialize_config_module("alexnet_dist.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "data.root=/data/x"])
    assert cfg.experiment_name == experiment
    assert set(cfg) >= {"model", "data", "loader", "optim", "trainer", "logger", "run_id", "resume"}
    assert cfg.data.batch_size > 0 and cfg.optim.schedule.name in {"step", "plateau", "cosine", "constant"}
    load(cfg)  # every key known and of the right type, the settings consistent
    model_args = {k: v for k, v in cfg.model.items() if k != "name"}
    model = create_model(cfg.model.name, num_classes=10, **model_args)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_alexnet2012_experiment_is_the_papers_recipe():
    with initialize_config_module("alexnet_dist.conf", version_base="1.3"):
        cfg = compose("train", overrides=["experiment=alexnet2012", "data.root=/data/imagenet"])
    assert cfg.model.name == "alexnet2012" and cfg.optim.name == "krizhevsky"
    assert (cfg.data.batch_size, cfg.data.crop, cfg.data.val_resize) == (128, 224, 256)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.bias_lr_mult) == (0.01, 0.9, 5e-4, 2.0)
    assert list(cfg.optim.schedule.milestones) == [25, 51, 79] and cfg.trainer.max_epochs == 90
    assert [(r.layer, r.from_epoch, r.lr) for r in cfg.optim.layer_rates] == [("conv1", 67, 1e-5), ("conv1", 72, 0.0)]


def test_a_users_config_folder_adds_an_experiment_from_any_directory(tmp_path, cli_env):
    mine = tmp_path / "myconf/experiment/mine.yaml"
    mine.parent.mkdir(parents=True)
    mine.write_text("# @package _global_\ndefaults:\n  - smoke\nexperiment_name: mine\noptim:\n  lr: 0.05\n")
    cmd = [str(BIN / "alexnet-train"), "--config-dir", "myconf", "experiment=mine", "data.root=/x", "--cfg", "job"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.experiment_name == "mine" and cfg.optim.lr == 0.05  # the user's file over the shipped smoke
    assert cfg.data.crop == 28 and cfg.loader.name == "auto"  # the rest from the package's conf


def test_the_yaml_defaults_and_the_schemas_agree():
    """The typed groups' defaults are declared in config.py; conf/'s default files repeat them for
    the reader and may not drift (the open groups, model and trainer, have no schema)."""
    from alexnet_dist.config import Train, make, plain

    with initialize_config_module("alexnet_dist.conf", version_base="1.3"):
        cfg = compose("train", overrides=["data.root=/data/x", "run_id=r"])
    composed, schema = plain(load(cfg)), plain(make(Train, {"data": {"root": "/data/x"}, "run_id": "r"}))
    for group in ("data", "loader", "optim", "logger", "checkpoint", "ddp", "compute", "preemption"):
        assert composed[group] == schema[group], group


def test_settings_made_outside_alexnet_train_are_checked_the_same_way():
    from alexnet_dist.config import Data, Loader, make
    from alexnet_dist.errors import ConfigError

    assert make(Loader, {"name": "wds"}).workers == 2  # the default, from the one schema
    with pytest.raises(ConfigError, match=r"data.test_views=5: choose 1 \(centre crop\) or 10"):
        make(Data, {"root": "/data", "test_views": 5})
    with pytest.raises(ConfigError, match=r"name: Invalid value 'fast', expected one of \[auto, dali, wds\]"):
        make(Loader, {"name": "fast"})
