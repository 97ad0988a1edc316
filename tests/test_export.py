"""A trained network leaves: alexnet-export writes programs that plain torch (without alexnet_dist)
and ONNX Runtime run with the checkpoint's own logits, and alexnet-predict classifies photo files
the way alexnet-eval classifies their stored copies."""

import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BIN, run_cli
from helpers.shards import WDS, data_module

from alexnet_dist.cli import evaluate, export, predict
from alexnet_dist.data.normalize import DeviceNormalize
from alexnet_dist.training import ckpt_format
from alexnet_dist.training.module import Classifier

# One worker holds the trained run the tests share: a session fixture, made once per xdist worker even
# where other modules' tests run between these (a module fixture would be made again after each).
pytestmark = pytest.mark.xdist_group("export")

SMOKE = ["experiment=smoke", "logger=csv", "+trainer.enable_progress_bar=false", "trainer.max_epochs=1"]

# Runs model.pt2 in a Python that refuses to import alexnet_dist: the program needs plain torch only.
PLAIN_TORCH = """
import importlib.abc, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "alexnet_dist":
            raise ImportError("model.pt2 asked for alexnet_dist")

sys.meta_path.insert(0, Refuse())
import torch

program = torch.export.load(sys.argv[1]).module()
torch.save(program(torch.load(sys.argv[2])), sys.argv[3])
"""


@pytest.fixture(scope="session")
def smoke_ckpt(tmp_path_factory, synthetic_root) -> Path:
    """A few steps of the smoke experiment: alexnet_small's shape at 28 px."""
    cwd = tmp_path_factory.mktemp("smoke")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    run_cli("alexnet-train", *SMOKE, f"data.root={synthetic_root}", "run_id=e", cwd=cwd, env=env)
    return cwd / "runs/smoke/e/checkpoints/last.ckpt"


def own_logits(ckpt_path: Path, images: torch.Tensor) -> torch.Tensor:
    """The checkpoint's logits for uint8 images, through the Classifier and training's normaliser."""
    ckpt = ckpt_format.read(ckpt_path)
    inputs = ckpt[ckpt_format.PARTS_KEY]["data"]
    module = Classifier(**{**ckpt["hyper_parameters"], "compile": False, "fuse_norms": False}).eval()
    module.load_state_dict(ckpt["state_dict"])
    normalize = DeviceNormalize(inputs["mean"], inputs["std"], inputs["settings"]["crop"])
    with torch.no_grad():
        return module(normalize(images, None)[0])


