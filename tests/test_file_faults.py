"""Damaged or foreign files where the user's commands read them: shards, index files, manifest.json,
a run's config.yaml, probability files, the mean image. Each ends in one `error:` line naming the
file and saying how to fix it; never a traceback or a silently wrong result. The commands users run
are run as subprocesses where it matters most; the rest of each family goes through the same
entry points in this process, which is much faster."""

import json
import os
import random
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from helpers.shards import WDS, data_module, edit_manifest, replace_shard

from alexnet_dist.cli import evaluate
from alexnet_dist.data import sources
from alexnet_dist.data.manifest import Manifest
from alexnet_dist.data.shards import write_dataset
from alexnet_dist.errors import UserError
from alexnet_dist.models import create

DALI = {"name": "dali"}
LOADERS = [pytest.param(DALI, id="dali"), pytest.param(WDS, id="wds")]
SMOKE = ["experiment=smoke", "logger=csv", "+trainer.enable_progress_bar=false", "trainer.max_epochs=1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """64 training and 32 validation images of 32 px, 4 classes, 2 shards per split."""
    root = tmp_path_factory.mktemp("faults")
    write_dataset(sources.synthetic(4, 64, 32, 32), root, source_name="synthetic", min_shards=2, progress=False)
    return root


@pytest.fixture
def data(shards, tmp_path) -> Path:
    """A copy of the shards to damage."""
    return Path(shutil.copytree(shards, tmp_path / "data"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A plain state dict of alexnet_small for 4 classes, in a run directory's checkpoints/."""
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "w.pth"
    path.parent.mkdir()
    torch.save(create("alexnet_small", 4).state_dict(), path)
    return path


def module(root, loader, **kw):
    return data_module(root, loader, batch_size=8, crop=28, val_resize=None, **kw)


def one_error_line(stderr: str) -> str:
    """The error line of a command that failed as it should: the last line, no traceback."""
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), stderr
    return last


def main_fails(main, *argv, capsys) -> str:
    """Runs a command's entry point in this process; it must exit 2 with one `error:` line."""
    with pytest.raises(SystemExit) as stopped:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1, err
    return one_error_line(err)


# --- Shards ---------------------------------------------------------------------------------------


def damage(tar: Path, kind: str) -> None:
    size = tar.stat().st_size
    if kind == "zeros":  # overwritten in place: the same size, all zeros
        tar.write_bytes(b"\0" * size)
    elif kind == "zeros-10k":
        tar.write_bytes(b"\0" * 10240)
    elif kind == "empty":
        tar.write_bytes(b"")
    elif kind == "random":
        tar.write_bytes(random.Random(0).randbytes(size))
    elif kind == "directory":
        tar.unlink()
        tar.mkdir()
    elif kind == "unreadable":
        tar.chmod(0)


DAMAGES = ["zeros", "zeros-10k", "empty", "random", "directory"]
if os.geteuid() != 0:  # root reads any file whatever its permissions
    DAMAGES.append("unreadable")


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("split", ["train", "val"])
def test_a_damaged_tar_is_named_in_one_line_by_either_loader(data, kind, loader, split):
    """Found at start where a look at the file is enough (a directory, no permission, too short
    for its index), else where the loader starts reading the tar."""
    tar = data / split / "000001.tar"
    damage(tar, kind)
    # a training pass starts anywhere in the tar (the epoch's order), evaluation at its start
    found = (
        r"no tar header at (its start|byte \d+)|not a file|not readable|\d+ bytes but its index lists data up to byte"
    )
    with pytest.raises(UserError, match=rf"{tar}: ({found}).*re-create it with alexnet-prepare"):
        list(getattr(module(data, loader), f"{split}_dataloader")())


