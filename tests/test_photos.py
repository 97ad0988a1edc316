"""Original photo files read for prediction (data/photos.py): every mode alexnet-prepare accepts,
read from its original file, gives bit for bit the validation image the loader gives its stored
copy, with and without a resize in preparation and in validation, for one view and for ten."""

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from helpers.shards import WDS, data_module
from PIL import Image

from alexnet_dist.data import shard_index
from alexnet_dist.data.manifest import Manifest
from alexnet_dist.data.photos import Geometry, read_photo
from alexnet_dist.errors import ConfigError, DataError

CLASSES = ("cat", "dog", "owl")


def picture(seed: int, size: tuple[int, int]) -> np.ndarray:
    """A photo-like RGB picture: smooth colour fields (a 5x5 grid of random colours, enlarged)
    with fine noise on top, so that every resize, crop offset and JPEG step shows in its pixels."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    return np.clip(np.asarray(coarse, np.int16) + rng.integers(-25, 26, (size[1], size[0], 3)), 0, 255).astype(np.uint8)


def saved(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


def rotated_jpeg(a: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: turn 90 degrees clockwise to show; 3: turn 180
    return saved(Image.fromarray(a), "JPEG", quality=92, exif=exif)


def sixteen_bit_grey(a: np.ndarray) -> bytes:
    deep = (a.astype(np.float64).mean(-1) * 257 + np.arange(a.shape[1]) * 3).clip(0, 65535).astype(np.uint16)
    return saved(Image.fromarray(deep), "PNG")  # PIL opens it as I;16 (or I)


def with_alpha(a: np.ndarray) -> bytes:
    alpha = np.linspace(0, 255, a.shape[1]).astype(np.uint8)[None, :].repeat(a.shape[0], 0)
    return saved(Image.fromarray(np.dstack([a, alpha]), "RGBA"), "PNG")


# name: how its file is made from a picture. Sizes below are odd and uneven on purpose.
MAKERS = {
    "rgb.jpg": lambda a: saved(Image.fromarray(a), "JPEG", quality=95),  # kept byte for byte without --resize
    "grey.jpg": lambda a: saved(Image.fromarray(a).convert("L"), "JPEG", quality=88),  # kept too
    "cmyk.jpg": lambda a: saved(Image.fromarray(a).convert("CMYK"), "JPEG", quality=95),
    "turned.jpg": lambda a: rotated_jpeg(a, 6),
    "upside.jpg": lambda a: rotated_jpeg(a, 3),
    "alpha.png": with_alpha,
    "grey.png": lambda a: saved(Image.fromarray(a).convert("L"), "PNG"),
    "palette.png": lambda a: saved(Image.fromarray(a).quantize(37), "PNG"),
    "deep.png": sixteen_bit_grey,
    "plain.bmp": lambda a: saved(Image.fromarray(a), "BMP"),
}
SIZES = [(47, 41), (38, 53), (59, 44)]


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    """An image folder of 3 classes: every kind of file in MAKERS twice in validation (in two
    classes, at two sizes), one small picture per class in training. Returns {key in the shards:
    original file} of the validation photos."""
    src = tmp_path_factory.mktemp("photos")
    files, seed = {}, 0
    for copy in range(2):
        for i, (name, make) in enumerate(MAKERS.items()):
            label = CLASSES[(i + copy) % len(CLASSES)]
            stem = f"{Path(name).stem}{copy}"
            path = src / "val" / label / f"{stem}{Path(name).suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(make(picture(seed, SIZES[(i + copy) % len(SIZES)])))
            files[f"{label}_{stem}"] = path  # how alexnet-prepare keys <class>/<stem>
            seed += 1
    for label in CLASSES:
        (src / "train" / label).mkdir(parents=True)
        Image.fromarray(picture(seed, (40, 40))).save(src / "train" / label / "one.png")
        seed += 1
    return files


@pytest.fixture(scope="module")
def prepared(originals, tmp_path_factory) -> dict[str, Path]:
    """The folder prepared by alexnet-prepare as it is and resized: {how: shards}. Run as the
    command (a new process), so no fork happens in a test process where DALI may run threads."""
    src = next(iter(originals.values())).parents[2]
    out = {}
    for how, args in {"as-is": [], "resized": ["--resize", "43", "--center-crop", "--quality", "75"]}.items():
        out[how] = tmp_path_factory.mktemp(how)
        command = ["imagefolder", "--src", src, "--out", out[how], "--min-shards", "2", "--workers", "1", *args]
        run_cli("alexnet-prepare", *command, cwd=out[how], env=dict(os.environ))
    return out


def stored_views(root: Path, loader: dict, views: int, **data) -> dict[str, tuple[int, torch.Tensor]]:
    """{key: (label, uint8 image)} of the validation split as the loader gives it, before
    normalisation; the ten views (10, 3, crop, crop) when views=10. Rows are matched to keys by
    the shards' order, which the loaders read in: manifest order, then index order."""
    dm = data_module(root, loader, test_views=views, **data)
    batches = list(dm.test_dataloader() if views == 10 else dm.val_dataloader())
    keys = [
        shard_index.entry(line, shard.index)[2].removesuffix(".jpg")
        for shard in dm.manifest.shards("val")
        for line in shard_index.read(shard)
    ]
    images = torch.cat([b.images for b in batches])
    labels = torch.cat([b.labels for b in batches]).tolist()
    assert len(keys) == len(images) == len(labels)
    return {key: (label, image) for key, label, image in zip(keys, labels, images, strict=True)}


