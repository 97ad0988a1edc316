"""alexnet-prepare against real faults: awkward names, hidden and broken folder entries, every
image mode PIL opens, a re-run with other settings, kill -9 and Ctrl-C. Each ends in a named
skip, a one-line error, or the right shards; never a traceback, a hang or a silent mix."""

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, run_cli
from PIL import Image, PngImagePlugin

from alexnet_dist.data import shards, sources
from alexnet_dist.data.images import encode
from alexnet_dist.data.manifest import Manifest
from alexnet_dist.data.shards import write_dataset
from alexnet_dist.data.stats import compute_stats
from alexnet_dist.errors import DataError

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def read_shards(out: Path, split: str = "train") -> dict:
    """{key: (label, decoded image)} of the shards the manifest lists."""
    manifest = json.loads((out / "manifest.json").read_text())
    found = {}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(out / shard["tar"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            key, ext = name.split(".", 1)
            assert key not in found or ext == "cls", f"{key} twice"
            if ext == "jpg":
                label = int(members[f"{key}.cls"])
                found[key] = (label, Image.open(io.BytesIO(data)))
    return found


def flat(path: Path, colour, size=(24, 24), fmt=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)


def mean_colour(image) -> tuple:
    return tuple(np.asarray(image.convert("RGB"), dtype=float).reshape(-1, 3).mean(0).round())


# ---------------------------------------------------------------- source folders


@pytest.mark.parametrize("kind", ["imagefolder", "imagenet"])
def test_names_that_clean_to_one_key_keep_every_image_with_its_label(tmp_path, kind):
    train = tmp_path / "src" / "train"
    images = {  # (class, file): colour; each pair differs only in a non-ASCII letter or punctuation
        ("café", "x.jpg"): (250, 0, 0),
        ("cafe_", "x.jpg"): (0, 250, 0),
        ("a.b", "x.jpg"): (0, 0, 250),
        ("a_b", "x.jpg"): (250, 250, 0),
        ("a_b", "x.png"): (0, 250, 250),  # x.jpg beside x.png: two images
        ("a_b", "y" * 150 + ".jpg"): (250, 0, 250),  # too long for a tar header as it is
        ("cafe_", os.fsdecode(b"caf\xe9.jpg")): (120, 120, 250),  # names that are not UTF-8 (Latin-1)
        ("cafe_", os.fsdecode(b"caf\xe8.jpg")): (250, 120, 120),
    }
    for (cls, name), colour in images.items():
        flat(train / cls / name, colour)
    source = getattr(sources, kind)(tmp_path / "src")
    assert source.classes == ["a.b", "a_b", "cafe_", "café"]
    write_dataset(source, tmp_path / "out", source_name=kind, min_shards=2, quality=95, progress=False)
    stored = read_shards(tmp_path / "out")
    assert len(stored) == len(images)
    assert all("." not in key and len(key) <= 96 for key in stored)
    got = sorted((label, mean_colour(image)) for label, image in stored.values())
    want = sorted((source.classes.index(cls), colour) for (cls, _), colour in images.items())
    assert [g[0] for g in got] == [w[0] for w in want]
    assert all(np.abs(np.subtract(g[1], w[1])).max() <= 3 for g, w in zip(got, want, strict=True)), (got, want)
    assert "a_b_x_jpg" in stored and "a_b_x_png" in stored  # readable where that stays unique


def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path):
    src = tmp_path / "src"
    for split in ("train", "val"):
        for cls, colour in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
            flat(src / split / cls / f"{cls}0.jpg", colour)
        flat(src / split / ".ipynb_checkpoints" / "cat0-checkpoint.jpg", (0, 200, 0))
    flat(src / "train" / ".cache" / "x.jpg", (0, 200, 0))
    (src / "train" / "cat" / ".DS_Store").write_bytes(b"\0Bud1")
    (src / "train" / "cat" / "._cat0.jpg").write_bytes(b"\0\5\26\7 macOS resource fork")  # AppleDouble
    source = sources.imagefolder(src)
    assert source.classes == ["cat", "dog"]
    manifest = write_dataset(source, tmp_path / "out", source_name="imagefolder", min_shards=1, progress=False)
    assert [manifest["splits"][s]["count"] for s in ("train", "val")] == [2, 2]
    assert manifest["splits"]["train"]["skipped"] == [] and manifest["splits"]["val"]["skipped"] == []


def test_hidden_folders_beside_flat_imagenet_validation_images_are_ignored(tmp_path):
    src = tmp_path / "src"
    flat(src / "train" / "n01" / "a.JPEG", (200, 0, 0), fmt="JPEG")
    flat(src / "train" / "n02" / "b.JPEG", (0, 0, 200), fmt="JPEG")
    flat(src / "val" / "v1.JPEG", (200, 0, 0), fmt="JPEG")
    flat(src / "val" / ".ipynb_checkpoints" / "v1-checkpoint.JPEG", (0, 200, 0), fmt="JPEG")
    (src / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nv1,n01 1 2 3 4\n")
    source = sources.imagenet(src)
    assert [(s.key, s.label) for s in source.splits["val"]] == [("val/v1", 0)]


def test_broken_and_stray_entries_are_named_and_counted_and_links_that_work_are_followed(tmp_path, cli_env):
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    train = src / "train"
    for i in range(2):
        flat(train / "cat" / f"cat{i}.jpg", (200, 0, 0))
        flat(train / "dog" / f"dog{i}.jpg", (0, 0, 200))
        flat(src / "val" / "cat" / f"cat{i}.jpg", (200, 0, 0))
    flat(elsewhere / "birds" / "bird0.jpg", (0, 200, 0))
    flat(elsewhere / "cat.jpg", (200, 0, 0))
    os.symlink(elsewhere / "birds", train / "bird")  # a symlinked class folder
    os.symlink(elsewhere / "cat.jpg", train / "cat" / "linked.jpg")  # a symlinked image
    broken = {
        train / "cat" / "dangling.jpg": "a broken symlink",
        train / "cat" / "loop.jpg": "a broken symlink",
        train / "cat" / "folder.jpg": "a folder inside a class folder",
        train / "cat" / "fifo.jpg": "not a regular file",  # a read would block for ever
        train / "cat" / "notes.txt": "not an image file",
        train / "cat" / "broken.jpg": "cannot decode image",
        train / "loop": "a broken symlink",
        train / "gone": "a broken symlink",
        train / "readme.txt": "a file beside the class folders",
    }
    os.symlink(tmp_path / "nowhere.jpg", train / "cat" / "dangling.jpg")
    os.symlink("loop.jpg", train / "cat" / "loop.jpg")
    flat(train / "cat" / "folder.jpg" / "inside.jpg", (200, 0, 0))
    os.mkfifo(train / "cat" / "fifo.jpg")
    (train / "cat" / "notes.txt").write_text("where these came from")
    (train / "cat" / "broken.jpg").write_bytes(b"not a JPEG at all")
    os.symlink("loop", train / "loop")  # a class-level symlink loop
    os.symlink(tmp_path / "nowhere", train / "gone")
    (train / "readme.txt").write_text("classes")
    out = tmp_path / "out"
    proc = run_cli(
        "alexnet-prepare",
        "imagefolder",
        "--src",
        src,
        "--out",
        out,
        "--workers",
        2,
        cwd=tmp_path,
        env=cli_env,
        timeout=60,
    )
    assert "Traceback" not in proc.stderr
    assert f"train: 6 images in 7 shards, {len(broken)} skipped (see manifest.json)" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["bird", "cat", "dog"]
    skipped = manifest["splits"]["train"]["skipped"]
    assert len(skipped) == len(broken)
    for path, why in broken.items():
        assert [line for line in skipped if line.startswith(f"{path}: ") and why in line], (path, skipped)
    stored = read_shards(out)
    assert stored["cat_linked"][0] == 1 and stored["bird_bird0"][0] == 0
    assert mean_colour(stored["bird_bird0"][1])[1] > 190


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty class", "src/train/empty: no images (looked for "),
        ("class of strays only", "src/train/dog: no images (looked for "),
        ("only hidden folders", "src/train: no class sub-folders"),
        ("src is a file", "src: a file, not a folder; --src wants the folder that holds"),
        ("damaged per-class tar", "src/train/n02.tar: not a readable tar"),
        ("center crop without resize", "--center-crop crops to the --resize side: pass --resize N too"),
        ("shard size 0", "--shard-size 0: must be 1 or more"),
        ("synthetic val count 0", "--val-count 0: must be 1 or more"),
    ],
)
def test_unusable_sources_and_settings_are_one_line(tmp_path, cli_env, case, message):
    src, kind, extra = tmp_path / "src", "imagefolder", []
    flat(src / "train" / "cat" / "cat0.jpg", (200, 0, 0))
    if case == "empty class":
        (src / "train" / "empty").mkdir()
    elif case == "class of strays only":
        (src / "train" / "dog").mkdir()
        (src / "train" / "dog" / "notes.txt").write_text("to do")
        (src / "train" / "dog" / ".DS_Store").write_bytes(b"\0Bud1")
    elif case == "only hidden folders":
        os.rename(src / "train" / "cat", src / "train" / ".ipynb_checkpoints")
    elif case == "src is a file":
        os.rename(src, tmp_path / "elsewhere")
        src.write_text("not a folder")
    elif case == "damaged per-class tar":
        kind = "imagenet"
        (src / "train" / "n02.tar").write_bytes(b"half a download" * 100)
    elif case == "center crop without resize":
        extra = ["--center-crop"]
    elif case == "shard size 0":
        extra = ["--shard-size", "0"]
    elif case == "synthetic val count 0":  # was a manifest that Manifest.read refused at training
        kind, extra = "synthetic", ["--val-count", "0"]
    proc = run_cli(
        "alexnet-prepare", kind, "--src", src, "--out", tmp_path / "out", *extra, cwd=tmp_path, env=cli_env, check=False
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr


# ---------------------------------------------------------------- image modes


def halves(left, right, size=32) -> np.ndarray:
    """A size x size picture, `left` in its left half and `right` in its right one."""
    a = np.empty((size, size, len(np.atleast_1d(left))))
    a[:, : size // 2], a[:, size // 2 :] = left, right
    return a.squeeze(-1) if a.shape[-1] == 1 else a


def halves_only(a: np.ndarray, axis: int = 1) -> np.ndarray:
    """`a` without the 8 columns (or rows) around its middle, where JPEG blurs colours into each other."""
    middle = a.shape[axis] // 2
    return np.delete(a, range(middle - 4, middle + 4), axis)


def saved(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


def png16(a: np.ndarray) -> bytes:
    """A 16-bit PNG (grey, RGB or RGBA by the last axis), written by hand: PIL writes none."""
    h, w, c = a.shape
    raw = b"".join(b"\0" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2, 4: 6}[c], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def palette_image(indices: np.ndarray, mode="P") -> Image.Image:
    image = Image.fromarray(indices.astype(np.uint8), "P")
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    return image


def pa_image() -> Image.Image:
    pa = Image.merge("PA", [palette_image(np.zeros((32, 32))), Image.fromarray(halves(255, 0).astype(np.uint8))])
    pa.putpalette([255, 0, 0] + [0] * 765)
    return pa


def pgm16(a: np.ndarray) -> bytes:
    return f"P5\n{a.shape[1]} {a.shape[0]}\n65535\n".encode() + a.astype(">u2").tobytes()


WHITE, RED, BLUE = (255, 255, 255), (255, 0, 0), (0, 0, 255)
YCBCR = (100 + 1.402 * 72, 100 - 0.714136 * 72, 100)  # Y 100, Cb 128, Cr 200 by the JFIF formulas
MODES = {  # name: (what the source gives: an image or a file's bytes, the stored picture expected)
    "1": (saved(Image.fromarray(halves(0, 1).astype(bool)), "PNG"), halves(0, 255)),
    "L": (saved(Image.fromarray(halves(30, 200).astype(np.uint8)), "PNG"), halves(30, 200)),
    "LA": (
        saved(Image.fromarray(np.dstack([halves(100, 100), halves(255, 0)]).astype(np.uint8), "LA"), "PNG"),
        halves(100, 255),  # the transparent half on white
    ),
    "P": (saved(palette_image(halves(0, 1)), "PNG"), halves(RED, BLUE)),
    "P with a transparent colour": (saved(palette_image(halves(0, 1)), "PNG", transparency=1), halves(RED, WHITE)),
    "PA": (pa_image(), halves(RED, WHITE)),
    "RGB": (
        saved(Image.fromarray(halves((10, 200, 30), (200, 30, 10)).astype(np.uint8)), "PNG"),
        halves((10, 200, 30), (200, 30, 10)),
    ),
    "RGBA": (
        saved(Image.fromarray(halves((10, 200, 30, 255), (200, 30, 10, 0)).astype(np.uint8)), "PNG"),
        halves((10, 200, 30), WHITE),
    ),
    "CMYK": (
        saved(Image.fromarray(halves((0, 255, 0, 0), (255, 0, 0, 0)).astype(np.uint8), "CMYK"), "JPEG", quality=95),
        halves((255, 0, 255), (0, 255, 255)),  # magenta and cyan
    ),
    "YCbCr": (Image.new("YCbCr", (32, 32), (100, 128, 200)), halves(YCBCR, YCBCR)),
    "I;16 (16-bit grey PNG)": (png16(halves(12850, 65535)[..., None]), halves(50, 255)),
    "I;16B": (Image.frombytes("I;16B", (32, 32), halves(25700, 51400).astype(">u2").tobytes()), halves(100, 200)),
    "I (16-bit PGM)": (pgm16(halves(30000, 60000)), halves(30000 / 257, 60000 / 257)),
    "F in 0..1": (saved(Image.fromarray(halves(0.2, 0.8).astype(np.float32)), "TIFF"), halves(51, 204)),
    "F in 0..255": (saved(Image.fromarray(halves(20, 220).astype(np.float32)), "TIFF"), halves(20, 220)),
    "F in 0..65535": (saved(Image.fromarray(halves(1000, 60000).astype(np.float32)), "TIFF"), halves(4, 233)),
    "16-bit RGB PNG": (png16(halves((65535, 0, 32896), (0, 65535, 0))), halves((255, 0, 128), (0, 255, 0))),
    "16-bit RGBA PNG": (png16(halves((65535, 0, 0, 65535), (0, 0, 65535, 0))), halves(RED, WHITE)),
}
REFUSED = {  # name: (image, what the skip says)
    "I outside 0..65535": (Image.fromarray(halves(-5, 70000).astype(np.int32)), "no known scale"),
    "F with NaN": (saved(Image.fromarray(halves(0.5, np.nan).astype(np.float32)), "TIFF"), "NaN"),
}


def given(item):
    return item


def test_every_image_mode_is_stored_as_the_right_8_bit_picture(tmp_path):
    cases = {**MODES, **{name: (item, None) for name, (item, _) in REFUSED.items()}}
    names = sorted(cases)
    samples = [sources.Sample(f"m{i}", partial(given, cases[n][0]), 0, n) for i, n in enumerate(names)]
    out = tmp_path / "out"
    manifest = write_dataset(
        sources.Source(["only"], {"train": samples}), out, source_name="test", quality=95, min_shards=1, progress=False
    )
    stored = read_shards(out)
    results, wrong = {}, {}
    for i, name in enumerate(names):
        want = cases[name][1]
        if want is None:
            continue
        image, mode = stored[f"m{i}"][1], "L" if want.ndim == 2 else "RGB"
        error = float(np.abs(halves_only(np.asarray(image.convert(mode), dtype=float) - want)).mean())
        results[name] = (image.mode, round(error, 2))  # grey stays grey; mean error within JPEG's
        if image.mode != mode or error >= 3:
            wrong[name] = results[name]
    assert wrong == {}, results
    assert [name for i, name in enumerate(names) if cases[name][1] is None and f"m{i}" in stored] == []
    skipped = manifest["splits"]["train"]["skipped"]
    for name, (_, why) in REFUSED.items():
        assert [line for line in skipped if line.startswith(f"{name}: cannot store it") and why in line], skipped
    assert len(skipped) == len(REFUSED)


def test_an_exif_rotated_jpeg_is_stored_upright(tmp_path):
    picture = np.zeros((16, 32, 3), np.uint8)
    picture[:, :16] = RED
    picture[:, 16:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to show"
    item = saved(Image.fromarray(picture), "JPEG", quality=95, exif=exif)
    out = tmp_path / "out"
    write_dataset(
        sources.Source(["only"], {"train": [sources.Sample("r", partial(given, item), 0)]}),
        out,
        source_name="test",
        min_shards=1,
        progress=False,
    )
    image = read_shards(out)["r"][1]
    assert image.size == (16, 32) and 0x0112 not in image.getexif()
    assert np.abs(halves_only(np.asarray(image, dtype=float) - np.rot90(picture, -1), axis=0)).mean() < 3  # red on top


def test_an_image_whose_exif_cannot_be_read_is_stored_as_it_is(tmp_path):
    """ImageMagick keeps EXIF in a PNG text chunk as hex; garbled there, PIL's getexif raises. The
    pixels decode, so the image is stored unrotated, not skipped."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", "\nexif\n      8\nnot hex at all\n")
    picture = halves(RED, BLUE)
    item = saved(Image.fromarray(picture.astype(np.uint8)), "PNG", pnginfo=info)
    data, image = encode(sources.Sample("x", partial(given, item), 0), None, False, 95)
    stored = np.asarray(Image.open(io.BytesIO(data)), dtype=float)
    assert image.size == (32, 32) and np.abs(halves_only(stored - picture)).mean() < 3


# ---------------------------------------------------------------- repeated preparation


def test_a_rerun_with_other_settings_rewrites_its_shards_and_drops_stale_ones(tmp_path):
    out = tmp_path / "out"

    def prepare(seed=0, **settings):
        return write_dataset(
            sources.synthetic(3, 60, 12, 32, seed=seed),
            out,
            source_name="synthetic",
            min_shards=2,
            progress=False,
            **settings,
        )

    prepare(shard_size=10)
    compute_stats(out, 100)
    prepare(shard_size=10)  # nothing changes: the statistics still describe the shards
    assert (out / "stats.json").exists() and (out / "mean_image.npy").exists()
    manifest = prepare(shard_size=10, resize=24, center_crop=True)  # the same keys in the same shards
    assert manifest["image_size"] == [24, 24]
    assert not list(out.glob("stats.json")) and not list(out.glob("mean_image.*"))  # they described 32 px
    assert len(manifest["splits"]["train"]["shards"]) == 6
    assert all(image.size == (24, 24) for _, image in read_shards(out).values())
    before = {key: np.asarray(image, dtype=float) for key, (_, image) in read_shards(out).items()}
    manifest = prepare(shard_size=10, resize=24, center_crop=True, seed=1)  # other pictures, the same keys
    after = {key: np.asarray(image, dtype=float) for key, (_, image) in read_shards(out).items()}
    assert before.keys() == after.keys() and all(np.abs(before[k] - after[k]).mean() > 10 for k in before)
    manifest = prepare(shard_size=30, resize=24, center_crop=True, seed=1)  # fewer shards than before
    listed = {shard["tar"] for split in ("train", "val") for shard in manifest["splits"][split]["shards"]}
    left = sorted(str(p.relative_to(out)) for p in out.glob("*/*") if p.is_file())
    assert {p for p in left if p.endswith(".tar")} == listed
    assert len(left) == 3 * len(listed)  # each tar with its .idx and .json, nothing else


REWRITING = "shards (made with other settings, from another source or source path, or by an older alexnet-prepare)"


def test_a_rerun_that_rewrites_shards_says_so_in_one_line_per_split(tmp_path, capsys):
    """Once every folder made by an earlier version was rewritten in silence (hours for ImageNet)."""
    out = tmp_path / "out"

    def prepare(**settings) -> list[str]:
        source = sources.synthetic(3, 30, 6, 32)
        write_dataset(source, out, source_name="synthetic", min_shards=2, progress=False, **settings)
        return capsys.readouterr().out.splitlines()

    assert prepare() == []  # a new folder
    assert prepare() == []  # nothing changed: every shard kept
    assert prepare(quality=80) == [f"train: rewriting 2 of 2 {REWRITING}", f"val: rewriting 2 of 2 {REWRITING}"]


def test_naming_the_default_validation_labels_file_rewrites_no_shard(tmp_path):
    """The labels are in each sample's digest line; the file's path once went into every split's."""
    src, out = tmp_path / "src", tmp_path / "out"
    flat(src / "train" / "n01" / "a.JPEG", (200, 0, 0), fmt="JPEG")
    flat(src / "train" / "n02" / "b.JPEG", (0, 0, 200), fmt="JPEG")
    flat(src / "val" / "v1.JPEG", (200, 0, 0), fmt="JPEG")
    (src / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nv1,n01 1 2 3 4\n")
    write_dataset(sources.imagenet(src), out, source_name="imagenet", min_shards=1, progress=False)
    written = {p: p.stat().st_mtime_ns for p in out.glob("*/*.tar")}
    labels = src / "LOC_val_solution.csv"
    write_dataset(sources.imagenet(src, labels), out, source_name="imagenet", min_shards=1, progress=False)
    assert {p: p.stat().st_mtime_ns for p in written} == written


def test_a_rerun_stopped_while_checking_kept_shards_leaves_the_data_set_whole(tmp_path, monkeypatch):
    """Nothing to rewrite, so the old manifest.json stays until the new one replaces it: a Ctrl-C
    while the shards are read back once left finished shards without one."""
    out = tmp_path / "out"
    write_dataset(sources.synthetic(3, 30, 6, 32), out, source_name="synthetic", min_shards=2, progress=False)

    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards, "verify_split", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(sources.synthetic(3, 30, 6, 32), out, source_name="synthetic", min_shards=2, progress=False)
    assert [Manifest.read(out).count(split) for split in ("train", "val")] == [30, 6]


def boom():
    raise RuntimeError("a crash in the middle of writing shards")


def test_a_rerun_that_dies_midway_leaves_no_manifest_listing_a_mix(tmp_path):
    out = tmp_path / "out"
    write_dataset(sources.synthetic(3, 30, 6, 32), out, source_name="synthetic", min_shards=2, progress=False)
    source = sources.synthetic(3, 30, 6, 32)
    source.splits["train"][-1].load = boom
    with pytest.raises(RuntimeError):
        write_dataset(source, out, source_name="synthetic", resize=24, min_shards=2, progress=False)
    with pytest.raises(DataError, match="manifest.json: missing"):
        Manifest.read(out)  # rather than the first run's manifest over shards of two sizes
    assert not list(out.glob("*/*.tmp"))


# ---------------------------------------------------------------- kill -9 and Ctrl-C


def group_processes(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group, from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue  # it ended while we looked
        if int(group) == pgid and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def wait_for(condition, timeout: float, every: float = 0.02):
    end = time.monotonic() + timeout
    while not (result := condition()) and time.monotonic() < end:
        time.sleep(every)
    return result


def start_prepare(tmp_path: Path, env: dict, *args) -> subprocess.Popen:
    """alexnet-prepare in a session of its own (its pid is its process group's id), stderr to a file.
    SIGINT at its default, as in a terminal's foreground job: a test run started in the background
    by a shell inherits it ignored, and the command would rightly not see Ctrl-C."""
    return subprocess.Popen(
        [str(BIN / "alexnet-prepare"), *map(str, args)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "stderr.txt", "w"),  # noqa: SIM115 (the child holds it)
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def end_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# A few seconds of work per shard with two workers, so signals land while shards are written.
SLOW = ["synthetic", "--workers", 2, "--train-count", 6000, "--val-count", 10, "--size", 128, "--min-shards", 2]


@linux_only
def test_kill_9_of_prepare_leaves_no_worker_running(tmp_path, cli_env):
    out = tmp_path / "out"
    proc = start_prepare(tmp_path, cli_env, *SLOW, "--out", out)
    try:
        assert wait_for(lambda: list(out.glob("train/*.tar.tmp")), 60), "no shard was started"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert wait_for(lambda: not group_processes(proc.pid), 5), group_processes(proc.pid)
    finally:
        end_group(proc)


@linux_only
@pytest.mark.parametrize("to", ["the process group", "the main process"])
def test_ctrl_c_stops_prepare_in_one_line_and_the_same_command_finishes_the_job(tmp_path, cli_env, to):
    out = tmp_path / "out"
    # Small shards, so that one is soon finished and the signal goes out then (a re-run has
    # something to keep); a hundred of them, so that even a machine many times faster than ours
    # is far from done when it lands (the run would then exit 0, not 130).
    args = ["synthetic", "--workers", 2, "--train-count", 3000, "--val-count", 40, "--shard-size", 30, "--size", 64]
    args += ["--out", out]
    proc = start_prepare(tmp_path, cli_env, *args)
    try:
        assert wait_for(lambda: list(out.glob("train/*.json")), 60, every=0.005), "no shard was finished"
        (os.killpg if to == "the process group" else os.kill)(proc.pid, signal.SIGINT)
        proc.wait(timeout=10)
        assert wait_for(lambda: not group_processes(proc.pid), 5), group_processes(proc.pid)
    finally:
        end_group(proc)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1].split("\r")[-1]  # after the progress bar
    assert last == "error: interrupted; finished shards are kept, run the same command again to continue"
    files = sorted(out.rglob("*"))
    time.sleep(0.3)  # a worker still running would write on
    assert sorted(out.rglob("*")) == files
    assert not list(out.glob("*/*.tmp")) and not (out / "manifest.json").exists()
    kept = {p: p.stat().st_mtime_ns for p in out.glob("train/*.tar") if p.with_suffix(".json").exists()}
    assert kept
    if to == "the main process":
        return  # the same re-run as the other case
    proc = run_cli("alexnet-prepare", *args, cwd=tmp_path, env=cli_env)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished shards are not written again
    manifest = Manifest.read(out)
    assert [manifest.count(s) for s in ("train", "val")] == [3000, 40]
    labels = sorted(label for label, _ in read_shards(out).values())
    assert labels == sorted(i % 10 for i in range(3000))


@linux_only
def test_a_worker_killed_midway_is_one_line(tmp_path, cli_env):
    out = tmp_path / "out"
    proc = start_prepare(tmp_path, cli_env, *SLOW, "--out", out)
    try:
        assert wait_for(lambda: list(out.glob("train/*.tar.tmp")), 60), "no shard was started"
        workers = [pid for pid in group_processes(proc.pid) if pid != proc.pid]
        os.kill(workers[0], signal.SIGKILL)  # as the OOM killer would
        proc.wait(timeout=30)
        assert wait_for(lambda: not group_processes(proc.pid), 5), group_processes(proc.pid)
    finally:
        end_group(proc)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 2 and "Traceback" not in stderr, stderr
    assert (
        stderr.strip()
        .splitlines()[-1]
        .split("\r")[-1]
        .startswith(f"error: {out}: a worker writing shards died (killed, or out of memory?); finished shards are kept")
    )
