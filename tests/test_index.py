"""alexnet-prepare index over tars written by webdataset's ShardWriter, as another tool would
leave them: local, on S3 and over HTTP; then training on them with both loaders."""

import gzip
import hashlib
import io
import json
import math
import re
import shutil
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from helpers.shards import WDS, data_module
from PIL import Image

from alexnet_dist.data.index import index_shards
from alexnet_dist.data.shard_index import sample_key
from alexnet_dist.errors import DataError

SMOKE = ["experiment=smoke", "logger=csv", "+trainer.enable_progress_bar=false"]
COLOURS = [(230, 30, 30), (30, 230, 30), (30, 30, 230)]  # flat colours, which JPEG keeps within a unit or two
SIZES = [(32, 32), (48, 40)]  # (w, h): mixed, as tars from other tools hold
ANY = ".jpg, .jpeg, .png or .webp"  # the image members index looks for without --image


def jpeg(colour, size=(32, 32)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "JPEG", quality=95)
    return out.getvalue()


def good(key: str, label: int, size=(32, 32)) -> dict:
    """A trainable sample, with members other tools add beside the image and label."""
    return {"__key__": key, "jpg": jpeg(COLOURS[label % 3], size), "cls": label, "json": {"origin": key}}


def write_tars(folder: Path, samples: list[dict], per_tar: int) -> list[Path]:
    """The samples in tars of `per_tar` each, written by webdataset's ShardWriter."""
    import webdataset

    folder.mkdir(parents=True, exist_ok=True)
    with webdataset.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=per_tar, verbose=0) as writer:
        for sample in samples:
            writer.write(sample)
    return sorted(folder.glob("*.tar"))


def val_tar(folder: Path) -> Path:
    """A validation tar of one good sample, for a test about the training tars (a tar cannot be
    in both splits)."""
    return write_tars(folder, [good("val-0", 0)], 10)[0]


def index_cli(tmp_path, cli_env, train, val, out, *extra, check=True):
    return run_cli(
        "alexnet-prepare", "index", "--train", train, "--val", val, "--out", out, *extra,
        cwd=tmp_path, env=cli_env, check=check,
    )  # fmt: skip


def tar_members(tar: Path) -> dict[str, bytes]:
    """{member name: bytes} as tarfile reads them."""
    with tarfile.open(tar) as t:
        return {m.name: t.extractfile(m).read() for m in t if m.isfile()}


def index_lines(out: Path, shard: dict) -> list[list[str]]:
    lines = (out / shard["index"]).read_text().splitlines()
    assert lines[0] == f"v1.2 {shard['count']}"
    return [line.split() for line in lines[1:]]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict:
    """48 training samples in 3 tars and 20 validation samples in 2, classes 0..2, two image sizes:
    every sample trainable."""
    root = tmp_path_factory.mktemp("clean")
    samples = {
        "train": [good(f"train/{i:04d}", i % 3, SIZES[i % 2]) for i in range(48)],
        "val": [good(f"val/{i:04d}", i % 3, SIZES[i % 2]) for i in range(20)],
    }
    return {
        "root": root,
        "samples": samples,
        "tars": {split: write_tars(root / split, samples[split], per) for split, per in (("train", 16), ("val", 10))},
    }


@pytest.fixture(scope="module")
def indexed_clean(clean, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("indexed-clean")
    index_shards(f"{clean['root']}/train/shard-{{000000..000002}}.tar", f"{clean['root']}/val/", out)
    return out


def test_the_manifest_counts_what_the_tars_hold_and_the_index_points_at_their_bytes(tmp_path, cli_env, clean):
    out = tmp_path / "out"
    proc = index_cli(
        tmp_path, cli_env, f"{clean['root']}/train/shard-{{000000..000002}}.tar", f"{clean['root']}/val/", out
    )
    assert proc.stdout.splitlines() == [
        "train: 48 images in 3 shards",
        "val: 20 images in 2 shards",
        f"wrote {out / 'manifest.json'}",
    ]
    assert proc.stderr == ""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "index" and manifest["classes"] == ["0", "1", "2"] and manifest["num_classes"] == 3
    assert manifest["min_side"] == 32 and manifest["image_size"] is None  # two sizes
    written = {s["__key__"]: s for split in ("train", "val") for s in clean["samples"][split]}
    for split, count in (("train", 48), ("val", 20)):
        info = manifest["splits"][split]
        assert info["count"] == count and info["skipped"] == []
        labels = Counter(str(s["cls"]) for s in clean["samples"][split])
        assert info["class_counts"] == dict(sorted(labels.items()))
        assert [s["tar"] for s in info["shards"]] == [str(t) for t in clean["tars"][split]]  # in place, not copied
        for number, (shard, tar) in enumerate(zip(info["shards"], clean["tars"][split], strict=True)):
            assert shard["index"] == f"index/{split}/{number:06d}.idx"
            members = tar_members(tar)
            assert shard["count"] == sum(name.endswith(".cls") for name in members)
            data = tar.read_bytes()
            for fields in index_lines(out, shard):
                assert fields[0::4] == ["jpg", "cls"]
                key = fields[3].removesuffix(".jpg")
                assert fields[7] == f"{key}.cls"
                for offset, size, name in zip(fields[1::4], fields[2::4], fields[3::4], strict=True):
                    got = data[int(offset) : int(offset) + int(size)]
                    assert got == members[name]  # the bytes the index points at are the member's
                assert data[int(fields[1]) :][: int(fields[2])] == written[key]["jpg"]
                assert data[int(fields[5]) :][: int(fields[6])] == str(written[key]["cls"]).encode()
    # no copies: the output holds the manifest and the index files only (and the writers' lock)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "index/train/000000.idx",
        "index/train/000001.idx",
        "index/train/000002.idx",
        "index/val/000000.idx",
        "index/val/000001.idx",
        "manifest.json",
        "prepare.lock",
    ]


