"""Images in other tools' tars that the two loaders must read alike (EXIF orientation 1-8 and
values outside it, orientations DALI does not read, colour profiles, grey, CMYK, palette and
alpha), and tars that alexnet-prepare index must refuse because a split would read them twice
or validation would train on them.

Every picture is made here as the array a viewer shows (`shown`); the bytes store it turned by
the inverse of their orientation tag, so a loader that ignores the tag, or cuts its crop from the
stored sides, shows other pixels. Both loaders, the ten test views and read_photo (alexnet-eval
and alexnet-predict's path) are checked against that array and against each other.
"""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from helpers.shards import data_module, write_tar
from PIL import Image, ImageCms, PngImagePlugin

from alexnet_dist.data.images import stored_copy
from alexnet_dist.data.index import index_shards
from alexnet_dist.data.photos import Geometry, read_photo
from alexnet_dist.errors import DataError

W, H, CROP = 24, 16, 12  # the picture as shown is W x H; stored turned for orientations 5-8
# Measured here (DALI 2.4's CPU decoder against PIL 13 on these pictures): the same pixels, but
# CMYK JPEGs a level apart (the CMYK to RGB rounding). A JPEG at quality 95 of these pictures
# is up to 16 levels off the picture it was made from (at the block's edges); a wrong turn or
# window is off by 100 and more.
LOADERS_APART = 1
JPEG_ERROR = 20
LOADERS = {"wds": {"name": "wds", "workers": 0}, "dali": {"name": "dali"}}

# For orientation n, the stored array from the array shown (the inverse of what a viewer does)
STORED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, 1),  # shown turned 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, -1),  # shown turned 90 degrees anticlockwise
}


def shown(i: int) -> np.ndarray:
    """Picture i as shown: ramps that differ along x and y, and a block in one corner, so that a
    turn, a mirror or a crop one pixel off changes many pixels by far more than JPEG does."""
    y, x = np.mgrid[0:H, 0:W]
    a = np.stack([40 + x * 7, 30 + y * 11, 200 - (x + y) * 3 + i], -1)
    a[:5, :5] = (230, 230, 40)
    return np.clip(a, 0, 255).astype(np.uint8)


def tag(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def in_mode(image: Image.Image, mode: str) -> Image.Image:
    """`image` in PIL mode `mode`, pixel by pixel (a palette without dithering, whose pattern would
    depend on the direction it is scanned in)."""
    return image.convert(mode, dither=Image.Dither.NONE) if mode == "P" else image.convert(mode)


def encode(array: np.ndarray, fmt: str, mode: str = "RGB", **options) -> bytes:
    out = io.BytesIO()
    if fmt == "JPEG":  # colour at full resolution: 4:2:0 would blur the block's edges by far more
        options = {"subsampling": 0, **options}
    in_mode(Image.fromarray(np.ascontiguousarray(array), "RGB"), mode).save(out, format=fmt, **options)
    return out.getvalue()


XMP_6 = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
)


def text_chunk_exif(orientation: int) -> PngImagePlugin.PngInfo:
    """EXIF as ImageMagick keeps it in a PNG: hex in a text chunk (PIL reads it; DALI does not)."""
    raw = tag(orientation).tobytes()
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", f"\nexif\n{len(raw):8d}\n{raw.hex()}\n")
    return info


