import gzip
import io
import json
import struct
import tarfile

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image
from webdataset.tariterators import tarfile_samples

from alexnet_dist.data import sources
from alexnet_dist.data.manifest import Manifest
from alexnet_dist.data.shards import write_dataset
from alexnet_dist.errors import DataError


def read_split(root, manifest, split):
    out = {}
    for shard in manifest["splits"][split]["shards"]:
        for s in tarfile_samples([{"url": str(root / shard["tar"])}]):
            out[s["__key__"]] = (int(s["cls"]), Image.open(io.BytesIO(s["jpg"])))
    return out


def test_synthetic_round_trip_keeps_every_label_with_its_image(tmp_path):
    src = sources.synthetic(num_classes=7, train_count=100, val_count=30, size=32)
    manifest = write_dataset(src, tmp_path, source_name="synthetic", min_shards=4, quality=100, progress=False)
    assert manifest["num_classes"] == 7 and manifest["image_size"] == [32, 32]
    assert [manifest["splits"][s]["count"] for s in ("train", "val")] == [100, 30]
    assert len(manifest["splits"]["train"]["shards"]) == 4
    assert sum(s["count"] for s in manifest["splits"]["train"]["shards"]) == 100
    train = read_split(tmp_path, manifest, "train")
    expected = {s.key: s.label for s in src.splits["train"]}
    assert {k: lab for k, (lab, _) in train.items()} == expected
    # the stored JPEG is the generated picture (up to JPEG loss), not another one of its class
    sample, other = src.splits["train"][17], src.splits["train"][24]
    assert sample.label == other.label
    stored = luma(train[sample.key][1])
    assert np.abs(stored - luma(sample.load())).mean() < 2
    assert np.abs(stored - luma(other.load())).mean() > 10
    assert Manifest.read(tmp_path).count("val") == 30


def luma(im) -> np.ndarray:
    return np.asarray(im.convert("L"), dtype=float)  # JPEG keeps luma at full resolution


def test_index_files_point_at_the_exact_bytes_of_each_member(tmp_path):
    manifest = write_dataset(
        sources.synthetic(3, 20, 6, 16), tmp_path, source_name="synthetic", min_shards=2, progress=False
    )
    shard = manifest["splits"]["train"]["shards"][1]
    lines = (tmp_path / shard["index"]).read_text().splitlines()
    assert lines[0] == f"v1.2 {shard['count']}"
    raw = (tmp_path / shard["tar"]).read_bytes()
    with tarfile.open(tmp_path / shard["tar"]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for line in lines[1:]:
        fields = line.split()
        assert [fields[0], fields[4]] == ["jpg", "cls"]
        for _ext, offset, size, name in zip(fields[0::4], fields[1::4], fields[2::4], fields[3::4], strict=True):
            assert raw[int(offset) : int(offset) + int(size)] == members[name]


def make_folder(root, classes=("cat", "dog")):
    """Real images of the kinds found in ImageNet: RGB JPEG, greyscale JPEG, CMYK JPEG, and a PNG."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(d / f"{c}{i}.jpg")
    Image.fromarray(rng.integers(0, 255, (50, 30), dtype=np.uint8), "L").save(root / "train/cat/grey.jpg")
    Image.new("CMYK", (48, 48), (0, 255, 0, 0)).save(root / "train/dog/cmyk.jpg")
    Image.new("RGB", (48, 64), (10, 200, 30)).save(root / "train/dog/png_named.JPEG", format="PNG")


def test_imagefolder_stores_rgb_and_the_papers_square_crop(tmp_path):
    make_folder(tmp_path / "src")
    manifest = write_dataset(
        sources.imagefolder(tmp_path / "src"),
        tmp_path / "out",
        source_name="imagefolder",
        resize=32,
        center_crop=True,
        min_shards=2,
        progress=False,
    )
    assert manifest["classes"] == ["cat", "dog"]
    assert manifest["splits"]["train"]["count"] == 9 and manifest["image_size"] == [32, 32]
    train = read_split(tmp_path / "out", manifest, "train")
    assert {im.size for _, im in train.values()} == {(32, 32)}
    assert all(im.format == "JPEG" for _, im in train.values())
    assert train["dog_png_named"][1].mode == "RGB" and train["dog_png_named"][0] == 1
    assert train["cat_grey"][1].mode == "L" and train["cat_grey"][0] == 0
    cmyk = np.asarray(train["dog_cmyk"][1].convert("RGB"), dtype=float)
    assert cmyk[..., 0].mean() > 200 and cmyk[..., 1].mean() < 60  # magenta came out magenta


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files_become_labelled_shards(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 40), ("t10k", 12)):
        images = rng.integers(0, 255, (n, 28, 28))
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    src = sources.fashion_mnist(tmp_path)
    assert len(src.splits["train"]) == 40 and src.classes[9] == "Ankle boot"
    manifest = write_dataset(
        src, tmp_path / "out", source_name="fashion-mnist", quality=95, min_shards=2, progress=False
    )
    val = read_split(tmp_path / "out", manifest, "val")
    assert sorted(lab for lab, _ in val.values()) == sorted(np.arange(12) % 10)
    assert val["val-000003"][0] == 3 and val["val-000003"][1].size == (28, 28)


def test_truncated_idx_file_is_reported(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((5, 28, 28)))
    data = gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())[:-100]
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(data))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5))
    with pytest.raises(DataError, match="truncated"):
        sources.fashion_mnist(tmp_path)


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (None, ["imagefolder", "--src", "{tmp}/nowhere"], "nowhere/train: no such folder"),
        ("empty", ["imagefolder", "--src", "{tmp}/src"], "src/train: no class sub-folders"),
        (
            None,
            ["fashion-mnist", "--src", "{tmp}"],
            "or its labels file is missing; put the four Fashion-MNIST IDX files",
        ),
    ],
)
def test_prepare_bad_input_is_one_line(tmp_path, cli_env, setup, args, message):
    if setup == "empty":
        (tmp_path / "src" / "train").mkdir(parents=True)
    args = [a.format(tmp=tmp_path) for a in args] + ["--out", tmp_path / "out"]
    proc = run_cli("alexnet-prepare", *args, cwd=tmp_path, env=cli_env, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_manifest_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="no such directory; make shards with `alexnet-prepare"):
        Manifest.read(tmp_path / "missing")
    with pytest.raises(DataError, match="manifest.json: missing"):
        Manifest.read(tmp_path)
    write_dataset(
        sources.synthetic(3, 10, 4, 16), tmp_path / "d", source_name="synthetic", min_shards=2, progress=False
    )
    (tmp_path / "d" / "val" / "000001.tar").unlink()
    manifest = Manifest.read(tmp_path / "d")  # reads the manifest only; each rank checks its share of the tars
    manifest.check_share(0, 2)  # rank 0 of 2: shards 0, 2, ...
    with pytest.raises(DataError, match="val/000001.tar: listed in .* but missing"):
        manifest.check_share(1, 2)
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    m["splits"]["train"]["shards"] = []
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="split 'train' has no samples"):
        Manifest.read(tmp_path / "d")


def test_a_manifest_whose_split_count_disagrees_with_its_shards_is_refused(tmp_path):
    from helpers.shards import edit_manifest

    write_dataset(sources.synthetic(3, 10, 4, 16), tmp_path, source_name="synthetic", min_shards=2, progress=False)
    edit_manifest(tmp_path, lambda m: m["splits"]["val"].update(count=5))
    with pytest.raises(DataError, match=r"manifest.json: split 'val' counts 5 samples but its shards 4; re-run"):
        Manifest.read(tmp_path)