def test_shardwriter_stores_an_int_label_as_plain_digits(clean):
    """What the index relies on: ShardWriter writes cls=3 as the bytes b'3', no newline; and every
    member behind a pax header (its float mtime), so data starts 3 blocks after the member's."""
    with tarfile.open(clean["tars"]["train"][0]) as t:
        members = list(t)
        assert t.extractfile(members[0]).read() == b"0" and members[0].name == "train/0000.cls"
        assert [m.offset_data - m.offset for m in members[:3]] == [3 * 512] * 3


@pytest.fixture(scope="module")
def faulty(tmp_path_factory) -> dict:
    """Tars with samples that cannot train among good ones, an empty tar and one of bad samples only."""
    root = tmp_path_factory.mktemp("faulty")
    train = [
        good("t/a0", 0),
        {"__key__": "t/bad-label", "jpg": jpeg(COLOURS[0]), "cls": "seven"},
        good("t/a1", 1),
        {"__key__": "t/no-cls", "jpg": jpeg(COLOURS[1])},
        {"__key__": "t/no-jpg", "gif": jpeg(COLOURS[1]), "cls": 1},
        good("t/a2", 2),
        {"__key__": "t/garbage", "jpg": b"these bytes are no JPEG", "cls": 2},
        {"__key__": "t/outside", "jpg": jpeg(COLOURS[0]), "cls": 3},
        {"__key__": "t/negative", "jpg": jpeg(COLOURS[0]), "cls": -1},
        good("t/a3", 0, (40, 24)),
    ]
    val = [good("v/b0", 0), {"__key__": "v/outside", "jpg": jpeg(COLOURS[0]), "cls": 5}, good("v/b1", 2)]
    val.append({"__key__": "v/a space", "jpg": jpeg(COLOURS[0]), "cls": 0})
    tars = write_tars(root / "train", train, 5)
    tars.append(root / "train" / "shard-000002.tar")  # bad samples only
    write_tars(root / "bad", [{"__key__": "t/only-json", "json": {"a": 1}}, {"__key__": "t/only-cls", "cls": 0}], 5)
    shutil.move(root / "bad" / "shard-000000.tar", tars[-1])
    tars.append(root / "train" / "shard-000003.tar")  # no members at all
    with tarfile.open(tars[-1], "w"):
        pass
    (root / "classes.txt").write_text("cat\ndog\n\nbird\n")
    return {"root": root, "train": tars, "val": write_tars(root / "val", val, 10)}


