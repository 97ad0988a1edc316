import importlib.resources

import pytest
from hydra import compose, initialize_config_module

import alexnet_dist.cli.train  # noqa: F401  (registers the ${run_id:} resolver)
from alexnet_dist.config import validate
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
    validate(cfg)  # every key known and of the right type
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
