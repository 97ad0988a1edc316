"""Checkpoint and manifest formats: files written before they carried a version (tests/data/format-v0,
made by an earlier alexnet_dist) still resume, evaluate and read; files of a newer format are
refused in one line."""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from alexnet_dist.cli import evaluate
from alexnet_dist.data.manifest import MANIFEST_VERSION, Manifest
from alexnet_dist.errors import ConfigError, DataError
from alexnet_dist.training import ckpt_format
from alexnet_dist.training.checkpoint import BestCheckpoint, resume_checkpoint, set_rng_state

OLD = Path(__file__).parent / "data" / "format-v0"
OLD_CKPT = OLD / "run" / "checkpoints" / "last.ckpt"
V1 = Path(__file__).parent / "data" / "format-v1"  # its checkpoint trained on OLD's shards
# The settings the old run was trained with (tests/data/format-v0/README.md)
OLD_RUN = [
    "experiment=smoke",
    "data.batch_size=16",
    "optim.lr=0.05",
    "model.width=8",
    "model.fc=32",
    "logger=csv",
    "loader=wds",
    "loader.workers=0",
    "+trainer.enable_progress_bar=false",
]


def one_error_line(capsys, argv: list[str]) -> str:
    """alexnet-eval run in this process: it must stop with status 2 and one `error:` line."""
    with pytest.raises(SystemExit) as stop:
        evaluate.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def newer(ckpt_dir: Path) -> Path:
    """The old checkpoint as a checkpoint of the format after the current one would be."""
    ckpt = ckpt_format.read(OLD_CKPT)
    ckpt[ckpt_format.VERSION_KEY] = ckpt_format.FORMAT_VERSION + 1
    ckpt_dir.mkdir(parents=True)
    torch.save(ckpt, ckpt_dir / "last.ckpt")
    return ckpt_dir / "last.ckpt"


def test_an_old_checkpoint_resumes_training_and_continues_the_step_count(tmp_path, cli_env):
    before = json.loads((OLD / "run" / "results.json").read_text())
    shutil.copy(OLD_CKPT, tmp_path / "old.ckpt")
    args = [f"data.root={OLD / 'shards'}", f"resume={tmp_path / 'old.ckpt'}", "run_id=on", "trainer.max_epochs=4"]
    proc = run_cli("alexnet-train", *OLD_RUN, *args, cwd=tmp_path, env=cli_env, timeout=120)
    assert "resuming from" in proc.stdout
    run_dir = tmp_path / "runs" / "smoke" / "on"
    results = json.loads((run_dir / "results.json").read_text())
    assert before["global_step"] == 18 and results["global_step"] == 24 and results["epochs"] == 4
    # what it wrote is of the current format, each part under its registered name
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt[ckpt_format.VERSION_KEY] == ckpt_format.FORMAT_VERSION and ckpt["global_step"] == 24
    assert set(ckpt[ckpt_format.PARTS_KEY]) == set(ckpt_format.PARTS)
    assert not {"rng", "plateau", "skipped_steps", "ShardDataModule"} & set(ckpt)


