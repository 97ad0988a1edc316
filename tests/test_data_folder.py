"""Two commands on one data folder: one alexnet-prepare writes a folder at a time (the second is
refused in one line naming the first), and a training whose data changes under it stops in one
line naming the file, with the checkpoint of its last finished step.

Each case is made deterministic: the lock is held by the test process, or the first command is
frozen (SIGSTOP) once it holds the lock, or the data is changed after a known training step."""

import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import tarfile
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import run_cli, run_here, start_cli
from helpers.shards import WDS, data_module
from PIL import Image

from alexnet_dist import locks
from alexnet_dist.cli import prepare
from alexnet_dist.data import sources
from alexnet_dist.data.shards import write_dataset
from alexnet_dist.errors import DataChanged, DataError
from alexnet_dist.training.run import Run

SMALL = ["--train-count", "64", "--val-count", "32", "--classes", "4", "--min-shards", "4", "--workers", "1"]
REFUSED = (
    r"error: {out}: being written by another alexnet-prepare \(pid {pid} on {host} \({command}\), since "
    r"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\); one writer per data folder: wait for it to end, or stop it, then run this "
    r"command again"
)


def refused(out, pid: int, command: str) -> str:
    return REFUSED.format(out=re.escape(str(out)), pid=pid, host=re.escape(socket.gethostname()), command=command)


def files(folder: Path) -> dict:
    """Every file under `folder` with its size and modification time: what a refused command must leave."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def image_sizes(folder: Path) -> set:
    """The (width, height) of every image in the folder's shards."""
    sizes = set()
    for tar in sorted(folder.glob("*/*.tar")):
        with tarfile.open(tar) as t:
            for member in t.getmembers():
                if member.name.endswith(".jpg"):
                    sizes.add(Image.open(t.extractfile(member)).size)
    return sizes


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """64 training and 32 validation images of 32 px, 4 classes, 4 shards per split."""
    root = tmp_path_factory.mktemp("folder")
    write_dataset(sources.synthetic(4, 64, 32, 32), root, source_name="synthetic", min_shards=4, progress=False)
    return root


@pytest.fixture
def data(shards, tmp_path) -> Path:
    return Path(shutil.copytree(shards, tmp_path / "data"))


# --- One writer per data folder ------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["synthetic", *SMALL],
        ["synthetic", *SMALL, "--size", "40"],
        ["stats", "--sample", "16"],
        ["index", "--train", "{src}/train/", "--val", "{src}/val/"],
    ],
    ids=["synthetic", "other-size", "stats", "index"],
)
def test_a_second_writer_is_refused_in_one_line_and_changes_nothing(data, shards, argv, capsys):
    """The test process holds the folder's lock as a running alexnet-prepare would."""
    holder = locks.take(data / locks.DATA_FOLDER, {"command": "alexnet-prepare synthetic --out DATA"}, "")
    before = files(data)
    try:
        outcome = run_here(
            prepare.main, *[a.format(src=shards) for a in argv], "--out", data, capsys=capsys, check=False
        )
    finally:
        holder.close()
    assert outcome.returncode == 2 and outcome.stderr.count("\n") == 1, outcome.stderr
    assert re.fullmatch(refused(data, os.getpid(), "alexnet-prepare synthetic --out DATA"), outcome.stderr.strip())
    assert files(data) == before
    # once the holder has gone, the same command runs
    run_here(prepare.main, *[a.format(src=shards) for a in argv], "--out", data, capsys=capsys)


def test_an_out_that_cannot_hold_a_data_set_is_one_line(tmp_path, capsys):
    """The lock is the first thing made in --out: a file there is one line, not a traceback."""
    (tmp_path / "afile").write_text("")
    outcome = run_here(prepare.main, "synthetic", *SMALL, "--out", tmp_path / "afile", capsys=capsys, check=False)
    assert outcome.returncode == 2
    assert outcome.stderr == (
        f"error: {tmp_path / 'afile'}: cannot hold the data set (File exists); give --out a folder you can write\n"
    )