def cases() -> dict[str, tuple[str, bytes, np.ndarray, str]]:
    """name: (extension, bytes, the RGB picture both loaders must show, its mode as shown)."""
    xyz = ImageCms.ImageCmsProfile(ImageCms.createProfile("XYZ")).tobytes()  # not sRGB: applied, it would show
    out = {}
    for n in range(1, 9):
        out[f"jpg-{n}"] = ("jpg", encode(STORED[n](shown(n)), "JPEG", quality=95, exif=tag(n)), shown(n), "RGB")
    made = [  # (name, ext, orientation the loaders apply, format, mode, save options)
        ("jpg-0", "jpg", 1, "JPEG", "RGB", {"quality": 95, "exif": tag(0)}),  # outside 1-8: as stored
        ("jpg-9", "jpg", 1, "JPEG", "RGB", {"quality": 95, "exif": tag(9)}),
        ("jpg-grey-6", "jpg", 6, "JPEG", "L", {"quality": 95, "exif": tag(6)}),
        ("jpg-cmyk", "jpg", 1, "JPEG", "CMYK", {"quality": 95}),
        ("jpg-cmyk-8", "jpg", 8, "JPEG", "CMYK", {"quality": 95, "exif": tag(8)}),
        ("jpg-profile", "jpg", 1, "JPEG", "RGB", {"quality": 95, "icc_profile": xyz}),
        ("jpg-profile-5", "jpg", 5, "JPEG", "RGB", {"quality": 95, "icc_profile": xyz, "exif": tag(5)}),
        ("jpg-xmp-6", "jpg", 1, "JPEG", "RGB", {"quality": 95, "xmp": XMP_6}),  # DALI reads no XMP: as stored
        ("png-6", "png", 6, "PNG", "RGB", {"exif": tag(6)}),
        ("png-palette-8", "png", 8, "PNG", "P", {"exif": tag(8)}),
        ("png-alpha-7", "png", 7, "PNG", "RGBA", {"exif": tag(7)}),
        ("png-grey-alpha-3", "png", 3, "PNG", "LA", {"exif": tag(3)}),
        ("png-profile", "png", 1, "PNG", "RGB", {"icc_profile": xyz}),
        ("png-text-exif-6", "png", 1, "PNG", "RGB", {"pnginfo": text_chunk_exif(6)}),  # as stored, as DALI
        ("webp-profile", "webp", 1, "WEBP", "RGB", {"lossless": True, "icc_profile": xyz}),
    ]
    for i, (name, ext, n, fmt, mode, options) in enumerate(made, start=9):
        data = encode(STORED[n](shown(i)), fmt, mode, **options)
        want = in_mode(Image.fromarray(shown(i)), mode).convert("RGB")  # grey shows grey, CMYK as PIL converts
        out[name] = (ext, data, np.asarray(want), mode)
    return out


def error(got: np.ndarray, want: np.ndarray) -> int:
    assert got.shape == want.shape, (got.shape, want.shape)
    return int(np.abs(got.astype(int) - want.astype(int)).max())


def window(crop: np.ndarray, picture: np.ndarray) -> int:
    """The smallest error of `crop` against any window of `picture` or of its mirror image."""
    h, w = crop.shape[:2]
    return min(
        error(crop, p[top : top + h, left : left + w])
        for p in (picture, picture[:, ::-1])
        for top in range(picture.shape[0] - h + 1)
        for left in range(picture.shape[1] - w + 1)
    )


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> tuple[Path, dict, dict]:
    """Every case as a training and a validation sample (class = its place), indexed."""
    root = tmp_path_factory.mktemp("foreign")
    made = cases()
    for split in ("train", "val"):
        (root / split).mkdir()
        members = []
        for c, (name, (ext, data, _, _)) in enumerate(made.items()):
            members += [(f"{split}-{name}.{ext}", data), (f"{split}-{name}.cls", str(c).encode())]
        write_tar(root / split / "shard-000000.tar", members)
    manifest = index_shards(f"{root}/train/", f"{root}/val/", root / "out")
    return root, made, manifest


def test_the_index_takes_every_case_at_its_size_as_shown(indexed):
    _, made, manifest = indexed
    for split in ("train", "val"):
        assert (manifest["splits"][split]["count"], manifest["splits"][split]["skipped"]) == (len(made), [])
    # every picture is W x H as shown, whatever its stored sides: no image_size where they differed
    assert (manifest["image_size"], manifest["min_side"]) == ([W, H], H)


