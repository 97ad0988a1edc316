"""alexnet-prepare writing to object storage, against a real S3-compatible server (moto's, on
127.0.0.1: conftest's object_store): each file is uploaded as it is finished and manifest.json
last, an upload killed mid-way is finished by the same command, and what lands in the bucket is
read back by both loaders and trained on."""

import json
import os
import re
import signal
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import ObjectStore, run_cli, start_cli
from helpers.shards import RAW, WDS, data_module
from PIL import Image

from alexnet_dist.cli import prepare
from alexnet_dist.data import sources, store
from alexnet_dist.data.manifest import Manifest
from alexnet_dist.data.shards import write_dataset
from alexnet_dist.data.stats import read_stats

pytestmark = pytest.mark.xdist_group("remote")  # with test_remote.py: one S3 server for both


def bucket(object_store, name: str) -> str:
    client = object_store.client()
    if name not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=name)
    return f"s3://{name}"


def objects(object_store, url: str) -> dict[str, int]:
    """{name under the prefix: size} of what the bucket holds there."""
    name, _, prefix = url[len("s3://") :].partition("/")
    pages = object_store.client().get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1 :]: o["Size"] for page in pages for o in page.get("Contents", [])}


def labels_in_tars(manifest: Manifest, split: str) -> Counter:
    """The labels of every sample of the split's tars, read from the bucket member by member."""
    found = Counter()
    for shard in manifest.shards(split):
        with store.open_file(shard.tar) as f, tarfile.open(fileobj=f) as tar:
            found.update(tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".cls"))
    return found


def labels_loaded(url: str, loader: dict, split: str = "val", batch: int = 4) -> Counter:
    """The labels of the split as a loader reads them (training drops a last batch not full)."""
    dm = data_module(url, loader, batch_size=batch, crop=16, val_resize=None, **RAW)
    batches = getattr(dm, f"{split}_dataloader")()
    return Counter(str(label) for batch in batches for label in batch.labels.tolist())