def frozen_once_locked(proc, folder: Path, timeout: float = 60) -> dict:
    """Waits until `proc` holds `folder`'s lock, then stops it there (SIGSTOP): it holds the lock,
    mid-way, for as long as the test needs. Returns what it wrote about itself."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        who = locks.held_by(folder / locks.DATA_FOLDER)
        if who and who.get("pid") == proc.pid:
            os.kill(proc.pid, signal.SIGSTOP)
            return who
        time.sleep(0.02)
    raise AssertionError(f"{proc.args} did not take the lock in {timeout} s")


@pytest.mark.parametrize("second_size", [32, 40], ids=["same-command", "other-size"])
def test_two_prepares_at_once_one_writes_the_other_is_refused(tmp_path, cli_env, second_size):
    """Both started on one folder; the second while the first is mid-way. The first completes a
    data set of one image size, the second changed nothing, and once the first is done the second
    runs (a re-prepare with its own size)."""
    out = tmp_path / "data"
    first = start_cli("alexnet-prepare", "synthetic", "--out", out, *SMALL, "--size", 32, cwd=tmp_path, env=cli_env)
    try:
        frozen_once_locked(first, out)
        second = run_cli(
            "alexnet-prepare",
            "synthetic",
            "--out",
            out,
            *SMALL,
            "--size",
            second_size,
            cwd=tmp_path,
            env=cli_env,
            check=False,
        )
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    command = re.escape(f"alexnet-prepare synthetic --out {out} {' '.join(SMALL)} --size 32")
    assert re.fullmatch(refused(out, first.pid, command), second.stderr.strip())
    assert image_sizes(out) == {(32, 32)}
    assert json.loads((out / "manifest.json").read_text())["image_size"] == [32, 32]
    assert not list(out.rglob("*.tmp"))
    run_cli("alexnet-prepare", "synthetic", "--out", out, *SMALL, "--size", second_size, cwd=tmp_path, env=cli_env)
    assert image_sizes(out) == {(second_size, second_size)}


def test_the_lock_goes_with_a_killed_writer(tmp_path, cli_env):
    """kill -9 of the holder mid-way: the next command is not refused, and completes the data set."""
    out = tmp_path / "data"
    first = start_cli("alexnet-prepare", "synthetic", "--out", out, *SMALL, cwd=tmp_path, env=cli_env)
    frozen_once_locked(first, out)
    first.kill()
    first.communicate()
    assert (out / locks.DATA_FOLDER).exists()  # the file stays; the lock went with the process
    proc = run_cli("alexnet-prepare", "synthetic", "--out", out, *SMALL, "--size", 40, cwd=tmp_path, env=cli_env)
    assert "train: 64 images in 4 shards" in proc.stdout
    assert image_sizes(out) == {(40, 40)}


def test_a_prepare_while_index_writes_the_folder_is_refused(shards, tmp_path, cli_env):
    out = tmp_path / "data"
    index = start_cli(
        "alexnet-prepare",
        "index",
        "--train",
        f"{shards}/train/",
        "--val",
        f"{shards}/val/",
        "--out",
        out,
        cwd=tmp_path,
        env=cli_env,
    )
    try:
        frozen_once_locked(index, out)
        proc = run_cli("alexnet-prepare", "synthetic", "--out", out, *SMALL, cwd=tmp_path, env=cli_env, check=False)
    finally:
        os.kill(index.pid, signal.SIGCONT)
    _, err = index.communicate(timeout=120)
    assert index.returncode == 0, err
    assert proc.returncode == 2
    command = f"alexnet-prepare index --train {shards}/train/ --val {shards}/val/ --out {out}"
    command = command if len(command) <= 200 else command[:197] + "..."  # a long one is cut (the paths of xdist)
    assert re.fullmatch(refused(out, index.pid, re.escape(command)), proc.stderr.strip()), proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "index" and not (out / "train").exists()  # the index's, nothing of synthetic's


def test_a_training_is_refused_while_the_folder_is_being_written(data):
    holder = locks.take(data / locks.DATA_FOLDER, {"command": "alexnet-prepare synthetic --out DATA"}, "")
    try:
        with pytest.raises(DataError) as refusal:
            data_module(data, WDS)
    finally:
        holder.close()
    assert re.fullmatch(
        rf"data.root={re.escape(str(data))}: being written by alexnet-prepare \(pid {os.getpid()} on "
        rf"{re.escape(socket.gethostname())} \(alexnet-prepare synthetic --out DATA\), since [-0-9: ]+\); wait for it "
        "to end, then start the training",
        str(refusal.value),
    )
    data_module(data, WDS)  # the writer gone, the same folder trains


def test_an_s3_out_is_locked_through_its_staging_folder(tmp_path, object_store, capsys):
    """Two commands staging one s3:// prefix in one folder: the second is refused, the bucket untouched."""
    staging = tmp_path / "staging"
    holder = locks.take(staging / locks.DATA_FOLDER, {"command": "alexnet-prepare synthetic --out s3://b/d"}, "")
    object_store.client().create_bucket(Bucket="lockb")
    try:
        outcome = run_here(
            prepare.main, "synthetic", *SMALL, "--out", "s3://lockb/d", "--staging", staging, capsys=capsys, check=False
        )
    finally:
        holder.close()
    assert outcome.returncode == 2
    assert re.fullmatch(
        refused(
            f"s3://lockb/d (staged in {staging})", os.getpid(), re.escape("alexnet-prepare synthetic --out s3://b/d")
        ),
        outcome.stderr.strip(),
    )
    assert "Contents" not in object_store.client().list_objects_v2(Bucket="lockb")