@pytest.mark.parametrize("loader", LOADERS)
def test_a_tar_damaged_inside_is_named_by_the_loader(data, loader):
    """The first header is sound, the second half of the tar zeros: found as the loader reads."""
    tar = data / "val" / "000000.tar"
    whole = tar.read_bytes()
    tar.write_bytes(whole[: len(whole) // 2] + b"\0" * (len(whole) - len(whole) // 2))
    found = r": no tar header at byte|: holds \d+ samples but manifest.json|:[^ ]+: sample has no .cls label"
    with pytest.raises(UserError, match=rf"{tar}({found})"):
        list(module(data, loader).val_dataloader())


def test_training_with_dali_on_a_tar_of_zeros_stops_in_one_line(data, tmp_path, cli_env):
    tar = data / "train" / "000000.tar"
    damage(tar, "zeros")
    proc = run_cli(
        "alexnet-train", *SMOKE, f"data.root={data}", "loader=dali", "run_id=z", cwd=tmp_path, env=cli_env, check=False
    )
    assert proc.returncode == 2
    assert one_error_line(proc.stderr).startswith(f"error: {tar}: no tar header at ")


def test_evaluating_with_webdataset_on_a_tar_of_zeros_stops_in_one_line(data, weights, tmp_path, cli_env):
    tar = data / "val" / "000001.tar"
    damage(tar, "zeros")
    proc = run_cli(
        "alexnet-eval",
        f"ckpt_path={weights}",
        "model=alexnet_small",
        f"data.root={data}",
        "loader=wds",
        cwd=tmp_path,
        env=cli_env,
        check=False,
    )
    assert proc.returncode == 2
    assert one_error_line(proc.stderr).startswith(f"error: {tar}: no tar header at its start")


@pytest.mark.parametrize("kind", ["zeros", "random"])
def test_prepare_stats_on_a_damaged_tar_stops_in_one_line(data, tmp_path, cli_env, kind):
    """A tar of zeros read as an empty one: the statistics came from the other shards, exit 0."""
    tar = data / "train" / "000000.tar"
    damage(tar, kind)
    proc = run_cli("alexnet-prepare", "stats", "--out", data, cwd=tmp_path, env=cli_env, check=False)
    assert proc.returncode == 2 and not (data / "stats.json").exists()
    assert one_error_line(proc.stderr).startswith(f"error: {tar}: no tar header at its start")


def scale_counts(root: Path, factor: float, splits=("train", "val")) -> None:
    """Every shard's count in manifest.json times `factor`, the splits' totals to match."""

    def change(m):
        for split in splits:
            for shard in m["splits"][split]["shards"]:
                shard["count"] = int(shard["count"] * factor)
            m["splits"][split]["count"] = sum(s["count"] for s in m["splits"][split]["shards"])

    edit_manifest(root, change)


def test_evaluating_shards_whose_manifest_counts_half_as_many_again_stops_in_one_line(data, weights, tmp_path, cli_env):
    """The val split's 32 images counted as 48 (the totals consistent): it was believed."""
    scale_counts(data, 1.5, ["val"])
    proc = run_cli(
        "alexnet-eval",
        f"ckpt_path={weights}",
        "model=alexnet_small",
        f"data.root={data}",
        cwd=tmp_path,
        env=cli_env,
        check=False,
    )
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert line.startswith(f"error: {data}/val/000000.tar: holds 16 samples but manifest.json says 24"), line


@pytest.mark.parametrize("loader", ["wds", "dali"])
def test_evaluating_shards_whose_manifest_counts_half_of_them_stops_in_one_line(data, weights, capsys, loader):
    scale_counts(data, 0.5, ["val"])
    argv = [f"ckpt_path={weights}", "model=alexnet_small", f"data.root={data}", f"loader={loader}"]
    line = main_fails(evaluate.main, *argv, capsys=capsys)
    assert line.startswith(f"error: {data}/val/000000.tar: holds 16 samples but manifest.json says 8"), line


def cut_index(root: Path, split: str, factor: float) -> None:
    """Index files and manifest agree on `factor` times the samples each tar holds: with fewer,
    the index lists only the first ones; with more, the extra entries point past the tar's end."""
    scale_counts(root, factor, [split])
    for index in (root / split).glob("*.idx"):
        _, *lines = index.read_text().splitlines()
        n = int(len(lines) * factor)
        beyond = [" ".join(str(int(f) + 10**6) if f.isdigit() else f for f in line.split()) for line in lines]
        lines = (lines + beyond)[:n]
        index.write_text(f"v1.2 {n}\n" + "\n".join(lines) + "\n")


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("factor", [0.5, 1.5])
def test_a_tar_holding_more_or_fewer_samples_than_its_index_and_the_manifest_is_named(data, loader, split, factor):
    """DALI reads what the index lists: half the samples were read without a word."""
    cut_index(data, split, factor)
    tar = data / split / "000000.tar"
    if factor > 1:  # the tar holds fewer than counted
        expected = r"holds \d+ samples but manifest.json says \d+|\d+ bytes but its index lists data up to byte"
    else:
        expected = r"holds \d+ samples but manifest.json says \d+|holds more samples than its index file"
    with pytest.raises(UserError, match=rf"{tar}: ({expected})"):
        list(getattr(module(data, loader), f"{split}_dataloader")())


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda m: m["splits"]["val"]["shards"][0].update(count="16"), "shard 0 of split 'val' lacks a tar name"),
        (lambda m: m["splits"]["val"]["shards"][1].pop("tar"), "shard 1 of split 'val' lacks a tar name"),
        (lambda m: m["splits"]["train"].update(count=None), "split 'train' has no sample count"),
        (lambda m: m["splits"].update(val=[]), "split 'val' has no list of shards"),
        (lambda m: m.update(classes="cat dog"), "'classes' is not a list of names"),
        (lambda m: m.update(mean=["128", 128, 128]), "'mean' is not 3 numbers"),
        (lambda m: m.update(image_size=32), "'image_size' is not 2 numbers"),
    ],
    ids=["count as text", "no tar", "no split count", "shards not a list", "classes as text", "mean", "image size"],
)
def test_a_manifest_with_fields_of_the_wrong_type_is_named(data, change, expected):
    edit_manifest(data, change)
    with pytest.raises(UserError, match=rf"{data}/manifest.json: {expected}.*re-run alexnet-prepare"):
        Manifest.read(data)