def exported_logits(out: Path, images: torch.Tensor, tmp_path: Path) -> dict:
    """{file: logits} of model.pt2 (a plain-torch process) and model.onnx (ONNX Runtime)."""
    import onnxruntime

    torch.save(images, tmp_path / "images.pt")
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_TORCH)
    proc = subprocess.run(
        [str(BIN / "python"), str(script), str(out / "model.pt2"), str(tmp_path / "images.pt"), str(tmp_path / "l.pt")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    onnx = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    return {"model.pt2": torch.load(tmp_path / "l.pt"), "model.onnx": torch.from_numpy(onnx)}


def val_images(root: Path, crop: int, n: int = 7) -> torch.Tensor:
    """uint8 validation crops as the loader gives them (before normalising); an odd batch."""
    batch = next(iter(data_module(root, WDS, crop=crop, val_resize=None, batch_size=32).val_dataloader()))
    return batch.images[:n]


def test_the_export_runs_with_the_checkpoints_own_logits_in_plain_torch_and_onnx(
    smoke_ckpt, synthetic_root, tmp_path, capsys
):
    out = tmp_path / "export"
    export.main([f"ckpt_path={smoke_ckpt}", f"out={out}"])
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert printed["written"] == ["model.onnx", "model.pt2", "preprocess.json", "weights.pt"]
    images = val_images(synthetic_root, 28)
    own = own_logits(smoke_ckpt, images)
    for name, logits in exported_logits(out, images, tmp_path).items():
        assert logits.shape == own.shape == (7, 10), name
        assert torch.allclose(logits, own, atol=1e-4, rtol=0), (name, (logits - own).abs().max())
    pre = json.loads((out / "preprocess.json").read_text())
    ckpt = ckpt_format.read(smoke_ckpt)
    assert pre["classes"] == [f"class{i:03d}" for i in range(10)]
    assert pre["model"] == ckpt["hyper_parameters"]["model"] and pre["model"]["_target_"].endswith("AlexNetSmall")
    assert pre["input"] == {"dtype": "uint8", "layout": "NCHW", "colour": "RGB", "height": 28, "width": 28}
    assert (pre["centre_crop"], pre["resize_short_side"], pre["views"]) == (28, None, 1)
    assert pre["val_top1"] == ckpt[ckpt_format.PARTS_KEY]["training"]["validation"]["val_top1"]
    assert pre["checkpoint"] == str(smoke_ckpt.resolve())
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert set(weights) == {k.removeprefix("model.") for k in ckpt["state_dict"]} and "conv1.weight" in weights


def photos_of(shard: Path, folder: Path) -> dict[str, Path]:
    """The JPEG files of a validation tar, as a user's photo folder; {key: file}."""
    folder.mkdir()
    files = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".jpg"):
                key = member.name.removesuffix(".jpg")
                files[key] = folder / member.name
                files[key].write_bytes(tar.extractfile(member).read())
    return files


def predictions(capsys) -> tuple[dict, list[str]]:
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    return {Path(p["image"]).stem: p["top"] for p in lines}, [e for e in err.splitlines() if e.startswith("error:")]


def test_predict_from_the_export_and_from_the_checkpoint_agrees_with_eval_on_the_stored_copies(
    smoke_ckpt, synthetic_root, tmp_path, capsys
):
    out = tmp_path / "export"
    export.main([f"ckpt_path={smoke_ckpt}", f"out={out}"])
    evaluate.main([f"ckpt_path={smoke_ckpt}", f"probs={tmp_path}/p.npz", "loader=wds"])
    stored = np.load(tmp_path / "p.npz")
    files = photos_of(synthetic_root / "val/000000.tar", tmp_path / "photos")
    (tmp_path / "photos" / "notes.txt").write_text("not a photo")
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    capsys.readouterr()
    got = {}
    for model in (out, smoke_ckpt):
        with pytest.raises(SystemExit) as ended:  # one file could not be read
            predict.main([f"model={model}", f"images={tmp_path}/photos,{tmp_path}/photos/notes.txt", "top_k=3"])
        assert ended.value.code == 1
        got[model], errors = predictions(capsys)
        assert errors == [
            f"error: {tmp_path}/photos/broken.jpg: cannot decode image (cannot identify image file); give an "
            "image file alexnet-prepare reads (.bmp, .gif, .jpeg, .jpg, .pgm, .png, .ppm, .tif, .tiff, .webp)",
            f"error: {tmp_path}/photos/notes.txt: cannot decode image (cannot identify image file); give an image "
            "file alexnet-prepare reads (.bmp, .gif, .jpeg, .jpg, .pgm, .png, .ppm, .tif, .tiff, .webp)",
        ]
        assert set(got[model]) == set(files)  # the text file is no image file of the folder
    rows = {
        key: i
        for i, (shard, key) in enumerate(zip(stored["shards"], stored["keys"], strict=True))
        if shard == "val/000000.tar"
    }
    assert set(rows) == set(files)
    for key, row in rows.items():
        best = int(np.argmax(stored["probs"][row]))
        for model in (out, smoke_ckpt):
            top = got[model][key]
            assert len(top) == 3 and top[0]["class"] == f"class{best:03d}", (key, model)
            assert top[0]["prob"] == pytest.approx(float(stored["probs"][row, best]), abs=1e-4)
            assert [t["prob"] for t in top] == sorted((t["prob"] for t in top), reverse=True)


def test_predict_and_export_refuse_what_they_cannot_use_in_one_line(smoke_ckpt, tmp_path, capsys):
    def fails(main, *argv) -> str:
        with pytest.raises(SystemExit) as ended:
            main(list(argv))
        assert ended.value.code == 2
        return capsys.readouterr().err.strip()

    assert fails(predict.main, f"model={tmp_path}", "images=x.jpg") == (
        f"error: model={tmp_path}: no model.pt2 in it; write the folder with alexnet-export"
    )
    assert fails(predict.main, f"model={smoke_ckpt}", "images=x.jpg", "views=3") == (
        "error: views=3: choose 1 (centre crop) or 10 (corners, centre and mirrors)"
    )
    assert fails(predict.main, f"model={smoke_ckpt}") == (
        "error: alexnet-predict needs model=EXPORT_FOLDER_OR_CHECKPOINT and images=FILE[,FILE...]"
    )
    (tmp_path / "empty").mkdir()
    assert fails(predict.main, f"model={smoke_ckpt}", f"images={tmp_path}/empty").startswith(
        f"error: images={tmp_path}/empty: no image files under it"
    )
    copy = tmp_path / "elsewhere.ckpt"
    old = ckpt_format.read(smoke_ckpt)
    del old[ckpt_format.PARTS_KEY]["data"]  # as an earlier release wrote it, and outside its run directory
    torch.save(old, copy)
    assert fails(export.main, f"ckpt_path={copy}", f"out={tmp_path}/x") == (
        f"error: ckpt_path={copy}: this checkpoint of an earlier release does not record its data settings, and "
        f"no config.yaml of its run is at {tmp_path.parent}/config.yaml; put it back into its run directory "
        "(RUN/checkpoints/)"
    )


def test_a_checkpoint_copied_out_of_its_run_evaluates_as_its_run_did(smoke_ckpt, tmp_path, capsys):
    """The checkpoint carries its data settings (crop 28, no resize, the run's mean and std), so a
    copy without its run's config.yaml scores what the run measured, not what the defaults would."""
    copy = tmp_path / "elsewhere" / "copy.ckpt"
    copy.parent.mkdir()
    copy.write_bytes(smoke_ckpt.read_bytes())
    scores = []
    for path in (smoke_ckpt, copy):
        evaluate.main([f"ckpt_path={path}"])
        scores.append(json.loads(capsys.readouterr().out.splitlines()[0]))
    measured = json.loads((smoke_ckpt.parents[1] / "results.json").read_text())
    for score in scores:
        assert score["val_count"] == 500 and score["val_top1"] == pytest.approx(measured["val_top1"], abs=1e-6)
        assert score["val_loss"] == pytest.approx(measured["val_loss"], rel=1e-5)