# --- A training notices its data changed under it ---------------------------------------------------


def replace_tar(data: Path, other: Path) -> None:
    """train/000001.tar rewritten with another data set's (its index file left as it was)."""
    shutil.copy(other / "train" / "000001.tar", data / "train" / "000001.tar.new")
    os.replace(data / "train" / "000001.tar.new", data / "train" / "000001.tar")


@pytest.mark.parametrize("loader", [pytest.param({"name": "dali"}, id="dali"), pytest.param(WDS, id="wds")])
def test_a_tar_or_index_file_replaced_under_a_loader_is_named_as_it_is_opened(data, tmp_path, loader):
    dm = data_module(data, loader, batch_size=8, crop=28, val_resize=None)
    other = tmp_path / "other"
    write_dataset(
        sources.synthetic(4, 64, 32, 40, seed=1), other, source_name="synthetic", min_shards=4, progress=False
    )
    replace_tar(data, other)
    with pytest.raises(
        DataChanged,
        match=rf"^{re.escape(str(data))}/train/000001.tar: changed since this training "
        r"started \((\d+ bytes when the run started, \d+ now|replaced by another file of the same "
        r"size)\); the run stops rather than mix data",
    ):
        list(dm.train_dataloader())
    dm = data_module(data, loader, batch_size=8, crop=28, val_resize=None)
    (data / "val" / "000002.idx").write_text((data / "val" / "000002.idx").read_text())  # the same text, rewritten
    with pytest.raises(
        DataChanged,
        match=rf"^{re.escape(str(data))}/val/000002.idx: changed since this training "
        r"started \((replaced by another file of the same size|rewritten at [-0-9: ]+)\)",
    ):
        list(dm.val_dataloader())


class ChangeAt(pl.Callback):
    """Runs `change()` once, after training step `step`: the data changes at a known moment."""

    def __init__(self, step: int, change):
        self.step, self.change, self.done = step, change, False
        self.trained = 0  # the global step after the last finished training step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.trained = trainer.global_step
        if trainer.global_step == self.step and not self.done:
            self.done = True
            self.change()