def test_a_missing_index_or_one_that_is_not_an_index_is_named(data):
    index = data / "val" / "000001.idx"
    index.unlink()
    with pytest.raises(UserError, match=rf"{index}: DALI index file of .*000001.tar missing; re-run alexnet-prepare"):
        module(data, WDS).val_dataloader()
    index.write_text("jpg 512 100 a.jpg\n")
    with pytest.raises(UserError, match=rf"{index}: not a DALI index file"):
        module(data, WDS).val_dataloader()


def garble_index(index: Path, number: int, change) -> None:
    """Replaces sample `number`'s line of an index file (-1: the last) with change(its fields)."""
    header, *lines = index.read_text().splitlines()
    lines[number] = change(lines[number].split())
    index.write_text("\n".join([header, *lines]) + "\n")


GARBLED = {
    "cut to 3 fields": lambda f: " ".join(f[:3]),
    "5 fields": lambda f: " ".join(f[:5]),
    "not a number": lambda f: " ".join(["jpg", "abc", *f[2:]]),
    "offset inside the first header": lambda f: " ".join(["jpg", "10", *f[2:]]),
}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("change", GARBLED.values(), ids=GARBLED.keys())
def test_a_garbled_last_index_line_is_named_at_start_by_either_loader(data, loader, change):
    """Once a 3-field line passed as an empty entry and DALI blamed the tar for holding more samples."""
    index = data / "val" / "000001.idx"
    garble_index(index, -1, change)
    with pytest.raises(
        UserError, match=rf"^{index}: not a DALI index file \(a sample's line reads .*re-run alexnet-prepare$"
    ):
        module(data, loader).val_dataloader()


@pytest.mark.parametrize("change", [GARBLED["not a number"], lambda f: ""], ids=["not a number", "blank"])
def test_a_garbled_first_index_line_is_named_by_dali(data, change):
    """DALI starts reading a tar where its slice's first index line points: once a ValueError or
    "min() arg is an empty sequence" traceback."""
    index = data / "val" / "000000.idx"
    garble_index(index, 0, change)
    with pytest.raises(UserError, match=rf"^{index}: not a DALI index file \(a sample's line reads "):
        list(module(data, DALI).val_dataloader())


# --- Other files users pass ------------------------------------------------------------------------