def test_samples_that_cannot_train_are_named_with_why_and_left_out(tmp_path, cli_env, faulty):
    out = tmp_path / "out"
    proc = index_cli(
        tmp_path, cli_env, f"{faulty['root']}/train/", f"{faulty['root']}/val/*.tar", out,
        "--classes", faulty["root"] / "classes.txt", "--max-skipped", "1",
    )  # fmt: skip
    t0, t1, t2 = faulty["train"][:3]
    want = [
        f"{t0}:t/bad-label: label b'seven' is not an integer",
        f"{t0}:t/no-cls: no .cls label",
        f"{t0}:t/no-jpg: no {ANY} image (has .cls, .gif)",
        f"{t1}:t/garbage: the .jpg is no image PIL can read (UnidentifiedImageError)",
        f"{t1}:t/outside: label 3 is outside the 3 classes (0..2)",
        f"{t1}:t/negative: label -1 is negative",
        f"{t2}:t/only-json: no {ANY} image (has .json)",
        f"{t2}:t/only-cls: no {ANY} image (has .cls)",
    ]
    want_val = [
        f"{faulty['val'][0]}:v/outside: label 5 is outside the 3 classes (0..2)",
        f"{faulty['val'][0]}:v/a space: member name 'v/a space.jpg' has a space, which a DALI index file cannot hold",
    ]
    assert proc.stderr.splitlines() == want + want_val
    assert proc.stdout.splitlines() == [
        "train: 4 images in 4 shards, 8 skipped (see manifest.json)",
        "val: 2 images in 1 shards, 2 skipped (see manifest.json)",
        f"wrote {out / 'manifest.json'}",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["cat", "dog", "bird"] and manifest["num_classes"] == 3
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["skipped"] == want and val["skipped"] == want_val
    assert [s["count"] for s in train["shards"]] == [2, 2, 0, 0]  # the empty tar and the all-bad one: listed, empty
    assert train["class_counts"] == {"0": 2, "1": 1, "2": 1} and val["class_counts"] == {"0": 1, "2": 1}
    keys = [[f[3] for f in index_lines(out, s)] for s in train["shards"]]
    assert keys == [["t/a0.jpg", "t/a1.jpg"], ["t/a2.jpg", "t/a3.jpg"], [], []]
    assert manifest["min_side"] == 24 and manifest["image_size"] is None


def test_more_than_twenty_skipped_samples_are_summed_up(tmp_path, cli_env):
    tars = write_tars(
        tmp_path / "train", [good("ok", 0)] + [{"__key__": f"x{i:02d}", "cls": 0} for i in range(25)], 100
    )
    val = val_tar(tmp_path / "val")
    proc = index_cli(tmp_path, cli_env, tars[0], val, tmp_path / "out", "--max-skipped", "1")
    lines = proc.stderr.splitlines()
    assert lines[:20] == [f"{tars[0]}:x{i:02d}: no {ANY} image (has .cls)" for i in range(20)]
    assert lines[20:] == ["... and 5 more (see manifest.json)"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["skipped"]) == 25


def test_without_a_classes_file_the_train_labels_name_the_classes(tmp_path):
    train = write_tars(tmp_path / "train", [good("a", 0), good("b", 4), good("c", 4)], 10)
    val = write_tars(tmp_path / "val", [good("d", 4), good("e", 5), good("f", 1)], 10)
    manifest = index_shards(str(train[0]), str(val[0]), tmp_path / "out", max_skipped=1)
    assert manifest["classes"] == ["0", "1", "2", "3", "4"]  # up to the largest, with the ones no image has
    assert manifest["splits"]["train"]["class_counts"] == {"0": 1, "4": 2}
    assert manifest["splits"]["val"]["class_counts"] == {"1": 1, "4": 1}
    assert manifest["splits"]["val"]["skipped"] == [f"{val[0]}:e: label 5 is outside the 5 classes (0..4)"]


def test_channel_statistics_come_from_the_first_images_of_each_train_tar(tmp_path):
    """--sample N decodes the first ceil(N / tars) images of each training tar."""
    red, blue = (250, 0, 0), (0, 0, 250)
    samples = []
    for tar in range(2):
        samples += [{"__key__": f"{tar}-first", "jpg": jpeg(red, (20, 30)), "cls": 0}]
        samples += [{"__key__": f"{tar}-{i}", "jpg": jpeg(blue, (20, 30)), "cls": 1} for i in range(2)]
    train = write_tars(tmp_path / "train", samples, 3)
    val = write_tars(tmp_path / "val", [{"__key__": "v", "jpg": jpeg(red, (10, 10)), "cls": 0}], 3)
    pattern = str(tmp_path / "train" / "*.tar")
    first = index_shards(pattern, str(val[0]), tmp_path / "a", sample=2)
    assert len(train) == 2 and first["splits"]["train"]["count"] == 6
    assert first["mean"] == pytest.approx(red, abs=3) and first["std"] == pytest.approx([0, 0, 0], abs=3)
    every = index_shards(pattern, str(val[0]), tmp_path / "b")
    # a third of the pixels red, two thirds blue: mean 250/3 and 500/3, std 250 * sqrt(2)/3 in both
    assert every["mean"] == pytest.approx([250 / 3, 0, 500 / 3], abs=3)
    assert every["std"] == pytest.approx([250 * math.sqrt(2) / 3, 0, 250 * math.sqrt(2) / 3], abs=3)
    assert every["min_side"] == 10 and every["image_size"] is None  # val's size counts too
    like = write_tars(tmp_path / "like", [{"__key__": "w", "jpg": jpeg(blue, (20, 30)), "cls": 1}], 3)
    same = index_shards(pattern, str(like[0]), tmp_path / "c")
    assert same["min_side"] == 20 and same["image_size"] == [20, 30]  # [w, h]


def damage(tar: Path, at: int, data: bytes | None) -> None:
    """Overwrites the tar's bytes at `at` with `data`, or cuts the tar there (None)."""
    content = tar.read_bytes()
    tar.write_bytes(content[:at] if data is None else content[:at] + data + content[at + len(data) :])


def member(tar: Path, number: int) -> tarfile.TarInfo:
    with tarfile.open(tar) as t:
        return t.getmembers()[number]


@pytest.mark.parametrize(
    "case, message",
    [
        ("no match", r"--train {root}/train/nothing-\*\.tar: matches no tar"),
        ("empty folder", r"--val {root}/empty/: matches no tar"),
        ("gzip folder", r"--val {root}/packed/: holds no plain tar, only gzip-compressed ones such as v\.tar\.gz; "
         r"unpack them \(`gzip -dc v\.tar\.gz > v\.tar`\) and index the \.tar files"),
        ("val missing", r"index: no validation data; give --val PATTERN \(validation tars\) or --val-fraction F"),
        ("missing file", r"{root}/train/shard-000003\.tar: no such file"),
        ("not a tar", r"{root}/train/shard-000000\.tar: damaged at byte 0, after 0 samples \(.*\)"),
        ("garbage part-way", r"{tar1}: damaged at byte {at}, after 2 samples \(no tar header"),
        ("cut short", r"{tar1}: damaged at byte {at}, after 1 samples \(unexpected end"),
        ("cut in a skipped member", r"{tar1}: damaged at byte {at}, after 1 samples \(unexpected end"),
        ("no usable sample", r"--val {root}/val/shard-000000\.tar: no usable samples in its 1 tars \(1 skipped, e\.g"),
        ("classes missing", r"--classes {root}/nowhere\.txt: no such file"),
        ("val and fraction", r"index: --val and --val-fraction both given"),
        ("fraction 1", r"index: --val-fraction 1: must be between 0 and 1 \(e\.g\. 0\.05\)"),
        ("fraction holds none", r"--val-fraction 0\.01 holds out 0 of the 9 usable training samples"),
        ("max-skipped 2", r"index: --max-skipped 2: a part of the samples, from 0 to 1 \(default 0\.01\)"),
    ],
)  # fmt: skip
def test_what_cannot_be_indexed_is_one_line(tmp_path, cli_env, case, message):
    root = tmp_path / "data"
    tars = write_tars(root / "train", [good(f"k{i}", i % 3) for i in range(9)], 3)
    val = write_tars(root / "val", [good("v0", 0)], 3)
    (root / "empty").mkdir()
    train, val_pattern, extra, at = f"{root}/train/", str(val[0]), [], 0
    if case == "no match":
        train = f"{root}/train/nothing-*.tar"
    elif case == "empty folder":
        val_pattern = f"{root}/empty/"
    elif case == "gzip folder":
        (root / "packed").mkdir()
        (root / "packed" / "v.tar.gz").write_bytes(gzip.compress(val[0].read_bytes()))
        val_pattern = f"{root}/packed/"
    elif case == "missing file":
        train = f"{root}/train/shard-{{000000..000003}}.tar"
    elif case == "not a tar":
        tars[0].write_text("a text file with a .tar name")
    elif case == "garbage part-way":
        at = member(tars[1], 6).offset  # the third sample's first member (cls, jpg, json each)
        damage(tars[1], at, b"\xff" * 512)
    elif case == "cut short":
        jpg = member(tars[1], 4)  # the second sample's image, cut in the middle
        at = jpg.offset
        damage(tars[1], jpg.offset_data + jpg.size // 2, None)
    elif case == "cut in a skipped member":
        json_member = member(tars[1], 5)  # the second sample's .json, which tarfile skips unread
        at = json_member.offset
        damage(tars[1], json_member.offset_data + json_member.size // 2, None)
    elif case == "no usable sample":
        write_tars(root / "val", [{"__key__": "v0", "cls": 0}], 3)
    elif case == "classes missing":
        extra = ["--classes", root / "nowhere.txt"]
    elif case == "val and fraction":
        extra = ["--val-fraction", "0.1"]
    elif case == "max-skipped 2":
        extra = ["--max-skipped", "2"]
    elif case.startswith("fraction"):
        extra, val_pattern = ["--val-fraction", "1" if case == "fraction 1" else "0.01"], None
    args = ["--train", train] + (["--val", val_pattern] if case != "val missing" and val_pattern else [])
    proc = run_cli(
        "alexnet-prepare", "index", *args, "--out", tmp_path / "out", *extra, cwd=tmp_path, env=cli_env, check=False
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert re.search(message.format(root=re.escape(str(root)), tar1=re.escape(str(tars[1])), at=at), proc.stderr), (
        proc.stderr
    )
    assert not (tmp_path / "out" / "manifest.json").exists()


def tar_of_files(tmp_path: Path, count: int, *args: str) -> Path:
    """files/k000.jpg, k000.cls, ... made as a conversion script would (every image, then every
    label), packed by the real tar command: `tar <args> x.tar -C files .`."""
    files = tmp_path / "files"
    files.mkdir()
    for i in range(count):
        (files / f"k{i:03d}.jpg").write_bytes(jpeg(COLOURS[i % 3]))
    for i in range(count):
        (files / f"k{i:03d}.cls").write_text(str(i % 3))
    tar = tmp_path / "x.tar"
    subprocess.run(["tar", *args, str(tar), "-C", str(files), "."], check=True)
    return tar


@pytest.mark.parametrize("case", ["tar cf", "tar czf", "gzip named .tar", "5% unusable"])
def test_tars_as_people_write_them_stop_in_one_line_or_index_whole(tmp_path, cli_env, case):
    """A folder packed by plain `tar cf` (files in directory order, a sample's members apart), a
    gzip-compressed tar, a split with 5% of its samples unusable: one line, nothing written, and
    what the line says to do gives a tar that indexes every sample."""
    out = tmp_path / "out"
    if case == "5% unusable":
        samples = [good(f"k{i:02d}", i % 3) for i in range(19)] + [{"__key__": "k19", "jpg": jpeg(COLOURS[0])}]
        tar = write_tars(tmp_path / "train", samples, 100)[0]
        proc = index_cli(tmp_path, cli_env, tar, val_tar(tmp_path / "val"), out, check=False)
        want = (
            f"error: --train {tar}: 1 of 20 samples are unusable, more than --max-skipped 0.01 allows; the "
            f"commonest reason (1 of them) as in {tar}:k19: no .cls label; fix the tars, or pass --max-skipped "
            "0.05 to index the 19 usable ones\n"
        )
        assert (proc.returncode, proc.stderr, proc.stdout) == (2, want, "")
        assert not out.exists()
        proc = index_cli(tmp_path, cli_env, tar, tmp_path / "val", out, "--max-skipped", "0.05")
        assert proc.stdout.splitlines()[0] == "train: 19 images in 1 shards, 1 skipped (see manifest.json)"
        return
    # (the compressed ones sorted by name, so that unpacked as the line says they index whole)
    tar = tar_of_files(
        tmp_path, 30, *{"tar cf": ["cf"], "tar czf": ["--sort=name", "-czf"]}.get(case, ["--sort=name", "-cf"])
    )
    if case == "tar cf":
        order = subprocess.run(["tar", "tf", tar], capture_output=True, text=True, check=True).stdout.split()
        assert order != sorted(order)  # what the test is about: the folder's order is not the names'
        want = (
            f"error: {tar}: the members of sample \\./(k\\d+) are not next to each other "
            "\\(((\\./k\\d+)\\.(jpg|cls)) comes after other samples' members\\), but webdataset and DALI read a "
            "sample as one run of members; re-create the tar sorted by name, e.g. "
            "`tar --sort=name -cf NAME.tar -C FOLDER .` \\(GNU tar: plain `tar cf` "
            "stores files in the folder's own order\\)\n"
        )
    else:
        if case == "tar czf":
            tar = tar.rename(tmp_path / "x.tar.gz")
            fix = "gzip -dc x.tar.gz > x.tar` and point the pattern at x.tar"
        else:  # compressed behind a .tar name: known by its first bytes
            subprocess.run(["gzip", "-k", tar], check=True)
            tar = (tmp_path / "x.tar.gz").rename(tmp_path / "x.tar")
            fix = "gzip -dc x.tar > x-plain.tar` and point the pattern at x-plain.tar"
        want = (
            f"error: {tar}: gzip-compressed; the index needs a plain tar (DALI reads members at their byte offsets): "
            f"unpack it with `{fix}\n"
        )
    val = val_tar(tmp_path / "val")
    proc = index_cli(tmp_path, cli_env, tar, val, out, check=False)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert not out.exists()
    if case == "tar cf":
        named = re.fullmatch(want.replace(str(tar), re.escape(str(tar))), proc.stderr)
        assert named, proc.stderr
        # the first member in the tar whose sample's run of members ended before it
        members = [name for name in order if name != "./"]
        keys = [sample_key(name) for name in members]
        apart = next(i for i, key in enumerate(keys) if key in keys[:i] and keys[i - 1] != key)
        assert (named[1], named[2]) == (keys[apart].removeprefix("./"), members[apart])
    else:
        assert proc.stderr == want
    if case == "tar cf":  # the fix the line gives
        subprocess.run(["tar", "--sort=name", "-cf", tar, "-C", tmp_path / "files", "."], check=True)
    else:
        fixed = re.search(r"`(.*)`", want)[1]
        subprocess.run(fixed, shell=True, cwd=tmp_path, check=True)
        tar = tmp_path / fixed.split()[-1]
    proc = index_cli(tmp_path, cli_env, tar, val, out)
    assert proc.stdout.splitlines()[0] == "train: 30 images in 1 shards" and proc.stderr == ""


def test_the_commonest_skip_reason_counts_alike_reasons_as_one(tmp_path):
    """Labels 7, 8 and 9 outside the classes are one reason, three times: more than the two
    samples without an image."""
    samples = [good(f"k{i:02d}", i % 3) for i in range(20)]
    samples += [{"__key__": "no-jpg-a", "cls": 0}, {"__key__": "no-jpg-b", "cls": 1}]
    samples += [{"__key__": f"out-{label}", "jpg": jpeg(COLOURS[0]), "cls": label} for label in (7, 8, 9)]
    tar = write_tars(tmp_path / "train", samples, 100)[0]
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    with pytest.raises(DataError) as caught:
        index_shards(
            str(tar), str(val_tar(tmp_path / "val")), tmp_path / "out", classes=str(tmp_path / "classes.txt"),
            max_skipped=0.1,
        )  # fmt: skip
    assert str(caught.value) == (
        f"--train {tar}: 5 of 25 samples are unusable, more than --max-skipped 0.1 allows; the commonest reason "
        f"(3 of them) as in {tar}:out-7: label 7 is outside the 3 classes (0..2); fix the tars, or pass "
        "--max-skipped 0.2 to index the 20 usable ones"
    )


def rule_rank(tar: Path, key: str) -> bytes:
    """What --val-fraction orders the samples by, as the docs state it."""
    return hashlib.sha256(f"{tar.name}:{key}".encode()).digest()


@pytest.fixture(scope="module")
def train_only(tmp_path_factory) -> dict:
    """43 training samples in 2 tars and a third tar of one sample whose key the rule holds out
    (its hash is below every other's), with no validation tars; indexed with --val-fraction 0.1:
    round(0.1 x 44) = 4 held out."""
    root = tmp_path_factory.mktemp("train-only")
    tars = write_tars(root / "train", [good(f"t/{i:03d}", i % 3, SIZES[i % 2]) for i in range(43)], 22)
    keys = {(tar.name, key) for tar, members in ((t, tar_members(t)) for t in tars) for key in map(sample_key, members)}
    lowest = min(rule_rank(Path(name), key) for name, key in keys)
    solo = root / "train" / "solo.tar"
    key = next(k for k in (f"s/{n}" for n in range(10000)) if rule_rank(solo, k) < lowest)
    shutil.move(write_tars(root / "solo", [good(key, 2)], 1)[0], solo)
    keys.add((solo.name, key))
    out = root / "out"
    index_shards(f"{root}/train/", None, out, val_fraction=0.1)
    return {"root": root, "out": out, "tars": [*tars, solo], "keys": keys, "solo": key}


def split_keys(out: Path, split: str) -> list[tuple[str, str]]:
    """(tar, key) of every sample a split's index files list, in order."""
    manifest = json.loads((out / "manifest.json").read_text())
    return [
        (shard["tar"], sample_key(fields[3]))
        for shard in manifest["splits"][split]["shards"]
        for fields in index_lines(out, shard)
    ]


def test_val_fraction_holds_out_the_samples_the_rule_picks_on_every_run_and_wherever_the_tars_lie(
    tmp_path, train_only
):  # fmt: skip
    out, root = train_only["out"], train_only["root"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["val_fraction"]["fraction"] == 0.1 and "SHA-256" in manifest["val_fraction"]["rule"]
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert (train["pattern"], val["pattern"], val["held_out_from"]) == (f"{root}/train/", f"{root}/train/", "train")
    ranked = sorted(train_only["keys"], key=lambda k: rule_rank(Path(k[0]), k[1]))
    held = {(str(root / "train" / name), key) for name, key in ranked[:4]}
    assert (str(root / "train" / "solo.tar"), train_only["solo"]) in held
    train_keys, val_keys = split_keys(out, "train"), split_keys(out, "val")
    assert set(val_keys) == held and len(val_keys) == 4 == val["count"]
    assert len(train_keys) == 40 == train["count"] and not held & set(train_keys)
    assert {(Path(t).name, k) for t, k in train_keys + val_keys} == train_only["keys"]
    # every tar stays in train, the one whose only sample is held out with none; val: where held-out ones lie
    assert [s["tar"] for s in train["shards"]] == [str(t) for t in train_only["tars"]]
    assert [s["count"] for s in train["shards"]][2] == 0
    assert [s["tar"] for s in val["shards"]] == sorted(
        {t for t, _ in held}, key=[str(t) for t in train_only["tars"]].index
    )
    assert sum(map(Counter, (train["class_counts"], val["class_counts"])), Counter()) == Counter(
        {"0": 15, "1": 14, "2": 15}
    )
    # the same again, and for the same tars in another folder
    shutil.copytree(root / "train", tmp_path / "elsewhere")
    again = index_shards(f"{root}/train/", None, tmp_path / "again", val_fraction=0.1)
    assert again == manifest
    for split in ("train", "val"):
        assert split_keys(tmp_path / "again", split) == split_keys(out, split)
    index_shards(f"{tmp_path}/elsewhere/", None, tmp_path / "moved", val_fraction=0.1)
    moved = {(Path(t).name, k) for t, k in split_keys(tmp_path / "moved", "val")}
    assert moved == {(Path(t).name, k) for t, k in held}


@pytest.mark.parametrize("loader", [WDS, {"name": "dali"}], ids=["wds", "dali"])
def test_training_reads_only_the_kept_samples_and_validation_only_the_held_out(train_only, loader):
    out = train_only["out"]
    dm = data_module(out, loader, epoch=0, crop=24, batch_size=20, val_batch_size=3)
    trained = [tuple(key) for batch in dm.train_dataloader() for key in batch.keys]
    validated = [tuple(key) for batch in dm.val_dataloader() for key in batch.keys]
    assert sorted(trained) == sorted(split_keys(out, "train"))  # 2 batches of 20: every kept sample, once
    assert validated == split_keys(out, "val")


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dali"])  # the webdataset loader's keys: the test above
def test_a_run_on_a_held_out_split_evaluates_exactly_the_held_out_samples(tmp_path, cli_env, train_only, loader):
    results = train_on(tmp_path, cli_env, train_only["out"], loader, f"held-{loader}")
    assert results["global_step"] == 40 // 16 and results["val_count"] == 4
    ckpt = tmp_path / "runs" / "smoke" / f"held-{loader}" / "checkpoints" / "last.ckpt"
    run_cli(
        "alexnet-eval", f"ckpt_path={ckpt}", f"data.root={train_only['out']}", f"loader={loader}",
        f"probs={tmp_path / 'p.npz'}", cwd=tmp_path, env=cli_env,
    )  # fmt: skip
    probs = np.load(tmp_path / "p.npz")
    assert list(zip(probs["shards"], probs["keys"], strict=True)) == split_keys(train_only["out"], "val")


def manifest_summary(manifest: dict) -> dict:
    """What must not depend on where the tars lie: counts, classes, statistics."""
    splits = {
        split: (info["count"], [s["count"] for s in info["shards"]], info["class_counts"], len(info["skipped"]))
        for split, info in manifest["splits"].items()
    }
    return {"splits": splits, **{k: manifest[k] for k in ("classes", "mean", "std", "min_side", "image_size")}}


@pytest.fixture(scope="module")
def served(clean, faulty):
    """The clean training tars and the faulty validation tar, in one folder tree to upload or serve."""
    return {"train": clean["tars"]["train"], "val": faulty["val"]}


def test_tars_on_s3_and_over_http_index_as_the_same_tars_on_disk(
    tmp_path, cli_env, served, object_store, http_server
):  # fmt: skip
    local = index_shards(f"{served['train'][0].parent}/", str(served["val"][0]), tmp_path / "local", max_skipped=1)
    site, base = http_server
    for split in ("train", "val"):
        (site / "idx" / split).mkdir(parents=True, exist_ok=True)
        for tar in served[split]:
            shutil.copy(tar, site / "idx" / split / tar.name)
    object_store.upload(site / "idx", "s3://indexed/lab")
    brace = "shard-{000000..000002}.tar"
    env = {**cli_env, **object_store.env}
    for name, where, train, val in [
        ("s3-prefix", "s3://indexed/lab", "train/", "val/"),
        ("s3-brace", "s3://indexed/lab", f"train/{brace}", "val/shard-000000.tar"),
        ("http-brace", f"{base}/idx", f"train/{brace}", "val/shard-{000000..000000}.tar"),
    ]:
        out = tmp_path / name
        proc = index_cli(tmp_path, env, f"{where}/{train}", f"{where}/{val}", out, "--max-skipped", "1")
        assert proc.stdout.splitlines()[:2] == [
            "train: 48 images in 3 shards",
            "val: 2 images in 1 shards, 2 skipped (see manifest.json)",
        ]
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest_summary(manifest) == manifest_summary(local), name
        tars = [s["tar"] for s in manifest["splits"]["train"]["shards"]]
        assert tars == [f"{where}/train/shard-{n:06d}.tar" for n in range(3)]  # the tars' locations
        assert manifest["splits"]["val"]["skipped"][0] == (
            f"{where}/val/shard-000000.tar:v/outside: label 5 is outside the 3 classes (0..2)"
        )
        for split in ("train", "val"):  # the same offsets as on disk: the bytes are the same
            for n, shard in enumerate(manifest["splits"][split]["shards"]):
                assert (out / shard["index"]).read_text() == (
                    tmp_path / "local" / f"index/{split}/{n:06d}.idx"
                ).read_text()


def train_on(tmp_path, cli_env, root: Path, loader: str, run_id: str) -> dict:
    run_cli(
        "alexnet-train", *SMOKE, f"data.root={root}", f"loader={loader}", f"run_id={run_id}",
        "trainer.max_epochs=1", "data.batch_size=16", cwd=tmp_path, env=cli_env,
    )  # fmt: skip
    return json.loads((tmp_path / "runs" / "smoke" / run_id / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["wds", "dali"])
def test_training_reads_the_indexed_tars_where_they_lie(tmp_path, cli_env, indexed_clean, loader):
    results = train_on(tmp_path, cli_env, indexed_clean, loader, f"clean-{loader}")
    manifest = json.loads((indexed_clean / "manifest.json").read_text())
    assert results["loader"] == loader and results["epochs"] == 1
    assert results["global_step"] == manifest["splits"]["train"]["count"] // 16 == 3
    assert results["val_count"] == manifest["splits"]["val"]["count"] == 20
    assert results["skipped_images"] == 0


@pytest.fixture(scope="module")
def indexed_faulty(tmp_path_factory) -> Path:
    """Tars where samples the index leaves out (each kind) lie between trainable ones."""
    root = tmp_path_factory.mktemp("mixed")
    bad = [
        lambda k: {"__key__": k, "jpg": jpeg(COLOURS[0]), "cls": "x"},
        lambda k: {"__key__": k, "jpg": jpeg(COLOURS[1])},
        lambda k: {"__key__": k, "gif": jpeg(COLOURS[1]), "cls": 1},
        lambda k: {"__key__": k, "jpg": b"no JPEG", "cls": 2},
        lambda k: {"__key__": k, "jpg": jpeg(COLOURS[2]), "cls": 9},
    ]

    def mixed(prefix: str, n: int) -> list[dict]:
        samples = []
        for i in range(n):
            if i % 3 == 1:
                samples.append(bad[i % len(bad)](f"{prefix}/bad{i:03d}"))
            samples.append(good(f"{prefix}/{i:03d}", i % 3, SIZES[i % 2]))
        return samples

    write_tars(root / "train", mixed("t", 48), 13)
    write_tars(root / "val", mixed("v", 20), 9)
    (root / "classes.txt").write_text("a\nb\nc\n")  # so that label 9 is outside in training too
    out = root / "out"
    index_shards(f"{root}/train/", f"{root}/val/", out, classes=str(root / "classes.txt"), max_skipped=1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["wds", "dali"])
def test_training_passes_over_the_samples_the_index_left_out(tmp_path, cli_env, indexed_faulty, loader):
    manifest = json.loads((indexed_faulty / "manifest.json").read_text())
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["count"] == 48 and val["count"] == 20 and train["skipped"] and val["skipped"]
    results = train_on(tmp_path, cli_env, indexed_faulty, loader, f"faulty-{loader}")
    assert results["loader"] == loader
    assert results["global_step"] == 48 // 16
    assert results["val_count"] == val["count"]
    assert results["skipped_images"] == 0  # the garbage images are not in the index: no loader decodes them


def test_ranks_starting_inside_a_tar_read_pax_named_samples_and_pass_over_duplicates(tmp_path):
    """Names over 100 bytes and non-ASCII ones live only in a member's pax header (ShardWriter
    writes one for every member), and a sample with two .jpg members is left out of the index: a
    rank whose samples start inside such a tar still reads exactly its own, with either loader."""
    keys = [f"v/{'x' * 120 if i % 2 else 'café'}-{i:02d}" for i in range(12)]
    write_tars(tmp_path / "val", [good(k, i % 3) for i, k in enumerate(keys)], 12)
    with tarfile.open(tmp_path / "val" / "shard-000001.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [("w/a.jpg", jpeg(COLOURS[0])), ("w/a.cls", b"0"), ("w/dup.jpg", jpeg(COLOURS[1])),
                           ("w/dup.jpg", jpeg(COLOURS[1])), ("w/dup.cls", b"1"), ("w/b.jpg", jpeg(COLOURS[2])),
                           ("w/b.cls", b"2"), ("w/c.jpg", jpeg(COLOURS[1])), ("w/c.cls", b"1")]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    write_tars(tmp_path / "train", [good("t0", 0), good("t2", 2)], 12)  # classes 0..2
    manifest = index_shards(f"{tmp_path}/train/", f"{tmp_path}/val/", out, max_skipped=1)
    assert [s["count"] for s in manifest["splits"]["val"]["shards"]] == [12, 3]
    assert manifest["splits"]["val"]["skipped"] == [f"{tmp_path}/val/shard-000001.tar:w/dup: two .jpg members"]
    expected = [i % 3 for i in range(12)] + [0, 2, 1]
    for loader in (WDS, {"name": "dali"}):
        for world in (2, 3, 4):  # each rank's share starts at a different sample of the first tar
            labels = []
            for rank in range(world):
                dm = data_module(out, loader, rank=rank, world=world, crop=24, batch_size=12, val_batch_size=12)
                labels += [int(x) for batch in dm.val_dataloader() for x in batch.labels]
            assert labels == expected, (loader, world)
