"""ImageNet as downloaded, in miniature: synset folders and a per-class tar for train (with a
CMYK JPEG and a PNG named .JPEG among them), flat validation images with Kaggle's label file."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from conftest import run_cli, run_here
from PIL import Image

# one pytest-xdist worker runs them all: the source and its 256 px shards are made once
pytestmark = pytest.mark.xdist_group("imagenet")
WNIDS = ["n01440764", "n01443537", "n01484850"]


def photo(seed: int, size=(90, 70)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, 3)
    ramp = np.linspace(0, 80, size[0])[None, :, None]
    return Image.fromarray(np.clip(base + ramp + rng.normal(0, 10, (size[1], size[0], 3)), 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, fmt="JPEG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


@pytest.fixture(scope="session")
def imagenet_src(tmp_path_factory):
    src = tmp_path_factory.mktemp("ilsvrc")
    for c, wnid in enumerate(WNIDS[:2]):  # synset folders
        (src / "train" / wnid).mkdir(parents=True)
        for i in range(8):
            (src / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg(photo(10 * c + i)))
    (src / "train" / WNIDS[0] / f"{WNIDS[0]}_cmyk.JPEG").write_bytes(jpeg(photo(99).convert("CMYK")))
    (src / "train" / WNIDS[1] / f"{WNIDS[1]}_png.JPEG").write_bytes(jpeg(photo(98), "PNG"))
    with tarfile.open(src / "train" / f"{WNIDS[2]}.tar", "w") as tar:  # a per-class tar
        for i in range(8):
            data = jpeg(photo(50 + i, (60, 80)))
            info = tarfile.TarInfo(f"{WNIDS[2]}_{i}.JPEG")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (src / "val").mkdir()
    rows = ["ImageId,PredictionString"]
    for i in range(6):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        (src / "val" / f"{name}.JPEG").write_bytes(jpeg(photo(200 + i)))
        rows.append(f"{name},{WNIDS[i % 3]} 1 2 3 4")
    (src / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return src


@pytest.fixture(scope="session")
def imagenet_256(tmp_path_factory, imagenet_src):
    """The paper's storage format (256x256 centre squares) with its statistics (alexnet-prepare
    stats), prepared once for the tests that train and evaluate on it, as docs/reproducing-2012.md
    prepares ImageNet."""
    data = tmp_path_factory.mktemp("imagenet-wds")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    args = ["--src", imagenet_src, "--out", data, "--resize", "256", "--center-crop", "--min-shards", "2"]
    run_cli("alexnet-prepare", "imagenet", *args, cwd=data, env=env)
    run_cli("alexnet-prepare", "stats", "--out", data, cwd=data, env=env)
    return data


def read_shards(root, split):
    out = {}
    for tar_path in sorted((root / split).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in files.items():
            if name.endswith(".jpg"):
                out[name[:-4]] = (int(files[name[:-4] + ".cls"]), Image.open(io.BytesIO(data)))
    return out


def test_imagenet_becomes_rgb_jpeg_shards_with_the_right_labels(tmp_path, imagenet_src, cli_env):
    out = tmp_path / "shards"
    proc = run_cli(
        "alexnet-prepare",
        "imagenet",
        "--src",
        imagenet_src,
        "--out",
        out,
        "--resize",
        "64",
        "--center-crop",
        "--min-shards",
        "2",
        "--workers",
        "2",
        cwd=tmp_path,
        env=cli_env,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == WNIDS and manifest["image_size"] == [64, 64]
    assert manifest["splits"]["train"]["class_counts"] == {"0": 9, "1": 9, "2": 8}
    assert manifest["splits"]["val"]["class_counts"] == {"0": 2, "1": 2, "2": 2}
    train, val = read_shards(out, "train"), read_shards(out, "val")
    assert all(
        image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 64)
        for _, image in list(train.values()) + list(val.values())
    )
    assert train[f"{WNIDS[0]}_{WNIDS[0]}_cmyk"][0] == 0 and train[f"{WNIDS[1]}_{WNIDS[1]}_png"][0] == 1
    assert train[f"{WNIDS[2]}_{WNIDS[2]}_3"][0] == 2  # from the per-class tar
    assert {key: label for key, (label, _) in val.items()} == {
        f"val_ILSVRC2012_val_{i + 1:08d}": i % 3 for i in range(6)
    }
    assert "train: 26 images in 2 shards" in proc.stdout


def test_an_interrupted_preparation_keeps_finished_shards(tmp_path, imagenet_src, cli_env):
    out = tmp_path / "shards"
    args = ["alexnet-prepare", "imagenet", "--src", imagenet_src, "--out", out, "--min-shards", "3"]
    run_cli(*args, cwd=tmp_path, env=cli_env)
    first = {p.name: p.read_bytes() for p in (out / "train").glob("*.tar")}
    kept = out / "train" / "000000.tar"
    before = kept.stat().st_mtime_ns
    os.remove(out / "train" / "000001.json")  # as if the run died while writing shard 1
    run_cli(*args, cwd=tmp_path, env=cli_env)
    assert kept.stat().st_mtime_ns == before  # finished shards are not rewritten
    assert {p.name: p.read_bytes() for p in (out / "train").glob("*.tar")} == first


def test_flat_validation_without_labels_is_one_line(tmp_path, imagenet_src, cli_env):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(imagenet_src, src)
    os.remove(src / "LOC_val_solution.csv")
    proc = run_cli(
        "alexnet-prepare", "imagenet", "--src", src, "--out", tmp_path / "o", cwd=tmp_path, env=cli_env, check=False
    )
    assert proc.returncode == 2 and "LOC_val_solution.csv is missing; pass --val-labels FILE" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(480)  # the 60-million-parameter network at 224 px on a CPU, and its preparation
def test_prepare_train_the_2012_recipe_and_evaluate_ten_views(tmp_path, imagenet_256, cli_env, capsys):
    """The commands of docs/reproducing-2012.md at toy scale (the evaluations and the export in
    this process: their command lines' mains, without a new Python each)."""
    from alexnet_dist.cli import evaluate, export

    data = imagenet_256
    run_cli(
        "alexnet-train",
        "experiment=alexnet2012",
        f"data.root={data}",
        "data.batch_size=8",
        "trainer.max_epochs=1",
        "logger=csv",
        "run_id=toy",
        "+trainer.enable_progress_bar=false",
        cwd=tmp_path,
        env=cli_env,
        timeout=600,
    )
    run_dir = tmp_path / "runs/alexnet2012/toy"
    sizes = {name: Image.open(run_dir / "pictures" / f"{name}.png").size for name in ("conv1", "augmented", "curves")}
    # 96 filters 11x11; 8 crops of 224 px in a row, captioned; three panels of curves
    assert sizes == {"conv1": (772, 292), "augmented": (1828, 248), "curves": (1500, 420)}
    ckpt = run_dir / "checkpoints/last.ckpt"
    import torch

    state = torch.load(ckpt, weights_only=True)["callbacks"]["Pictures"]  # the curves survive a resume
    assert len(state["series"]["val_top1"]) == 1 and state["series"]["train_loss"]
    results = {}
    for views in (1, 10):
        proc = run_here(
            evaluate.main, f"ckpt_path={ckpt}", f"views={views}", f"probs={tmp_path}/v{views}.npz", capsys=capsys
        )
        results[views] = json.loads(proc.stdout.splitlines()[0])
        assert results[views]["val_count"] == 6 and results[views]["views"] == views
    ten = np.load(tmp_path / "v10.npz")
    assert ten["probs"].shape == (6, 3) and np.allclose(ten["probs"].sum(1), 1, atol=1e-5)
    assert sorted(ten["labels"].tolist()) == [0, 0, 1, 1, 2, 2]  # labels from the csv, in shard order
    proc = run_here(evaluate.main, "ensemble", f"probs={tmp_path}/v1.npz,{tmp_path}/v10.npz", capsys=capsys)
    both = json.loads(proc.stdout.splitlines()[0])
    mean = (np.load(tmp_path / "v1.npz")["probs"] + ten["probs"]) / 2
    assert both["val_top1"] == pytest.approx((mean.argmax(1) == ten["labels"]).mean())
    assert both["val_loss"] == pytest.approx(-np.log(mean[np.arange(6), ten["labels"]]).mean(), rel=1e-4)

    # the two-tower network leaves as programs with its own logits (plain torch and ONNX Runtime)
    import onnxruntime

    from alexnet_dist.trained.export import program
    from alexnet_dist.trained.inputs import load

    run_here(export.main, f"ckpt_path={ckpt}", f"out={tmp_path}/x", capsys=capsys)
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = program(load(ckpt))(images)
        exported = torch.export.load(tmp_path / "x/model.pt2").module()(images)
    session = onnxruntime.InferenceSession(str(tmp_path / "x/model.onnx"))
    onnx = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])
    for logits in (exported, onnx):
        assert torch.allclose(logits, own, atol=1e-4, rtol=0), (logits - own).abs().max()


