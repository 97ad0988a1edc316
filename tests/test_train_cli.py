"""alexnet-train run for real in subprocesses, as a user runs it."""

import csv
import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli, wandb_records
from helpers.shards import edit_manifest
from helpers.tables import markdown_rows

pytestmark = pytest.mark.slow
SMOKE = ["experiment=smoke", "logger=csv", "+trainer.enable_progress_bar=false"]


def metrics_rows(run_dir: Path) -> list[dict]:
    rows = []
    for f in sorted((run_dir / "logs").glob("version_*/metrics.csv")):
        rows += list(csv.DictReader(f.open()))
    return rows


def train_losses(run_dir):
    return [(int(r["step"]), float(r["train_loss"])) for r in metrics_rows(run_dir) if r.get("train_loss")]


def test_smoke_training_learns_and_writes_its_run_directory(tmp_path, synthetic_root, cli_env):
    proc = run_cli(
        "alexnet-train",
        *SMOKE,
        f"data.root={synthetic_root}",
        "run_id=first",
        "trainer.max_epochs=2",
        cwd=tmp_path,
        env=cli_env,
    )
    run_dir = tmp_path / "runs" / "smoke" / "first"
    assert f"run directory: {run_dir}" in proc.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert results["run_id"] == "first" and results["world_size"] == 1
    assert results["epochs"] == 2 and results["global_step"] == 2 * (2000 // 32)
    assert results["val_count"] == 500 and results["val_top1"] > 0.6 and results["val_top5"] >= results["val_top1"]
    assert results["train_images_per_sec"] > 0 and results["val_loss"] < 2.0
    assert results["train_step_ms"] > 0 and 0 <= results["train_data_wait"] < 1
    losses = train_losses(run_dir)
    first, last = sum(loss for _, loss in losses[:2]) / 2, sum(loss for _, loss in losses[-2:]) / 2
    assert last < 0.6 * first, losses
    assert (run_dir / "checkpoints" / "last.ckpt").exists() and (run_dir / "checkpoints" / "best.ckpt").exists()
    assert "experiment_name: smoke" in (run_dir / "config.yaml").read_text()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    model = ckpt["hyper_parameters"]["model"]
    assert ckpt["global_step"] == 124 and model["_target_"] == "alexnet_dist.models.AlexNetSmall"
    # what the run was asked for: its command line and main settings
    assert results["overrides"] == [*SMOKE, f"data.root={synthetic_root}", "run_id=first", "trainer.max_epochs=2"]
    assert (results["model"], results["model_target"]) == ("alexnet_tiny", model["_target_"])
    assert (results["global_batch"], results["lr"], results["optimizer"]) == (32, 0.02, "sgd")
    assert (results["max_epochs"], results["steps_per_epoch"]) == (2, 2000 // 32)
    curves = ckpt["callbacks"]["Pictures"]["series"]
    assert [step for step, _ in curves["train_loss"]] == list(range(1, 125))  # every step of a short run
    assert [step for step, _ in curves["val_top1"]] == [62, 124]


def test_resume_auto_continues_the_step_count(tmp_path, synthetic_root, cli_env):
    # epochs of 10 steps (what is checked is the count, not the learning), a loss logged every 5
    short = ["trainer.limit_train_batches=10", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=5"]
    args = [*SMOKE, f"data.root={synthetic_root}", "run_id=r", *short]
    run_cli("alexnet-train", *args, "trainer.max_epochs=1", cwd=tmp_path, env=cli_env)
    run_dir = tmp_path / "runs" / "smoke" / "r"
    assert json.loads((run_dir / "results.json").read_text())["global_step"] == 10
    run_cli("alexnet-train", *args, "trainer.max_epochs=2", cwd=tmp_path, env=cli_env)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["global_step"] == 20 and results["epochs"] == 2
    # the second part logged steps after the first part's, into its own file: nothing overwritten
    parts = sorted((run_dir / "logs").glob("version_*/metrics.csv"))
    assert len(parts) == 2
    first_steps = [int(r["step"]) for r in csv.DictReader(parts[0].open()) if r.get("train_loss")]
    second_steps = [int(r["step"]) for r in csv.DictReader(parts[1].open()) if r.get("train_loss")]
    assert first_steps and max(first_steps) < 10 <= min(second_steps)


def test_ddp_with_two_cpu_processes_splits_the_global_batch_with_one_collective_a_step(
    tmp_path, synthetic_root, cli_env
):
    """Also counts the collectives each rank issues per training step besides the gradients':
    the finite-loss check, the preemption flag and the checkpoint clock travel in one all-reduce."""
    counts = tmp_path / "counts"
    counts.mkdir()
    run_cli(
        "python",
        Path(__file__).parent / "helpers" / "count_collectives.py",
        *SMOKE,
        f"data.root={synthetic_root}",
        "run_id=ddp",
        "trainer.max_epochs=2",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "checkpoint.every_n_steps=null",
        "checkpoint.every_n_minutes=1000",
        cwd=tmp_path,
        env={**cli_env, "COUNT_DIR": str(counts)},
    )
    results = json.loads((tmp_path / "runs/smoke/ddp/results.json").read_text())
    assert results["world_size"] == 2
    assert results["global_step"] == 2 * (2000 // 32)  # global batch 32 = 16 per rank
    assert results["val_count"] == 500  # every validation sample counted once over both ranks
    assert results["val_top1"] > 0.6
    ranks = [json.loads(f.read_text()) for f in counts.glob("*.json")]
    assert len(ranks) == 2
    assert [rank["in_steps"] for rank in ranks] == [results["global_step"]] * 2


def test_wandb_runs_offline_and_a_resume_continues_the_same_run_id(tmp_path, synthetic_root, cli_env):
    args = [
        "experiment=smoke",
        "logger=wandb",
        "+trainer.enable_progress_bar=false",
        f"data.root={synthetic_root}",
        "run_id=wb",
        "trainer.limit_train_batches=5",
        "trainer.limit_val_batches=2",
    ]
    run_cli("alexnet-train", *args, "trainer.max_epochs=1", cwd=tmp_path, env=cli_env)
    run_cli("alexnet-train", *args, "trainer.max_epochs=2", cwd=tmp_path, env=cli_env)
    records = sorted((tmp_path / "runs/smoke/wb/wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 2, records
    assert {p.name for p in records} == {"run-smoke-wb.wandb"}


def test_a_sweep_gives_each_job_its_own_wandb_run_and_ends_with_a_table_of_its_jobs(tmp_path, synthetic_root, cli_env):
    args = [*SMOKE, "logger=wandb", f"data.root={synthetic_root}", "run_id=sw", "trainer.max_steps=3"]
    # the third job is refused (not a number): the others still run, and the table says it failed
    proc = run_cli("alexnet-train", "-m", *args, "optim.lr=0.02,0.05,fast", cwd=tmp_path, env=cli_env, check=False)
    for job, lr in ((0, "0.02"), (1, "0.05")):
        files = list((tmp_path / f"runs/smoke/sw/{job}/wandb").glob("offline-run-*/run-*.wandb"))
        assert [f.name for f in files] == [f"run-smoke-sw-{job}.wandb"], files
        records = list(wandb_records(files[0]))
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert run.run_group == "smoke-sw" and f"optim.lr={lr}" in run.tags, run
        assert any(r.WhichOneof("record_type") == "exit" for r in records)  # finished before the next job
    sweep = tmp_path / "runs/smoke/sw"
    rows = markdown_rows(proc.stdout)
    assert rows == markdown_rows((sweep / "sweep.md").read_text()) and (sweep / "sweep.png").stat().st_size > 0
    for job, row in zip((0, 1), rows[1:3], strict=True):
        results = json.loads((sweep / f"{job}/results.json").read_text())
        assert row == [
            " ".join(results["overrides"][-1:]),  # the override the jobs do not share
            "done",
            f"{results['val_top1']:.4f}",
            f"{results['val_loss']:.4f}",
            f"{results['train_images_per_sec']:.1f}",
            f"runs/smoke/sw/{job}",
        ]
    assert rows[3] == ["optim.lr=fast", "failed", "-", "-", "-", "runs/smoke/sw/2"]
    assert proc.returncode == 2 and [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        "error: optim.lr: Value 'fast' of type 'str' could not be converted to Float; fix the override or the "
        "config file",
        "error: 1 of 3 jobs did not finish (2; each one's own output says why); the same command with run_id=sw "
        "runs them again, from what they saved",
    ]


def test_trainer_keys_without_plus_and_a_schedule_as_long_as_the_steps_run(tmp_path, synthetic_root, cli_env):
    run_cli(
        "alexnet-train",
        *SMOKE,
        f"data.root={synthetic_root}",
        "run_id=keys",
        "trainer.max_steps=6",
        "trainer.accumulate_grad_batches=2",
        "trainer.gradient_clip_val=0.5",
        "trainer.val_check_interval=4",
        "trainer.limit_val_batches=2",  # four validations of two batches each
        "trainer.log_every_n_steps=1",
        cwd=tmp_path,
        env=cli_env,
    )
    run_dir = tmp_path / "runs/smoke/keys"
    assert json.loads((run_dir / "results.json").read_text())["global_step"] == 6
    rates = {int(r["step"]): float(r["lr"]) for r in metrics_rows(run_dir) if r.get("lr")}
    # cosine over the 6 optimizer steps really taken, not over trainer.max_epochs (5 epochs)
    base = 0.02 * 64 / 128  # optim.lr at the reference batch 128, scaled to the 2 x 32 images of a step
    for step, rate in rates.items():
        assert rate == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * step / 6)), rel=1e-4), (step, rates)
    assert len(rates) >= 4
    # trainer.val_check_interval=4: validation after batches 4, 8 and 12, then the closing one
    assert sum(1 for r in metrics_rows(run_dir) if r.get("val_top1")) == 4


def test_epoch_milestones_hold_when_only_max_steps_ends_the_run(tmp_path, synthetic_root, cli_env):
    run_cli(
        "alexnet-train",
        *SMOKE,
        f"data.root={synthetic_root}",
        "run_id=steps",
        "trainer.max_epochs=-1",
        "trainer.max_steps=8",
        "trainer.limit_train_batches=5",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "optim.schedule.name=step",
        "optim.schedule.milestones=[1]",
        cwd=tmp_path,
        env=cli_env,
    )
    rates = {int(r["step"]): float(r["lr"]) for r in metrics_rows(tmp_path / "runs/smoke/steps") if r.get("lr")}
    base = 0.02 * 32 / 128
    assert rates == pytest.approx({s: base if s < 5 else base * 0.1 for s in range(8)}), rates  # epoch 1 = step 5


def test_a_label_outside_the_class_range_names_the_shard_and_key(tmp_path, synthetic_root, cli_env):
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    edit_manifest(data, lambda m: m.update(num_classes=5, classes=m["classes"][:5]))  # shards hold labels 0..9
    proc = run_cli("alexnet-train", *SMOKE, f"data.root={data}", cwd=tmp_path, env=cli_env, check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{data}/train/0000" in errors[0] and "is outside 0..4 (the manifest lists 5 classes)" in errors[0]


def test_a_data_error_on_one_ddp_rank_stops_both_ranks_in_one_line_each(tmp_path, synthetic_root, cli_env):
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    tar = data / "train" / "000003.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # only the rank that reads it fails
    start = time.time()
    # Each rank reads its own samples (four whole shards of eight), so one rank meets the damage and
    # the other must be told.
    proc = run_cli(
        "alexnet-train",
        *SMOKE,
        "loader=wds",
        f"data.root={data}",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        cwd=tmp_path,
        env=cli_env,
        check=False,
    )
    assert proc.returncode == 2 and time.time() - start < 120 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, proc.stderr[-3000:]
    data_error = [e for e in errors if f"{tar}: " in e and "alexnet-prepare" in e]  # names the fix
    peer_error = [e for e in errors if "another rank of this run failed or stopped answering" in e]
    assert len(data_error) == 1 and len(peer_error) == 1, errors


def corrupt_one_image(tar: Path) -> str:
    """Rewrites `tar` with its third image replaced by bytes no decoder accepts, and its DALI
    index to match; returns that sample's key."""
    import io
    import subprocess
    import sys
    import tarfile

    with tarfile.open(tar) as f:
        members = [(m, f.extractfile(m).read()) for m in f.getmembers()]
    bad = [m.name for m, _ in members if m.name.endswith(".jpg")][2]
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as f:
        for member, data in members:
            data = b"\xff\xd8\xff\xe0 not a picture" * 8 if member.name == bad else data
            member.size = len(data)
            f.addfile(member, io.BytesIO(data))
    subprocess.run(
        [str(Path(sys.executable).parent / "wds2idx"), str(tar), str(tar.with_suffix(".idx"))],
        check=True,
        capture_output=True,
    )
    return bad


def test_a_corrupt_training_image_is_skipped_counted_and_named_or_stops_a_strict_run(tmp_path, synthetic_root, cli_env):
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    tar = data / "train" / "000002.tar"
    bad = corrupt_one_image(tar)
    args = [*SMOKE, f"data.root={data}", "trainer.max_epochs=2", f"paths.runs={tmp_path / 'runs'}"]
    proc = run_cli("alexnet-train", *args, "run_id=skip", cwd=tmp_path, env=cli_env)
    results = json.loads((tmp_path / "runs/smoke/skip/results.json").read_text())
    assert results["skipped_images"] == 1 and results["val_top1"] > 0.5
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: skipped")]
    key = bad.split(".")[0]  # either loader names the sample by its tar and key
    assert len(warnings) == 1 and f"{tar}:{key} (cannot decode: " in warnings[0], proc.stderr[-2000:]
    assert any(
        float(r["skipped_images"]) == 1 for r in metrics_rows(tmp_path / "runs/smoke/skip") if r.get("skipped_images")
    )

    proc = run_cli(
        "alexnet-train", *args, "run_id=strict", "loader.bad_images=error", cwd=tmp_path, env=cli_env, check=False
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{tar}:{key}: cannot decode image" in errors[0], errors


def test_speed_options_train_as_well_bf16_channels_last_fused(tmp_path, synthetic_root, cli_env):
    # torch.compile is checked on the model (tests/test_models.py): compiling costs a minute here;
    # compute.fuse_norms goes through alexnet-train in tests/test_gpu_check.py (part c).
    run_cli(
        "alexnet-train",
        *SMOKE,
        f"data.root={synthetic_root}",
        "run_id=fast",
        "trainer.precision=bf16-mixed",
        "compute.channels_last=true",
        "loader.layout=NHWC",
        "optim.impl=fused",
        "trainer.max_epochs=1",  # the smoke run's bar (val top-1 > 0.6) in half its epochs
        cwd=tmp_path,
        env=cli_env,
    )
    results = json.loads((tmp_path / "runs/smoke/fast/results.json").read_text())
    assert results["val_top1"] > 0.6
    ckpt = torch.load(tmp_path / "runs/smoke/fast/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["fuse_norms"] is False  # the default
    # the plain model's names
    assert all(not k.startswith("net.") and "_orig_mod" not in k for k in ckpt["state_dict"])


def test_ddp_with_bf16_gradient_compression_and_small_buckets(tmp_path, synthetic_root, cli_env):
    run_cli(
        "alexnet-train",
        *SMOKE,
        f"data.root={synthetic_root}",
        "run_id=hook",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "ddp.comm_hook=bf16",
        "ddp.bucket_cap_mb=1",
        "trainer.max_epochs=2",  # as far as the uncompressed DDP run above trains
        cwd=tmp_path,
        env=cli_env,
    )
    results = json.loads((tmp_path / "runs/smoke/hook/results.json").read_text())
    assert results["world_size"] == 2 and results["val_top1"] > 0.6
