"""alexnet-prepare index over tars written by webdataset's ShardWriter, as another tool would
leave them: local, on S3 and over HTTP; then training on them with both loaders."""

import io
import json
import math
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from conftest import run_cli
from helpers.shards import WDS, data_module
from PIL import Image

from alexnet_dist.data.index import index_shards

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
    # no copies: the output holds the manifest and the index files only
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "index/train/000000.idx",
        "index/train/000001.idx",
        "index/train/000002.idx",
        "index/val/000000.idx",
        "index/val/000001.idx",
        "manifest.json",
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
        "--classes", faulty["root"] / "classes.txt",
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
    proc = index_cli(tmp_path, cli_env, tars[0], tars[0], tmp_path / "out")
    lines = proc.stderr.splitlines()
    assert lines[:20] == [f"{tars[0]}:x{i:02d}: no {ANY} image (has .cls)" for i in range(20)]
    assert lines[20] == "... and 5 more (see manifest.json)"  # then the same for val, indexing the same tar
    assert lines[21:] == lines[:21]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["skipped"]) == 25


def test_without_a_classes_file_the_train_labels_name_the_classes(tmp_path):
    train = write_tars(tmp_path / "train", [good("a", 0), good("b", 4), good("c", 4)], 10)
    val = write_tars(tmp_path / "val", [good("d", 4), good("e", 5), good("f", 1)], 10)
    manifest = index_shards(str(train[0]), str(val[0]), tmp_path / "out")
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
    same = index_shards(pattern, pattern, tmp_path / "c")
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
        ("val missing", r"index: --val PATTERN missing \(training needs both --train and --val\)"),
        ("missing file", r"{root}/train/shard-000003\.tar: no such file"),
        ("not a tar", r"{root}/train/shard-000000\.tar: damaged at byte 0, after 0 samples \(.*\)"),
        ("garbage part-way", r"{tar1}: damaged at byte {at}, after 2 samples \(no tar header"),
        ("cut short", r"{tar1}: damaged at byte {at}, after 1 samples \(unexpected end"),
        ("cut in a skipped member", r"{tar1}: damaged at byte {at}, after 1 samples \(unexpected end"),
        ("no usable sample", r"--val {root}/val/shard-000000\.tar: no usable samples in its 1 tars \(1 skipped, e\.g"),
        ("classes missing", r"--classes {root}/nowhere\.txt: no such file"),
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
    args = ["--train", train] + (["--val", val_pattern] if case != "val missing" else [])
    proc = run_cli(
        "alexnet-prepare", "index", *args, "--out", tmp_path / "out", *extra, cwd=tmp_path, env=cli_env, check=False
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert re.search(message.format(root=re.escape(str(root)), tar1=re.escape(str(tars[1])), at=at), proc.stderr), (
        proc.stderr
    )
    assert not (tmp_path / "out" / "manifest.json").exists()


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
    local = index_shards(f"{served['train'][0].parent}/", str(served["val"][0]), tmp_path / "local")
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
        proc = index_cli(tmp_path, env, f"{where}/{train}", f"{where}/{val}", out)
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
    index_shards(f"{root}/train/", f"{root}/val/", out, classes=str(root / "classes.txt"))
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
    manifest = index_shards(f"{tmp_path}/val/", f"{tmp_path}/val/", out)
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