def flat(colour):
    return Image.new("RGB", (32, 32), colour)


def test_stats_of_a_known_image_set(tmp_path, cli_env):
    """Half the images one flat colour, half another: the mean is their midpoint and the colour
    covariance has one axis, along their difference, with std |difference| / 2."""
    from functools import partial

    from helpers.shards import data_module

    from alexnet_dist.data import sources
    from alexnet_dist.data.shards import write_dataset

    a, b = np.array([200.0, 60.0, 40.0]), np.array([40.0, 120.0, 200.0])
    train = [sources.Sample(f"s{i}", partial(flat, tuple(int(v) for v in (a if i % 2 else b))), 0) for i in range(40)]
    write_dataset(
        sources.Source(["only"], {"train": train, "val": train[:4]}),
        tmp_path,
        source_name="test",
        quality=100,
        min_shards=4,
        progress=False,
    )
    proc = run_cli("alexnet-prepare", "stats", "--out", tmp_path, "--sample", "40", cwd=tmp_path, env=cli_env)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["images"] == 40 and "wrote" in proc.stdout
    assert np.allclose(stats["channel_mean"], (a + b) / 2, atol=1.5)
    d = a - b
    assert stats["pca_std"][2] == pytest.approx(np.linalg.norm(d) / 2, rel=0.02) and max(stats["pca_std"][:2]) < 2
    axis = np.array(stats["pca_vectors"])[:, 2]
    assert abs(axis @ d / np.linalg.norm(d)) == pytest.approx(1, abs=1e-3)
    mean_image = np.load(tmp_path / "mean_image.npy")
    assert mean_image.shape == (32, 32, 3) and np.allclose(mean_image.mean((0, 1)), (a + b) / 2, atol=1.5)
    assert Image.open(tmp_path / "mean_image.png").size == (32, 32)
    dm = data_module(tmp_path, batch_size=4, crop=32)  # the loaders' colour noise now uses these axes
    assert np.allclose(dm.augment.pca_std, stats["pca_std"]) and np.allclose(
        dm.augment.pca_vectors, stats["pca_vectors"]
    )


