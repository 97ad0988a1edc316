import importlib.resources
import subprocess

import pytest
import torch
from conftest import BIN
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from alexnet_dist.config import load
from alexnet_dist.models import build, complete

CONF = importlib.resources.files("alexnet_dist.conf")
SMOKE = ["experiment=smoke", "logger=csv", "+trainer.enable_progress_bar=false"]
EXPERIMENTS = sorted(p.name.removesuffix(".yaml") for p in (CONF / "experiment").iterdir() if p.name.endswith(".yaml"))


def test_every_experiment_file_is_found():
    assert {"fashion_mnist", "smoke", "alexnet2012"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds_its_model(experiment):
    with initialize_config_module("alexnet_dist.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "data.root=/data/x"])
    assert cfg.experiment_name == experiment
    assert set(cfg) >= {"model", "data", "loader", "optim", "trainer", "logger", "run_id", "resume"}
    assert cfg.data.batch_size > 0 and cfg.optim.schedule.name in {"step", "plateau", "cosine", "constant", "poly"}
    load(cfg)  # every key known and of the right type, the settings consistent
    model = build(complete(OmegaConf.to_container(cfg.model), num_classes=10, image_size=cfg.data.crop))
    assert sum(p.numel() for p in model.parameters()) > 0


def test_alexnet2012_experiment_is_the_papers_recipe():
    with initialize_config_module("alexnet_dist.conf", version_base="1.3"):
        cfg = compose("train", overrides=["experiment=alexnet2012", "data.root=/data/imagenet"])
    assert cfg.model._target_ == "alexnet_dist.models.AlexNet2012" and cfg.optim.name == "krizhevsky"
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


@pytest.mark.parametrize(
    "override, message",
    [
        (
            ["data.root={tmp}/absent"],
            "error: data.root={tmp}/absent: no such directory; make shards with `alexnet-prepare",
        ),
        (["data.root={tmp}"], "error: {tmp}/manifest.json: missing; {tmp} holds no shards made by alexnet-prepare"),
        (
            ["model._target_=no.such.Thing"],
            "error: model._target_=no.such.Thing: no module no to import; put its folder on PYTHONPATH",
        ),
        (
            ["model._target_=alexnet_dist.models.AlexNetTall"],
            "error: model._target_=alexnet_dist.models.AlexNetTall: alexnet_dist.models has no AlexNetTall",
        ),
        (
            ["model._target_=torch.nn.Flatten"],
            "error: model._target_=torch.nn.Flatten: takes no num_classes argument; the class count comes from",
        ),
        (["model.width=-4"], "error: model._target_=alexnet_dist.models.AlexNetSmall(width=-4, fc=64, dropout=0.0,"),
        (["+model.num_classes=5"], "error: model.num_classes=5: data.root={tmp_data} has 10 classes; drop the setting"),
        (
            ["data.batch_size=33", "trainer.devices=2", "trainer.strategy=ddp"],
            "error: data.batch_size=33 is the global batch and must divide by the 2 processes",
        ),
        (["data.batch_size=4096"], "error: data.batch_size=4096 is larger than the training set (2000 images)"),
        (
            ["data.batch_size=abc"],
            "error: data.batch_size: Value 'abc' of type 'str' could not be converted to Integer",
        ),
        (["+data.colour=1"], "error: data.colour: Key 'colour' not in 'Data'"),
        (
            ["ddp.sync_batchnom=true"],
            "error: ddp.sync_batchnom: no such setting (the nearest is ddp.sync_batchnorm); fix the spelling",
        ),
        (["+trainer.sync_batchnorm=true"], "error: trainer.sync_batchnorm: use ddp.sync_batchnorm=true"),
        (
            ["trainer.max_epoch=3"],
            "error: trainer.max_epoch: no such setting (the nearest is trainer.max_epochs); fix the spelling, or add",
        ),
        (
            ["+model.foo=1"],
            "error: model.foo: not an argument of alexnet_dist.models.AlexNetSmall; its arguments: dropout, fc, lrn, "
            "num_classes, width",
        ),
        (["+trainer.max_epoch=3"], "error: trainer.max_epoch: not an argument of lightning.pytorch.Trainer"),
        (["+trainer.logger=false"], "error: trainer.logger: set by alexnet-train itself"),
        (["trainer.max_epochs=-1"], "error: trainer.max_epochs=-1 and trainer.max_steps=-1 give the learning-rate"),
        (
            ["optim.schedule.name=linear"],
            "error: optim.schedule.name: Invalid value 'linear', expected one of [step, plateau",
        ),
        (
            ["loader.dtype=bfloat16"],
            "error: loader.dtype=bfloat16 needs trainer.precision=bf16-mixed (or bf16-true), not 32-true",
        ),
        (
            ["data.mean_image=true"],
            "error: data.mean_image=true but {tmp_data}/mean_image.npy is missing; run alexnet-prepare stats",
        ),
        (
            ["optim.layer_rates=[{{layer:fc9,from_epoch:1,lr:0.1}}]"],
            "error: optim.layer_rates names fc9, which this model has no",
        ),
        pytest.param(
            ["ddp.backend=nccl", "trainer.strategy=ddp"],
            "error: ddp.backend=nccl: NCCL needs CUDA GPUs and a CUDA build of torch; use ddp.backend=gloo",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="NCCL may work on this machine"),
        ),
    ],
)
def test_bad_configuration_stops_with_one_line(tmp_path, synthetic_root, train_here, override, message):
    override = [o.format(tmp=tmp_path) for o in override]
    proc = train_here(*SMOKE, f"data.root={synthetic_root}", *override)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and errors[0].startswith(message.format(tmp=tmp_path, tmp_data=synthetic_root)), (
        proc.stderr[-2000:]
    )
    assert "Traceback" not in proc.stderr


def test_unknown_experiment_lists_the_choices(train_here):
    proc = train_here("experiment=nope")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "Could not find 'experiment/nope'" in proc.stderr and "fashion_mnist" in proc.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ckpt=run.ckpt"], "error: ckpt: no such setting (the nearest is ckpt_path); fix the spelling"),
        (["data.rot=/x"], "error: data.rot: no such setting (the nearest is data.root); fix the spelling"),
        (["views=3"], "error: views=3: choose 1 (centre crop) or 10"),
        (["batch_size=many"], "error: batch_size: Value 'many' of type 'str' could not be converted to Integer"),
        (["run.ckpt"], "error: run.ckpt: expected KEY=VALUE; the keys: ckpt_path, views, data.root, loader"),
    ],
)
def test_alexnet_eval_takes_typed_settings_and_a_wrong_one_is_one_line(capsys, argv, message):
    from alexnet_dist.cli import evaluate

    with pytest.raises(SystemExit) as stop:
        evaluate.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(message) and len(err.splitlines()) == 1, err