@pytest.mark.parametrize("mode", ["val", "test"])
def test_both_loaders_show_every_accepted_picture_alike_in_evaluation(indexed, mode):
    """The centre crop (validation) and the ten views (alexnet-eval's test pass)."""
    root, made, _ = indexed
    names = {f"val-{name}": name for name in made}
    got = {}
    for loader, settings in LOADERS.items():
        dm = data_module(root / "out", settings, batch_size=8, crop=CROP, val_resize=None, test_views=10)
        batches = dm.val_dataloader() if mode == "val" else dm.test_dataloader()
        for batch in batches:
            for images, (_, key) in zip(batch.images, batch.keys, strict=True):
                got[loader, names[key]] = (images if mode == "test" else images[None]).permute(0, 2, 3, 1).numpy()
    top, left = (H - CROP) // 2, (W - CROP) // 2
    for name, (ext, _, picture, _) in made.items():
        wds, dali = got["wds", name], got["dali", name]
        assert error(wds, dali) <= LOADERS_APART, name
        centre = picture[top : top + CROP, left : left + CROP]
        assert error(wds[4 if mode == "test" else 0], centre) <= (0 if ext != "jpg" else JPEG_ERROR), name
        if mode == "test":  # the views: corners, centre, then mirrored
            corner = picture[H - CROP :, W - CROP :]
            assert error(wds[3], corner) <= JPEG_ERROR and error(wds[8], corner[:, ::-1]) <= JPEG_ERROR, name


def training_crops(root, made, augment: str) -> dict:
    """{(loader, picture name): the HWC training crop} of epoch 0, from both loaders."""
    names = {f"train-{name}": name for name in made}
    got = {}
    for loader, settings in LOADERS.items():
        dm = data_module(root / "out", settings, batch_size=1, crop=CROP, augment=augment, epoch=0)
        for batch in dm.train_dataloader():
            for image, (_, key) in zip(batch.images, batch.keys, strict=True):
                got[loader, names[key]] = image.permute(1, 2, 0).numpy()
    return got


def test_both_loaders_cut_training_windows_from_the_picture_as_shown(indexed):
    """The paper's windows are drawn on the sides as shown (an orientation of 5-8 swaps them) and
    cut from the picture as shown, by both loaders alike."""
    root, made, _ = indexed
    got = training_crops(root, made, "paper")
    assert len(got) == 2 * len(made)
    for name, (ext, _, picture, _) in made.items():
        assert error(got["wds", name], got["dali", name]) <= LOADERS_APART, name
        assert window(got["wds", name], picture) <= (0 if ext != "jpg" else JPEG_ERROR), name


def test_modern_crops_of_turned_pictures_agree_between_the_loaders(indexed):
    """Random-resized crops: on a CPU both loaders resize the region with the same filter
    (resized_crop.resized), so they agree as their windows do, turned pictures included."""
    root, made, _ = indexed
    got = training_crops(root, made, "modern")
    for name in made:
        assert error(got["wds", name], got["dali", name]) <= LOADERS_APART, name


def test_a_photo_is_read_as_the_loaders_read_it_and_as_prepare_stores_it(indexed, tmp_path):
    """read_photo (alexnet-predict, and evaluation of single files) of a model trained on indexed
    tars gives the wds loader's ten views; alexnet-prepare stores every case upright, as shown."""
    root, made, _ = indexed
    geometry = Geometry(resize=None, center_crop=False, quality=None, crop=CROP, val_resize=None)
    dm = data_module(root / "out", LOADERS["wds"], batch_size=8, crop=CROP, val_resize=None, test_views=10)
    views = {
        key: images for batch in dm.test_dataloader() for images, (_, key) in zip(batch.images, batch.keys, strict=True)
    }
    for name, (ext, data, picture, _) in made.items():
        path = tmp_path / f"{name}.{ext}"
        path.write_bytes(data)
        assert error(read_photo(path, geometry, views=10).numpy(), views[f"val-{name}"].numpy()) == 0, name
        _, stored = stored_copy(data, name, None, False, 95)
        lossy = ext == "jpg"
        assert error(np.asarray(stored.convert("RGB")), picture) <= (JPEG_ERROR if lossy else 0), name