def prepare_here(capsys, *args) -> tuple[int, str, str]:
    """alexnet-prepare run in the test process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        prepare.main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """3 classes of 32 px pictures: 200 training images each (60 shards of 10 with --shard-size 10),
    4 validation ones (6 shards of 2: --min-shards 8 asks for 8)."""
    src = tmp_path / "src"
    for split, count in (("train", 200), ("val", 4)):
        for c, name in enumerate(("red", "green", "blue")):
            (src / split / name).mkdir(parents=True)
            for i in range(count):
                colour = [40 + i % 50] * 3
                colour[c] = 200 + i % 50
                Image.new("RGB", (32, 32), tuple(colour)).save(src / split / name / f"{i}.png")
    return src


# What image_folder's data set is in a bucket: 60 + 6 tars, their index files, the manifest.
EVERY_OBJECT = ["manifest.json"] + [
    f"{s}/{i:06d}.{e}" for s, n in (("train", 60), ("val", 6)) for i in range(n) for e in ("idx", "tar")
]


@pytest.mark.slow
def test_an_upload_killed_mid_way_is_finished_by_the_same_command_and_trains(
    tmp_path, object_store, image_folder, cli_env
):
    url = bucket(object_store, "prepared") + "/direct"
    args = ["imagefolder", "--src", image_folder, "--out", url, "--shard-size", 10, "--workers", 1]
    proc = start_cli("alexnet-prepare", *args, cwd=tmp_path, env=cli_env)
    deadline = time.monotonic() + 120
    while not any(name.endswith(".tar") for name in objects(object_store, url)):  # the first shard is up
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    partial = objects(object_store, url)
    assert "manifest.json" not in partial and 0 < len(partial) < 2 * 66, sorted(partial)

    out = run_cli("alexnet-prepare", *args, cwd=tmp_path, env=cli_env)
    sent = re.search(r"^uploaded (\d+) files to s3://prepared/direct \((\d+) were there already\)$", out.stdout, re.M)
    assert sent, out.stdout
    assert int(sent[2]) == len(partial)  # what the killed run uploaded is not sent again
    assert int(sent[1]) + int(sent[2]) == 2 * 66 + 1  # 60 + 6 tars, their index files, the manifest
    assert out.stdout.strip().splitlines()[-1] == f"wrote {url}/manifest.json"
    assert not (tmp_path / "s3:").exists()  # never a local folder named after the URL
    assert not (store.STAGING / "prepared" / "direct").exists()  # the staging folder is gone once all is up

    manifest = Manifest.read(url)
    assert [manifest.count(s) for s in ("train", "val")] == [600, 12]
    assert sorted(objects(object_store, url)) == EVERY_OBJECT
    for split in ("train", "val"):
        assert sum(s.count for s in manifest.shards(split)) == manifest.count(split)
        expected = json.loads(store.read_text(f"{url}/manifest.json"))["splits"][split]["class_counts"]
        assert labels_in_tars(manifest, split) == Counter(expected)
    manifest.check_share(0, 1)
    assert labels_loaded(url, WDS, "train") == Counter({"0": 200, "1": 200, "2": 200})
    for loader in (WDS, {"name": "dali"}):
        assert labels_loaded(url, loader) == Counter({"0": 4, "1": 4, "2": 4})

    train = ["experiment=smoke", "logger=csv", "+trainer.enable_progress_bar=false", "trainer.max_epochs=1"]
    run_cli("alexnet-train", *train, "loader=wds", f"data.root={url}", "run_id=s3", cwd=tmp_path, env=cli_env)
    trained = torch.load(tmp_path / "runs/smoke/s3/checkpoints/last.ckpt", weights_only=True)
    assert trained["global_step"] == 600 // 32


def test_index_writes_its_index_files_and_manifest_to_the_bucket_and_drops_stale_ones(tmp_path, object_store, capsys):
    write_dataset(sources.synthetic(3, 30, 12, 16), tmp_path / "made", source_name="synthetic", min_shards=3)
    tars = object_store.upload(tmp_path / "made", bucket(object_store, "prepared") + "/elsewhere")
    url = "s3://prepared/indexed"
    code, out, err = prepare_here(capsys, "index", "--train", f"{tars}/train/", "--val", f"{tars}/val/", "--out", url)
    assert code == 0, err
    assert out.strip().splitlines()[-4:] == [
        f"uploaded 7 files to {url} (0 were there already)",  # 3 + 3 index files, the manifest
        "train: 30 images in 3 shards",
        "val: 12 images in 3 shards",
        f"wrote {url}/manifest.json",
    ]
    assert sorted(objects(object_store, url)) == ["index/train/000000.idx", "index/train/000001.idx"] + [
        "index/train/000002.idx",
        "index/val/000000.idx",
        "index/val/000001.idx",
        "index/val/000002.idx",
        "manifest.json",
    ]
    manifest = Manifest.read(url)
    assert manifest.shards("train")[0].tar == f"{tars}/train/000000.tar"
    assert [manifest.count(s) for s in ("train", "val")] == [30, 12]
    manifest.check_share(0, 1)
    assert labels_loaded(url, WDS, "train", batch=6) == labels_in_tars(manifest, "train")
    for loader in (WDS, {"name": "dali"}):
        assert labels_loaded(url, loader) == labels_in_tars(manifest, "val")

    # Indexed again over one train tar: the bucket keeps no index file that no manifest names.
    one = f"{tars}/train/000001.tar"
    code, out, err = prepare_here(capsys, "index", "--train", one, "--val", f"{tars}/val/", "--out", url)
    assert code == 0, err
    assert sorted(objects(object_store, url))[:2] == ["index/train/000000.idx", "index/val/000000.idx"]
    assert Manifest.read(url).shards("train")[0].tar == one

    # Tars on this machine's disk: the manifest in the bucket names them by their path, and says so.
    made = tmp_path / "made"
    code, out, err = prepare_here(capsys, "index", "--train", f"{made}/train/", "--val", f"{made}/val/", "--out", url)
    assert code == 0 and f"notice: {url}/manifest.json will name tars by their path on this machine's disk\n" in err
    assert Manifest.read(url).shards("train")[0].tar == str(made / "train/000000.tar")


def test_synthetic_and_stats_go_to_the_bucket_and_new_shards_take_the_old_stats_away(tmp_path, object_store, capsys):
    url = bucket(object_store, "prepared") + "/synthetic"
    make = ["synthetic", "--train-count", 40, "--val-count", 8, "--size", 16, "--min-shards", 2, "--workers", 1]
    assert prepare_here(capsys, *make, "--out", url, "--staging", tmp_path / "staged")[0] == 0
    assert (tmp_path / "staged/train/000001.tar").is_file()  # a staging folder named by the user is kept
    code, out, err = prepare_here(capsys, "stats", "--out", url)
    assert code == 0, err
    assert f"uploaded 3 files to {url} (0 were there already)" in out
    assert out.strip().splitlines()[-1] == f"wrote {url}/stats.json, mean_image.npy and mean_image.png"
    assert read_stats(Manifest.read(url))["images"] == 40
    assert {"stats.json", "mean_image.npy", "mean_image.png"} <= set(objects(object_store, url))

    code, out, err = prepare_here(capsys, *make, "--seed", 1, "--out", url)  # other shards
    assert code == 0, err
    assert out.strip().splitlines()[-1] == (
        f"removed stats.json and mean_image.* (they described the earlier shards): run alexnet-prepare stats "
        f"--out {url} again"
    )
    assert sorted(objects(object_store, url)) == ["manifest.json"] + [
        f"{s}/{i:06d}.{e}" for s in ("train", "val") for i in range(2) for e in ("idx", "tar")
    ]
    # The same command once more (its staging folder gone with its success, so every shard is made
    # anew): every object is there whole, and nothing is sent again.
    code, out, err = prepare_here(capsys, *make, "--seed", 1, "--out", url)
    assert f"uploaded 0 files to {url} (9 were there already)" in out, out


@pytest.mark.parametrize(
    "out, message",
    [
        (
            "http://127.0.0.1:9/data",
            "--out http://127.0.0.1:9/data: alexnet-prepare cannot write over HTTP; write to "
            "a local folder or s3://BUCKET/PREFIX, then serve that folder over HTTP if you like",
        ),
        (
            "s3:/prepared/data",
            "--out s3:/prepared/data: looks like a URL, but alexnet-prepare writes to a local "
            "folder or s3://BUCKET/PREFIX only; give one of those",
        ),
        (
            "s3://no-such-bucket/data",
            "s3://no-such-bucket/data: cannot be written (NoSuchBucket: The specified "
            "bucket does not exist); check the location and the settings",
        ),
    ],
)
def test_an_output_that_cannot_be_written_is_one_line_before_any_work(
    tmp_path, monkeypatch, object_store, capsys, out, message
):
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = prepare_here(capsys, "synthetic", "--out", out, "--workers", 1)
    assert (code, stderr) == (2, f"error: {message}\n")
    assert list(tmp_path.iterdir()) == []


def test_missing_credentials_are_one_line(tmp_path, object_store, cli_env):
    env = {k: v for k, v in cli_env.items() if not k.startswith("AWS_") or k == "AWS_ENDPOINT_URL"}
    env["HOME"] = str(tmp_path)  # no ~/.aws either
    out = run_cli("alexnet-prepare", "synthetic", "--out", "s3://prepared/x", cwd=tmp_path, env=env, check=False)
    assert (out.returncode, out.stderr) == (
        2,
        "error: s3://prepared/x: cannot be written (no AWS credentials: set AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE); check the location and the settings\n",
    )


@pytest.mark.slow
def test_a_store_gone_mid_upload_is_one_line_and_the_same_command_finishes_once_it_is_back(
    tmp_path, image_folder, cli_env
):
    server = ObjectStore(tmp_path)  # its own server: this test stops it
    try:
        url = bucket(server, "gone") + "/direct"
        env = {**cli_env, **server.env}
        args = ["imagefolder", "--src", image_folder, "--out", url, "--shard-size", 10, "--workers", 1]
        proc = start_cli("alexnet-prepare", *args, cwd=tmp_path, env=env)
        deadline = time.monotonic() + 120
        while not any(name.endswith(".tar") for name in objects(server, url)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        server.stop()
        _, err = proc.communicate(timeout=120)
        last = err.strip().splitlines()[-1]
        assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
        assert re.fullmatch(
            r"error: s3://gone/direct/\S+: cannot be written \(.+\) after 6 tries over \d+ s; check that the store "
            r"is reachable, then run the same command again \(what was uploaded is kept\)",
            last,
        ), last
        server.start()  # on the same port, empty (moto keeps its objects in memory)
        bucket(server, "gone")
        out = run_cli("alexnet-prepare", *args, cwd=tmp_path, env=env)
        assert f"uploaded 133 files to {url} (0 were there already)" in out.stdout
        manifest = json.loads(server.client().get_object(Bucket="gone", Key="direct/manifest.json")["Body"].read())
        assert [manifest["splits"][s]["count"] for s in ("train", "val")] == [600, 12]
        assert sorted(objects(server, url)) == EVERY_OBJECT
    finally:
        server.stop()