def test_every_commands_help_lists_its_settings_with_the_schemas_defaults(capsys):
    from alexnet_dist.bench import cli as bench
    from alexnet_dist.cli import evaluate
    from alexnet_dist.config import Data, Eval, Loader, make

    evaluate.main(["--help"])
    listed = capsys.readouterr().out.split("The settings and their defaults:")[1].split()
    assert listed == [
        "ckpt_path=null",
        "views=1",
        "data.root=null",
        "loader=null",
        "batch_size=100",
        "probs=null",
        "model=null",
    ]
    assert make(Eval).batch_size == 100
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    loader, data = make(Loader), make(Data, {"root": "-"})
    for flag, default in (("--shuffle-window", data.shuffle_window), ("--workers", loader.workers)):
        assert f"{flag} {flag[2:].upper().replace('-', '_')}" in text and f"(default: {default})" in text
    assert bench.parse_args(["loader"]).shuffle_window == data.shuffle_window  # one default, the schema's


@pytest.mark.parametrize(
    "argv, message",
    [
        (["model", "--modle", "alexnet_owt"], "error: --modle: no such option (the nearest is --model)"),
        (["loader", "--shuffle_window=3"], "error: --shuffle_window: no such option (the nearest is --shuffle-window)"),
        (["model", "--steps", "many"], "error: argument --steps: invalid int value: 'many'"),
    ],
)
def test_alexnet_bench_answers_a_wrong_option_in_one_line(capsys, argv, message):
    from alexnet_dist.bench import cli as bench

    with pytest.raises(SystemExit) as stop:
        bench.parse_args(argv)
    assert stop.value.code == 2 and capsys.readouterr().err == message + "\n"