def differences(originals: dict, root: Path, loader: dict, views: int, crop: int, val_resize: int | None) -> list:
    """(file, largest pixel difference) of each original photo that read_photo does not read
    exactly as `loader` gives its stored copy in `root`'s validation split."""
    data = dict(crop=crop, val_resize=val_resize)
    geometry = Geometry.of(Manifest.read(root), data_module(root, WDS, **data).settings)
    stored = stored_views(root, loader, views, **data)
    assert sorted(stored) == sorted(originals)  # every photo was stored, none skipped
    different = []
    for key, path in originals.items():
        label, expected = stored[key]
        assert CLASSES[label] == key.split("_")[0]
        photo = read_photo(path, geometry, views)
        assert photo.dtype == torch.uint8 and photo.shape == (views, 3, crop, crop)
        expected = expected.reshape(photo.shape)
        if not torch.equal(photo, expected):
            different.append((path.name, int((photo.int() - expected.int()).abs().max())))
    return different


@pytest.mark.parametrize(
    "how, views, crop, val_resize",
    [
        ("as-is", 1, 32, None),
        ("as-is", 1, 28, 36),
        ("as-is", 10, 28, 36),
        ("resized", 1, 40, None),
        ("resized", 1, 32, 37),
        ("resized", 10, 32, None),
    ],
)
def test_every_original_photo_reads_as_the_loader_gives_its_stored_copy(
    originals, prepared, how, views, crop, val_resize
):
    assert differences(originals, prepared[how], WDS, views, crop, val_resize) == []


@pytest.mark.parametrize("how, views", [("as-is", 1), ("resized", 10)])
def test_dali_in_cpu_mode_gives_the_same_pixels_where_validation_does_not_resize(originals, prepared, how, views):
    """DALI's CPU decoder and PIL (both libjpeg-turbo here) decode the stored JPEGs alike, grey
    ones included, and the crops lie at the same places. (With data.val_resize the two resizes
    differ: measured up to 5 grey levels, a mean of 0.3-0.6 per image, on these noisy photos.)"""
    assert differences(originals, prepared[how], {"name": "dali"}, views, 32, None) == []


def test_the_manifest_records_how_images_were_stored_and_an_older_one_reads_as_unknown(prepared):
    assert Manifest.read(prepared["resized"]).storage == {"resize": 43, "center_crop": True, "quality": 75}
    assert Manifest.read(prepared["as-is"]).storage == {"resize": None, "center_crop": False, "quality": 90}
    old = Manifest.read(Path(__file__).parent / "data" / "format-v0" / "shards")  # written before the record
    assert old.storage is None
    assert Geometry.of(old, data_module(prepared["as-is"], WDS, crop=24).settings) == Geometry(
        None, False, None, 24, 256
    )


def test_with_unknown_storage_a_photo_is_only_made_upright_and_8_bit(originals, tmp_path):
    """No resize and no JPEG round trip: the EXIF-turned JPEG comes out turned (its original
    pixels, as PIL decodes them); a transparent PNG as both loaders decode it from indexed tars
    (alpha dropped: the colour under it), so that a model trained on such tars sees the same."""
    unknown = Geometry(None, False, None, 32, None)
    turned = next(path for key, path in originals.items() if key.endswith("upside0"))
    image = Image.open(turned)
    want = np.array(image.rotate(180))  # orientation 3
    left, top = (image.width - 32 + 1) // 2, (image.height - 32 + 1) // 2
    assert torch.equal(read_photo(turned, unknown)[0].permute(1, 2, 0), torch.from_numpy(want[top:, left:][:32, :32]))
    clear = tmp_path / "clear.png"
    clear.write_bytes(saved(Image.new("RGBA", (33, 35), (200, 10, 10, 0)), "PNG"))
    assert read_photo(clear, unknown)[0].permute(1, 2, 0).reshape(-1, 3).unique(dim=0).tolist() == [[200, 10, 10]]