@pytest.mark.slow
def test_torchvision_layout_weights_evaluate_like_the_same_weights_in_a_checkpoint(tmp_path, imagenet_256, capsys):
    """A plain state dict (model=alexnet_owt) and a checkpoint of an earlier release holding the same
    weights in its run directory (whose config.yaml names the data) score alike; the checkpoint
    exports, its programs computing what the plain network computes. (alexnet-eval and -export in
    this process: their command lines' mains, without a new Python each.)"""
    import torch

    from alexnet_dist.cli import evaluate, export
    from alexnet_dist.models import create

    data = imagenet_256
    torch.manual_seed(0)
    weights = create("alexnet_owt", 3).state_dict()  # torchvision's names: features.0.weight ...
    torch.save(weights, tmp_path / "alexnet-owt.pth")
    hparams = {"model": {"name": "alexnet_owt", "num_classes": 3}, "optim": {}, "global_batch": 1}
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"data: {{root: {data}}}\nloader: {{name: auto}}\n")
    same = run_dir / "checkpoints/same.ckpt"
    # format 1: the network by its name, no record of the data (the config.yaml has it)
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in weights.items()},
            "hyper_parameters": hparams,
            "alexnet_dist_format": 1,
        },
        same,
    )
    common = [f"data.root={data}", "views=10"]
    plain = run_here(
        evaluate.main, f"ckpt_path={tmp_path}/alexnet-owt.pth", "model=alexnet_owt", *common, capsys=capsys
    )
    ckpt = run_here(evaluate.main, f"ckpt_path={same}", "views=10", capsys=capsys)
    a, b = (json.loads(p.stdout.splitlines()[0]) for p in (plain, ckpt))
    assert a["val_count"] == 6 and {k: a[k] for k in ("val_top1", "val_top5", "val_loss")} == {
        k: b[k] for k in ("val_top1", "val_top5", "val_loss")
    }
    wrong = run_here(
        evaluate.main, f"ckpt_path={tmp_path}/alexnet-owt.pth", "model=alexnet2012", *common, capsys=capsys, check=False
    )
    assert wrong.returncode == 2 and "does not fit alexnet_dist.models.AlexNet2012 with 3 classes" in wrong.stderr
    run_here(export.main, f"ckpt_path={same}", f"out={tmp_path}/owt", capsys=capsys)
    pre = json.loads((tmp_path / "owt/preprocess.json").read_text())
    assert (pre["resize_short_side"], pre["centre_crop"], pre["stored"]["resize"]) == (256, 224, 256)
    assert torch.load(tmp_path / "owt/weights.pt", weights_only=True).keys() == weights.keys()
    images = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8)
    mean, std = (torch.tensor(pre["normalisation"][k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    net = create("alexnet_owt", 3).eval()
    net.load_state_dict(weights)
    with torch.no_grad():
        own = net((images.float() - mean) / std)
    program = torch.export.load(tmp_path / "owt/model.pt2").module()
    assert torch.allclose(program(images), own, atol=1e-4, rtol=0)


def test_flat_validation_with_the_devkits_ground_truth_and_meta_mat(tmp_path, imagenet_src, cli_env):
    """The devkit numbers the classes its own way (ILSVRC2012_ID, not sorted synsets): here id 1 is
    the third synset; meta.mat maps them."""
    from scipy.io import savemat

    devkit = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    ids = {WNIDS[2]: 1, WNIDS[0]: 2, WNIDS[1]: 3}
    synsets = np.array(
        [(i, w, "words") for w, i in ids.items()] + [(1001, "n00001740", "entity")],
        dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O")],
    )
    savemat(devkit / "meta.mat", {"synsets": synsets})
    truth = [ids[WNIDS[i % 3]] for i in range(6)]  # the same labels as the csv of the fixture
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(map(str, truth)) + "\n")
    out = tmp_path / "shards"
    run_cli(
        "alexnet-prepare",
        "imagenet",
        "--src",
        imagenet_src,
        "--out",
        out,
        "--val-labels",
        devkit / "ILSVRC2012_validation_ground_truth.txt",
        "--min-shards",
        "2",
        cwd=tmp_path,
        env=cli_env,
    )
    val = read_shards(out, "val")
    assert {key: label for key, (label, _) in val.items()} == {
        f"val_ILSVRC2012_val_{i + 1:08d}": i % 3 for i in range(6)
    }