def run_dir_with_config(weights: Path, tmp_path: Path, text: str) -> Path:
    """A copy of the weights in a run directory whose config.yaml holds `text`; the weights' path."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(text)
    return Path(shutil.copy(weights, run / "checkpoints" / "w.pth"))


def test_a_config_yaml_with_a_python_tag_is_refused_in_one_line_and_nothing_runs(weights, tmp_path, cli_env):
    ran = tmp_path / "ran"
    ckpt = run_dir_with_config(weights, tmp_path, f'!!python/object/apply:os.system ["touch {ran}"]\n')
    proc = run_cli("alexnet-eval", f"ckpt_path={ckpt}", "model=alexnet_small", cwd=tmp_path, env=cli_env, check=False)
    assert proc.returncode == 2 and not ran.exists()
    line = one_error_line(proc.stderr)
    assert line.startswith(f"error: {tmp_path}/run/config.yaml: not a run's config (could not determine a constructor")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("data: !!python/name:os.system\n", "not a run's config"),
        ("data: {root: [1\n", "not a run's config"),
        ("- data\n- loader\n", "not a mapping of settings"),
        ("experiment_name: x\n", "no data and loader settings"),
        ("data: {root: /x}\n", "no data and loader settings"),
        ("data: {root: /x, batch_size: abc}\nloader: {name: wds}\n", "data.batch_size: Value 'abc'"),
        ("data: {root: /x}\nloader: {workers: 2}\n", "Missing key name"),
        ("data: {root: '${nowhere}'}\nloader: {name: wds}\n", "Interpolation key 'nowhere' not found"),
    ],
)
def test_a_config_yaml_that_is_not_a_runs_config_is_named_in_one_line(weights, tmp_path, capsys, text, expected):
    ckpt = run_dir_with_config(weights, tmp_path, text)
    line = main_fails(evaluate.main, f"ckpt_path={ckpt}", "model=alexnet_small", capsys=capsys)
    assert line.startswith(f"error: {tmp_path}/run/config.yaml: {expected}"), line


def val_samples(root: Path) -> list[tuple[str, str, int]]:
    """(tar as manifest.json names it, key, label) of every validation sample, in the manifest's
    order of the shards and each tar's order of its members, read from the tars themselves."""
    manifest = json.loads((root / "manifest.json").read_text())
    samples = []
    for shard in manifest["splits"]["val"]["shards"]:
        with tarfile.open(root / shard["tar"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                if ext == "cls":
                    samples.append((shard["tar"], key, int(tar.extractfile(member).read())))
    return samples


@pytest.mark.parametrize("loader, views", [("wds", 1), ("dali", 1), ("dali", 10)], ids=["wds", "dali", "dali-10-views"])
def test_probs_name_each_rows_shard_and_key_and_a_skipped_image_shifts_none(data, weights, tmp_path, loader, views):
    """The second image of the first val shard cannot be decoded and is skipped (the default,
    loader.bad_images=skip): every other row keeps its own shard, key and label. DALI's rows come
    in the manifest's order; the webdataset loader's workers take turns with their batches."""
    tar = data / "val" / "000000.tar"
    with tarfile.open(tar) as f:
        members = {m.name: f.extractfile(m).read() for m in f.getmembers()}
    samples = [(name[:-4], jpg, members[f"{name[:-4]}.cls"]) for name, jpg in members.items() if name.endswith(".jpg")]
    bad = samples[1][0]
    samples[1] = (bad, b"\xff\xd8\xff\xe0 this is not a JPEG" * 4, samples[1][2])
    replace_shard(data, "val", 0, samples)
    expected = [sample for sample in val_samples(data) if sample[1] != bad]
    assert len(expected) == 31
    # small crops, as the run's config.yaml sets them; batches of 10, so DALI pads the last one
    ckpt = run_dir_with_config(weights, tmp_path, "data: {crop: 28, val_resize: null}\nloader: {name: wds}\n")
    out = tmp_path / "p.npz"
    argv = [f"ckpt_path={ckpt}", "model=alexnet_small", f"data.root={data}", f"loader={loader}", f"views={views}"]
    evaluate.main([*argv, "batch_size=10", f"probs={out}"])
    with np.load(out, allow_pickle=False) as stored:
        assert stored["probs"].shape == (31, 4)
        rows = list(zip(stored["shards"].tolist(), stored["keys"].tolist(), stored["labels"].tolist(), strict=True))
    assert sorted(rows) == sorted(expected)
    if loader == "dali":
        assert rows == expected


def write_probs(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


GOOD = dict(probs=np.full((6, 3), 1 / 3, dtype=np.float32), labels=np.array([0, 1, 2, 0, 1, 2]))
# what alexnet-eval stores beside them: each row's shard, as manifest.json names it, and key
NAMED = dict(
    shards=np.array(["val/000000.tar"] * 3 + ["val/000001.tar"] * 3), keys=np.array([f"k{i}" for i in range(6)])
)


def test_ensemble_refuses_files_whose_rows_are_other_images_and_takes_files_without_keys(tmp_path, capsys):
    """The labels agree row for row, so only the keys show that two rows were swapped."""
    named = write_probs(tmp_path / "named.npz", **GOOD, **NAMED)
    old = write_probs(tmp_path / "old.npz", **GOOD)  # written before alexnet-eval stored keys
    swapped = NAMED["keys"][[0, 4, 2, 3, 1, 5]]
    other = write_probs(tmp_path / "other.npz", **GOOD, shards=NAMED["shards"], keys=swapped)
    line = main_fails(evaluate.main, "ensemble", f"probs={named},{old},{other}", capsys=capsys)
    assert line == (
        f"error: {other}: row 1 is image val/000000.tar:k4 but in {named} it is val/000000.tar:k1; "
        "evaluate every run on the same data with the same loader and batch_size"
    )
    evaluate.main(["ensemble", f"probs={named},{old},{named}"])
    result = json.loads(capsys.readouterr().out)
    assert result["val_count"] == 6 and result["val_top1"] == pytest.approx(1 / 3)


def test_an_object_array_npz_given_to_ensemble_is_named_in_one_line(tmp_path, cli_env):
    good = write_probs(tmp_path / "good.npz", **GOOD)
    bad = write_probs(tmp_path / "bad.npz", probs=np.array([{"a": 1}] * 6, dtype=object), labels=GOOD["labels"])
    proc = run_cli("alexnet-eval", "ensemble", f"probs={good},{bad}", cwd=tmp_path, env=cli_env, check=False)
    assert proc.returncode == 2
    assert one_error_line(proc.stderr).startswith(f"error: probs: {bad} is not an .npz of alexnet-eval")


def npz_fault(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "bad.npz"
    if kind == "no labels":
        write_probs(path, probs=GOOD["probs"])
    elif kind == "probs 1-D":
        write_probs(path, probs=GOOD["probs"][:, 0], labels=GOOD["labels"])
    elif kind == "labels of another length":
        write_probs(path, probs=GOOD["probs"], labels=GOOD["labels"][:4])
    elif kind == "float labels":
        write_probs(path, probs=GOOD["probs"], labels=GOOD["labels"].astype(np.float64))
    elif kind == "labels out of range":
        write_probs(path, probs=GOOD["probs"], labels=GOOD["labels"] + 5)
    elif kind == "not a zip":
        path.write_text("probs,labels\n0.3,1\n")
    elif kind == "truncated":
        write_probs(path, **GOOD)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "a single .npy":
        np.save(tmp_path / "bad.npy", GOOD["probs"])
        path = tmp_path / "bad.npy"
    elif kind == "a directory":
        path.mkdir()
    elif kind == "keys without shards":
        write_probs(path, **GOOD, keys=NAMED["keys"])
    elif kind == "numbers as keys":
        write_probs(path, **GOOD, shards=NAMED["shards"], keys=np.arange(6))
    elif kind == "keys of another length":
        write_probs(path, **GOOD, shards=NAMED["shards"], keys=NAMED["keys"][:5])
    return path


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("no labels", "holds no 'labels' array"),
        ("probs 1-D", "holds probs float32 (6,)"),
        ("labels of another length", "holds probs float32 (6, 3) and labels int64 (4,)"),
        ("float labels", "holds probs float32 (6, 3) and labels float64 (6,)"),
        ("labels out of range", "has labels outside 0..2"),
        ("not a zip", "is not an .npz of alexnet-eval"),
        ("truncated", "is not an .npz of alexnet-eval"),
        ("a single .npy", "is a single array"),
        ("a directory", "is not an .npz of alexnet-eval"),
        ("keys without shards", "holds no 'shards' array beside its 'keys'"),
        ("numbers as keys", "holds shards <U14 (6,) and keys int64 (6,), not 6 strings each"),
        ("keys of another length", "holds shards <U14 (6,) and keys <U2 (5,), not 6 strings each"),
    ],
)
def test_a_probs_file_that_alexnet_eval_did_not_write_is_named_in_one_line(tmp_path, capsys, kind, expected):
    good = write_probs(tmp_path / "good.npz", **GOOD)
    bad = npz_fault(tmp_path, kind)
    line = main_fails(evaluate.main, "ensemble", f"probs={good},{bad}", capsys=capsys)
    assert line.startswith(f"error: probs: {bad} {expected}"), line


def test_probs_into_a_missing_folder_is_refused_before_evaluating(data, weights, tmp_path, capsys):
    argv = [f"ckpt_path={weights}", "model=alexnet_small", f"data.root={data}", f"probs={tmp_path}/no/p.npz"]
    line = main_fails(evaluate.main, *argv, capsys=capsys)
    assert line.startswith(f"error: probs={tmp_path}/no/p.npz: no folder {tmp_path}/no to write it in"), line


@pytest.mark.parametrize(
    "content, expected",
    [
        (np.array([[[{"a": 1}] * 3] * 32] * 32, dtype=object), "not a mean image .npy"),
        (np.full((32, 32, 3), "x"), "<U1 (32, 32, 3), not an S x S x 3 array of numbers"),
        (np.zeros((32, 32), np.float32), "float32 (32, 32), not an S x S x 3 array"),
        (np.zeros((16, 16, 3), np.float32), "(16, 16) but the shards hold [32, 32] images"),
        (np.full((32, 32, 3), np.nan, np.float32), "holds NaN or infinite values"),
        ("truncated", "not a mean image .npy"),
        ("text", "not a mean image .npy"),
    ],
    ids=["object", "strings", "2-D", "small", "nan", "truncated", "text"],
)
def test_a_mean_image_that_stats_did_not_write_is_named_in_one_line(data, content, expected):
    path = data / "mean_image.npy"
    if isinstance(content, np.ndarray):
        np.save(path, content, allow_pickle=True)
    elif content == "truncated":
        np.save(path, np.zeros((32, 32, 3), np.float32))
        path.write_bytes(path.read_bytes()[:1000])
    else:
        path.write_text("not numpy\n")
    with pytest.raises(UserError, match=re.escape(f"{path}: {expected}")):
        module(data, WDS, mean_image=True, augment="paper")


@pytest.mark.parametrize(
    "stats, expected",
    [
        ("[1, 2]", "not the statistics alexnet-prepare stats writes"),
        ('{"pca_std": [1, 2, 3]}', "'pca_vectors' is not 3 x 3 finite numbers"),
        ('{"pca_std": [1, 2], "pca_vectors": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}', "'pca_std' is not 3 finite"),
        ('{"pca_std": ["a", 2, 3], "pca_vectors": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}', "'pca_std' is not 3 finite"),
    ],
)
def test_a_stats_json_that_stats_did_not_write_is_named_in_one_line(data, stats, expected):
    (data / "stats.json").write_text(stats)
    with pytest.raises(UserError, match=rf"{data}/stats.json: {expected}"):
        module(data, WDS)


def test_what_stats_writes_is_read_back(data):
    """The checks above refuse nothing that `alexnet-prepare stats` writes."""
    from alexnet_dist.data.stats import compute_stats

    compute_stats(data, count=16)
    dm = module(data, WDS, mean_image=True, augment="paper")
    assert dm.normalize.mean_image.shape == (3, 32, 32)
    with tarfile.open(data / "val" / "000000.tar") as tar:  # the shards were left as they were
        assert len([m for m in tar if m.name.endswith(".jpg")]) == 16
    assert json.loads((data / "stats.json").read_text())["images"] == 16