def test_the_geometry_round_trips_through_json_and_a_wrong_one_is_one_line(tmp_path):
    geometry = Geometry(256, True, 90, 224, 256)
    assert Geometry.from_dict(json.loads(json.dumps(geometry.to_dict())), "preprocess.json") == geometry
    cases = {
        "val_resize a string": ({**geometry.to_dict(), "val_resize": "x"}, "val_resize 'x' is neither null nor"),
        "a key too many": ({**geometry.to_dict(), "mean": 1}, "the image geometry holds ['center_crop', 'crop'"),
        "a list": ([1, 2], "the image geometry holds list, not"),
        "quality 0": ({**geometry.to_dict(), "quality": 0}, "'center_crop': True, 'quality': 0} is not"),
        "centre crop without resize": (
            {**geometry.to_dict(), "resize": None},
            "is not alexnet-prepare's --resize, --center-crop",
        ),
        "crop 0": ({**geometry.to_dict(), "crop": 0}, "crop 0 is not a positive whole number"),
    }
    for name, (values, message) in cases.items():
        with pytest.raises(DataError) as info:
            Geometry.from_dict(values, "model/preprocess.json")
        text = str(info.value)
        assert text.startswith("model/preprocess.json: ") and message in text and "\n" not in text, name


def test_a_file_that_is_no_photo_or_no_file_is_one_line_naming_it(tmp_path, originals):
    geometry = Geometry(None, False, 90, 32, None)
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a picture")
    cut = tmp_path / "cut.png"
    photo = next(path for key, path in originals.items() if key.endswith("alpha0"))
    cut.write_bytes(photo.read_bytes()[:200])
    for path, why in (
        (notes, "cannot decode image"),
        (cut, "cannot decode image"),
        (tmp_path / "gone.jpg", "cannot read it (No such file or directory); check the path"),
        (tmp_path, "cannot read it (Is a directory)"),
    ):
        with pytest.raises(DataError) as info:
            read_photo(path, geometry)
        assert str(info.value).startswith(f"{path}: {why}") and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="views=5: choose 1"):
        read_photo(photo, geometry, 5)


def test_a_manifest_whose_storage_record_is_wrong_is_refused_in_one_line(prepared, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(prepared["as-is"], root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["storage"]["center_crop"] = True  # a centre crop needs a resize
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"manifest.json: 'storage' is not \{resize: null or a side"):
        Manifest.read(root)


def test_predicting_the_original_photos_agrees_with_evaluating_their_stored_copies(
    originals, prepared, train_here, tmp_path, capsys
):
    """A model trained on the resized shards; alexnet-predict on every original file (each mode)
    gives, image for image, the ten-view probabilities alexnet-eval gives its stored copy."""
    import json

    from alexnet_dist.cli import evaluate, predict

    root = prepared["resized"]
    settings = ["data.crop=32", "data.val_resize=37", "data.batch_size=3", "data.test_views=10"]
    run = train_here(
        "experiment=smoke",
        f"data.root={root}",
        *settings,
        "trainer.max_epochs=2",
        "logger=csv",
        "loader=wds",
        "loader.workers=0",
        "run_id=p",
        "+trainer.enable_progress_bar=false",
    )
    assert run.returncode == 0, run.stderr[-2000:]
    ckpt = tmp_path / "runs/smoke/p/checkpoints/last.ckpt"
    evaluate.main([f"ckpt_path={ckpt}", f"probs={tmp_path}/p.npz", "views=10", "loader=wds"])
    stored = np.load(tmp_path / "p.npz")
    capsys.readouterr()
    folder = next(iter(originals.values())).parents[1]  # val/<class>/<file>
    predict.main([f"model={ckpt}", f"images={folder}", "top_k=3"])  # views: the run's own ten
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    got = {f"{Path(p['image']).parent.name}_{Path(p['image']).stem}": p["top"] for p in lines}
    assert sorted(got) == sorted(originals) == sorted(stored["keys"].tolist())
    for row, key in enumerate(stored["keys"].tolist()):
        probs = stored["probs"][row]
        assert [t["class"] for t in got[key]] == [CLASSES[i] for i in np.argsort(-probs)[:3]], key
        assert [t["prob"] for t in got[key]] == pytest.approx(np.sort(probs)[::-1][:3].tolist(), abs=1e-5), key