@pytest.mark.parametrize("old", [OLD, V1], ids=["format 0", "format 1"])
def test_an_old_checkpoint_evaluates_to_what_its_run_measured(capsys, old):
    before = json.loads((old / "run" / "results.json").read_text())
    evaluate.main([f"ckpt_path={old / 'run/checkpoints/last.ckpt'}", f"data.root={OLD / 'shards'}"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["val_count"] == before["val_count"] and result["val_top1"] == before["val_top1"]
    assert result["val_loss"] == pytest.approx(before["val_loss"], abs=1e-5)  # the very weights


def test_a_checkpoint_of_a_newer_format_is_refused_in_one_line(tmp_path, capsys):
    path = newer(tmp_path / "run" / "checkpoints")
    line = one_error_line(capsys, [f"ckpt_path={path}", f"data.root={OLD / 'shards'}"])
    now = ckpt_format.FORMAT_VERSION
    assert line == (
        f"error: {path}: checkpoint format {now + 1} is newer than this alexnet_dist reads ({now}); "
        "upgrade alexnet_dist to load it"
    )
    # resume=auto does not take it for a damaged file and fall back to an older one
    (path.parent / "step-000000001.ckpt").write_bytes(OLD_CKPT.read_bytes())
    with pytest.raises(ConfigError, match="is newer than this alexnet_dist reads"):
        resume_checkpoint("auto", path.parent)
    with pytest.raises(ConfigError, match="is newer than this alexnet_dist reads"):
        ckpt_format.FormatIO().load_checkpoint(path, weights_only=True)  # Lightning's resume


def test_the_first_format_0_layout_is_upgraded():
    """Generator states as tuples and tensors, plateau without the later keys, ModelCheckpoint's
    best score and the arguments the module no longer takes, as the earliest checkpoints held them."""
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    keys = np.random.get_state()
    rng = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": [keys[0], torch.from_numpy(keys[1].astype(np.int64)), *keys[2:]],
    }
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    plateau = {"best": 0.5, "bad_epochs": 1, "drops": 0}
    old = {
        "state_dict": {},
        "hyper_parameters": {"model": {"name": "alexnet_small"}, "steps_per_epoch": 10, "max_epochs": 2},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_top1'}": {"monitor": "val_top1", "best_model_score": 0.75}},
        "plateau": plateau,
        "rng": [rng],
        "ShardDataModule": {"loader": [{}]},
    }
    new = ckpt_format.upgrade(old, "old.ckpt")
    assert new[ckpt_format.VERSION_KEY] == ckpt_format.FORMAT_VERSION
    assert new["hyper_parameters"] == {"model": {"_target_": "alexnet_dist.models.AlexNetSmall"}}
    assert new["callbacks"]["BestCheckpoint"] == {"monitor": "val_top1", "best": 0.75}
    training = new[ckpt_format.PARTS_KEY]["training"]
    assert training["plateau"] == plateau and training["skipped_steps"] == 0
    assert new[ckpt_format.PARTS_KEY]["loader"] == [{}] and "ShardDataModule" not in new
    state = training["rng"][0]
    assert isinstance(state["torch"], bytes) and isinstance(state["python"][1], bytes)
    set_rng_state(state)  # the generators continue exactly where the old run stopped
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws


def test_best_checkpoint_reads_the_score_of_an_old_best_ckpt(tmp_path):
    ckpt = torch.load(OLD_CKPT, weights_only=True)
    assert ckpt["callbacks"]["BestCheckpoint"]["best"] is not None
    torch.save(ckpt, tmp_path / "best.ckpt")
    assert BestCheckpoint(tmp_path).score_on_disk() == ckpt["callbacks"]["BestCheckpoint"]["best"]


def test_an_old_manifest_reads_and_one_without_a_version_finds_its_index_files(tmp_path):
    manifest = Manifest.read(OLD / "shards")
    assert manifest.data["version"] == MANIFEST_VERSION == 2 and manifest.num_classes == 4
    assert (manifest.sample_format.images, manifest.sample_format.label) == (("jpg",), "cls")  # as version 1 read
    root = tmp_path / "shards"
    shutil.copytree(OLD / "shards", root)
    data = json.loads((root / "manifest.json").read_text())
    del data["version"]  # version 0: no version, and no index named
    for info in data["splits"].values():
        for shard in info["shards"]:
            del shard["index"]
    (root / "manifest.json").write_text(json.dumps(data))
    shards = Manifest.read(root).shards("val")
    assert [s.index for s in shards] == [str(root / "val" / f"00000{n}.idx") for n in (0, 1)]


def test_a_manifest_of_a_newer_version_is_refused_in_one_line(tmp_path, capsys):
    root = tmp_path / "shards"
    shutil.copytree(OLD / "shards", root)
    data = json.loads((root / "manifest.json").read_text())
    data["version"] = MANIFEST_VERSION + 1
    (root / "manifest.json").write_text(json.dumps(data))
    line = one_error_line(capsys, [f"ckpt_path={OLD_CKPT}", f"data.root={root}"])
    assert line == (
        f"error: {root / 'manifest.json'}: manifest version {MANIFEST_VERSION + 1} is newer than this "
        f"alexnet_dist reads ({MANIFEST_VERSION}); upgrade alexnet_dist to read it"
    )
    data["version"] = "1"
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="'version' is not a whole number"):
        Manifest.read(root)


def test_a_format_1_checkpoint_names_its_network_by_target_and_exports_with_its_runs_settings(tmp_path, capsys):
    """Format 1 named the network {"name": ...} and recorded no data settings: it upgrades to the
    _target_, and alexnet-export takes the rest from its run's config.yaml and the shards."""
    from alexnet_dist.cli import export

    ckpt = ckpt_format.read(V1 / "run/checkpoints/last.ckpt")
    assert ckpt["hyper_parameters"]["model"] == {
        "_target_": "alexnet_dist.models.AlexNetSmall",
        "width": 8,
        "fc": 32,
        "dropout": 0.0,
        "lrn": True,
        "num_classes": 4,
    }
    export.main([f"ckpt_path={V1 / 'run/checkpoints/last.ckpt'}", f"out={tmp_path}", f"data.root={OLD / 'shards'}"])
    pre = json.loads((tmp_path / "preprocess.json").read_text())
    assert pre["classes"] == Manifest.read(OLD / "shards").classes and pre["centre_crop"] == 28
    assert pre["model"] == ckpt["hyper_parameters"]["model"]