def re_prepare(data: Path, cli_env):
    # a real alexnet-prepare of other-sized images into the folder the run reads
    return lambda: run_cli("alexnet-prepare", "synthetic", "--out", data, *SMALL, "--size", 40, cwd=data, env=cli_env)


def one_tar(data: Path, tmp_path: Path):
    def change():
        write_dataset(
            sources.synthetic(4, 64, 32, 40, seed=1),
            tmp_path / "other",
            source_name="synthetic",
            min_shards=4,
            progress=False,
        )
        replace_tar(data, tmp_path / "other")

    return change


def manifest_only(data: Path):
    def change():  # the mean and std a user edited in, say
        manifest = json.loads((data / "manifest.json").read_text())
        manifest["mean"] = [100.0, 100.0, 100.0]
        (data / "manifest.json").write_text(json.dumps(manifest))

    return change


CHANGED = {
    "re-prepare": r"(manifest.json: changed since this training started \((removed|rewritten)\)|"
    r"(train|val)/\d+\.(tar|idx): changed since this training started \([^)]+\))",
    "one-tar": r"train/000001.tar: changed since this training started \([^)]+\)",
    "manifest": r"manifest.json: changed since this training started \(rewritten\)",
}


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["wds", "dali"])
@pytest.mark.parametrize("change", list(CHANGED))
def test_a_training_whose_data_changes_under_it_stops_with_its_checkpoint(
    shards, data, tmp_path, monkeypatch, train_here, cli_env, loader, change
):
    """After step 3 of 8 of the first epoch the data changes; the run must not train on (the
    first epoch's validation, the next epochs) with it: one line, exit 2, the checkpoint of the step
    it stood at, no results."""
    make = {
        "re-prepare": re_prepare(data, cli_env),
        "one-tar": one_tar(data, tmp_path),
        "manifest": manifest_only(data),
    }
    own = Run.callbacks
    changer = ChangeAt(3, make[change])
    monkeypatch.setattr(Run, "callbacks", lambda self, *a, **kw: [*own(self, *a, **kw), changer])
    args = (
        "experiment=smoke",
        "logger=csv",
        "+trainer.enable_progress_bar=false",
        "trainer.max_epochs=3",
        f"data.root={data}",
        "data.batch_size=8",
        f"loader={loader}",
        "checkpoint.every_n_steps=100",
        "run_id=r",
    )
    outcome = train_here(*args)
    assert outcome.returncode == 2, outcome.stderr
    last = outcome.stderr.strip().splitlines()[-1]
    assert "Traceback" not in outcome.stderr
    assert re.fullmatch(
        rf"error: {re.escape(str(data))}/{CHANGED[change]}; the run stops rather than mix data \(its last checkpoint "
        r"is kept\): train the new data as a new run \(another run_id=NAME\), or put back the data this run started "
        "with and run the same command to resume",
        last,
    ), last
    run = tmp_path / "runs" / "smoke" / "r"
    assert not (run / "results.json").exists()
    step = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    # the checkpoint of the last finished step, within the first epoch (8 steps), after the change
    assert step == changer.trained and 3 <= step <= 8, (step, changer.trained)
    # as the line says: the data put back, the same command resumes from that checkpoint and finishes
    monkeypatch.setattr(Run, "callbacks", own)
    shutil.rmtree(data)
    shutil.copytree(shards, data)
    # A stopped command's process ends, and its loader workers with it; this one goes on, so end
    # them as that exit would (forked from it, they share the run directory's lock)
    for worker in multiprocessing.active_children():
        worker.kill()  # (they ignore SIGTERM: the run's stop signal is the training process's)
        worker.join()
    outcome = train_here(*args)
    assert outcome.returncode == 0, outcome.stderr
    assert f"resuming from {run / 'checkpoints'}/" in outcome.stdout
    assert json.loads((run / "results.json").read_text())["global_step"] == 24