def test_a_webp_with_exif_which_dali_cannot_decode_is_skipped_with_why(tmp_path):
    picture = shown(0)
    train = [
        ("ok.webp", encode(picture, "WEBP", lossless=True)),
        ("ok.cls", b"0"),
        ("tagged.webp", encode(picture, "WEBP", lossless=True, exif=tag(1))),
        ("tagged.cls", b"0"),
        ("turned.webp", encode(STORED[6](picture), "WEBP", lossless=True, exif=tag(6))),
        ("turned.cls", b"0"),
    ]
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        write_tar(tmp_path / split / "a.tar", [(f"{split}-{name}", data) for name, data in train])
    manifest = index_shards(f"{tmp_path}/train/", f"{tmp_path}/val/", tmp_path / "out", max_skipped=1)
    t = f"{tmp_path}/train/a.tar"
    why = "the .webp is a WebP with EXIF metadata, which DALI cannot decode; store it without EXIF, or as JPEG"
    assert manifest["splits"]["train"]["skipped"] == [f"{t}:train-tagged: {why}", f"{t}:train-turned: {why}"]


# --- a tar read by both splits, or twice by one ---


def tars(folder: Path, names: list[str], start: int = 0) -> None:
    """Small tars of two samples each, every one with samples of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, name in enumerate(names, start):
        members = []
        for i in range(2):
            members += [(f"s{n}-{i}.jpg", encode(shown(n * 2 + i), "JPEG")), (f"s{n}-{i}.cls", b"0")]
        write_tar(folder / name, members)


@pytest.fixture
def layout(tmp_path) -> Path:
    """data/train/{a,b}.tar, data/val/v.tar, and a link and a copy of a training tar elsewhere."""
    tars(tmp_path / "data" / "train", ["a.tar", "b.tar"])
    tars(tmp_path / "data" / "val", ["v.tar"], start=5)
    (tmp_path / "other").mkdir()
    os.symlink(tmp_path / "data" / "train" / "a.tar", tmp_path / "other" / "link.tar")
    (tmp_path / "other" / "copy.tar").write_bytes((tmp_path / "data" / "train" / "a.tar").read_bytes())
    return tmp_path


ONCE = (
    "a tar belongs to one split, once (validation tars trained on inflate the validation score, and a tar read "
    "twice counts its samples twice)"
)


@pytest.mark.parametrize(
    "train, val, tar, where",
    [
        # a folder pattern for --train that holds the --val tars
        ("data/", "data/val/", "data/val/v.tar", "by --train {r}/data/ and by --val {r}/data/val/"),
        # the same tar in both lists, written two ways
        ("data/train/", "{r}/data/train/./b.tar", "data/train/b.tar", "by --train {r}/data/train/ and by --val {v}"),
        # two patterns of one split matching one file: a.tar and ./a.tar
        ("data/train/{a.tar,./a.tar,b.tar}", "data/val/", "data/train/a.tar", "twice by --train {t}"),
        # a link to a training tar, as a second name
        ("data/train/{a,b}.tar", "other/link.tar", "data/train/a.tar", "by --train {t} and by --val {v}"),
    ],
)
def test_a_tar_named_twice_is_refused_in_one_line_naming_both_places(layout, cli_env, train, val, tar, where):
    r = str(layout)
    train, val = (f"{r}/{p}" if not p.startswith("{r}") else p.format(r=r) for p in (train, val))
    result = run_cli(
        "alexnet-prepare",
        "index",
        "--train",
        train,
        "--val",
        val,
        "--out",
        r + "/out",
        cwd=layout,
        env=cli_env,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    named = where.format(r=r, t=train, v=val)
    line = f"error: {r}/{tar}: named {named}; {ONCE}: change the patterns so that each tar matches once"
    assert result.stderr.strip().splitlines() == [line]
    assert not (layout / "out" / "manifest.json").exists()


def test_a_copy_of_a_tar_under_another_name_is_refused_naming_both(layout):
    r = str(layout)
    with pytest.raises(DataError) as caught:
        index_shards(f"{r}/data/train/", f"{r}/other/copy.tar", layout / "out")
    assert str(caught.value) == (
        f"{r}/other/copy.tar (--val {r}/other/copy.tar) holds the same samples as {r}/data/train/a.tar "
        f"(--train {r}/data/train/), a copy of it; {ONCE}: leave one of the two out of the patterns"
    )


def test_a_copy_in_the_object_store_and_on_disk_is_refused(layout, object_store):
    """The same tar uploaded to S3 and kept on disk, one in each split."""
    url = object_store.upload(layout / "data" / "val", "s3://foreign-twice/val/")
    with pytest.raises(DataError, match=r"^s3://foreign-twice/val/v\.tar \(--val s3://.*\) holds the same samples as "):
        index_shards(f"{layout}/data/", url + "/", layout / "out")


def test_different_tars_with_the_same_keys_are_not_copies(tmp_path):
    """Tars whose samples are numbered from 0 in each (as some writers do) are told apart by their bytes."""
    for split, start in (("train", 0), ("val", 3)):
        (tmp_path / split).mkdir()
        members = []
        for i in range(2):
            members += [(f"{i:06d}.jpg", encode(shown(start + i), "JPEG")), (f"{i:06d}.cls", b"0")]
        write_tar(tmp_path / split / "shard-000000.tar", members)
    manifest = index_shards(f"{tmp_path}/train/", f"{tmp_path}/val/", tmp_path / "out")
    assert (manifest["splits"]["train"]["count"], manifest["splits"]["val"]["count"]) == (2, 2)


@pytest.mark.parametrize(
    "change, tar, where",
    [
        (lambda s: s["train"]["shards"].append(s["val"]["shards"][0]), "val/v.tar", "in split 'train' and in 'val'"),
        (lambda s: s["val"]["shards"].append(s["train"]["shards"][1]), "train/b.tar", "in split 'train' and in 'val'"),
        (lambda s: s["train"]["shards"].append(s["train"]["shards"][0]), "train/a.tar", "twice in split 'train'"),
    ],
)
def test_a_manifest_listing_a_tar_twice_stops_training_in_one_line(layout, change, tar, where):
    r, out = str(layout), layout / "out"
    index_shards(f"{r}/data/train/", f"{r}/data/val/", out)
    data = json.loads((out / "manifest.json").read_text())
    change(data["splits"])
    for split in data["splits"].values():  # the counts still add up: only the tar listed twice is wrong
        split["count"] = sum(s["count"] for s in split["shards"])
    (out / "manifest.json").write_text(json.dumps(data))
    twice = f"{r}/data/{tar}"
    with pytest.raises(DataError) as caught:
        data_module(out, LOADERS["wds"], batch_size=2, crop=CROP)
    assert str(caught.value) == (
        f"{out}/manifest.json: lists {twice} {where}, but a tar belongs to one split, once; re-run "
        "alexnet-prepare (index refuses such patterns)"
    )


def test_a_held_out_split_of_the_same_tars_still_trains(layout):
    """--val-fraction: both splits name the training tars, each with its own index files."""
    out = layout / "out"
    index_shards(f"{layout}/data/train/", None, out, val_fraction=0.25)
    dm = data_module(out, LOADERS["wds"], batch_size=1, crop=CROP)
    assert sum(len(b.labels) for b in dm.val_dataloader()) == 1
    assert tarfile.is_tarfile(dm.manifest.shards("val")[0].tar)
