"""alexnet-bench's modes on a fresh clone: each prints sane JSON (not a speed test). The modes that
compile or start processes of their own run as the command; the others run its main in this
process (conftest.run_here), without a new Python importing torch for each."""

import json
import os

import pytest
from conftest import run_cli, run_here

from alexnet_dist.bench import cli as bench

pytestmark = pytest.mark.slow
COMMON = [
    "--model",
    "alexnet_small",
    "--size",
    "28",
    "--batch-size",
    "32",
    "--steps",
    "6",
    "--warmup",
    "2",
    "--device",
    "cpu",
]


def lines(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize(
    "mode,extra",
    [
        ("model", ["--num-classes", "10"]),
        ("loader", ["--loader", "dali"]),
        ("loader", ["--loader", "wds"]),
        ("train", ["--loader", "wds"]),
        ("train", ["--loader", "dali"]),
        ("baseline", []),
    ],
)
def test_each_mode_prints_one_measurement(synthetic_root, capsys, monkeypatch, mode, extra):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:  # as cli_env: not a SLURM job's step
        monkeypatch.delenv(key)
    data = [] if mode == "model" else ["--data", str(synthetic_root)]
    (result,) = lines(run_here(bench.main, mode, *COMMON, *data, *extra, capsys=capsys))
    assert result["name"].startswith(mode) and result["images_per_sec"] > 10
    if mode in ("train", "baseline"):
        assert 0 <= result["data_wait"] < 1 and result["step_ms"] > 0 and result["batch_size"] == 32


@pytest.mark.parametrize("flags", [["--fuse-norms"], ["--compile", "--fuse-norms"]])
def test_model_mode_compiles_before_timing_and_says_so(tmp_path, cli_env, flags):
    # scalar C++ kernels: the same fused arithmetic, generated in half the time on 2 cores
    env = {**cli_env, "TORCHINDUCTOR_VEC_ISA_OK": "0"}
    (result,) = lines(run_cli("alexnet-bench", "model", *COMMON, "--num-classes", "10", *flags, cwd=tmp_path, env=env))
    assert result["compile"] == ("--compile" in flags) and result["fuse_norms"] is True
    assert result["images_per_sec"] > 10 and result["tflops"] > 0  # flops counted on the plain model


def test_ddp_mode_compares_one_and_two_processes(tmp_path, synthetic_root, cli_env):
    one, two, scaling = lines(
        run_cli(
            "alexnet-bench",
            "ddp",
            *COMMON,
            "--data",
            str(synthetic_root),
            "--loader",
            "wds",
            "--workers",
            "1",
            cwd=tmp_path,
            env=cli_env,
            timeout=600,
        )
    )
    assert one["processes"] == 1 and two["processes"] == 2 and scaling["name"] == "ddp/scaling"
    assert scaling["efficiency"] == pytest.approx(two["images_per_sec"] / (2 * one["images_per_sec"]), abs=1e-3)


def test_a_missing_data_folder_is_one_line(capsys):
    proc = run_here(bench.main, "train", *COMMON, capsys=capsys, check=False)
    assert (
        proc.returncode == 2
        and proc.stderr.strip() == "error: train mode needs --data DIR (a folder made by alexnet-prepare)"
    )


def test_scale_mode_shows_what_a_rank_reads_fall_as_the_world_grows(tmp_path, cli_env):
    """Two world sizes, both loaders, on a small data set of tiny images made by the mode itself:
    a rank of the larger world opens fewer of the shared files and reads less, holds no more
    memory, and its checkpoint state stays small."""
    args = ["--samples", "4000", "--val-samples", "400", "--shards", "32", "--num-classes", "10"]
    args += ["--worlds", "2,16", "--batch-size", "8", "--repeats", "1", "--data", str(tmp_path / "tiny")]
    *rows, step = lines(  # the 2012 network with 10 classes: 990 fewer outputs of fc8 (4096 weights + 1 bias)
        run_cli("alexnet-bench", "scale", *args, cwd=tmp_path, env=cli_env, timeout=600)
    )
    assert sorted((r["loader"], r["world_size"]) for r in rows) == [("dali", 2), ("dali", 16), ("wds", 2), ("wds", 16)]
    assert step["parameters"] == 60_965_224 - 990 * 4097 and step["allreduce_bytes"] == 2 * step["allreduce_bytes_bf16"]
    manifest = json.loads((tmp_path / "tiny" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 4000 and len(manifest["splits"]["train"]["shards"]) == 32
    for loader in ("wds", "dali"):
        small, large = (r for r in rows if r["loader"] == loader)
        assert small["batch"] == large["batch"] == 8
        # rank world/2's stretch of the epoch (32 shards of 125 samples): of 2 ranks with a global batch
        # of 16 (250 steps), samples 2000..3999, 16 shards; of 16 ranks with 128 (31 steps, 3968
        # samples trained), samples 1984..2231, which cross 3 shards
        assert small["epoch_files"] == 16 and large["epoch_files"] == 3
        assert large["files_opened"] <= small["files_opened"] and large["bytes_read"] <= small["bytes_read"]
        assert large["rss_mb"] <= 1.2 * small["rss_mb"]
        assert large["state_bytes_per_rank"] < 16 * 1024
    dali_small, dali_large = rows[2:4]
    # DALI opens only the tars and index files its first batch needs (before: every tar and every index)
    assert dali_small["tars_opened"] <= 16 and dali_large["tars_opened"] == 3
    assert dali_large["files_opened"] * 3 <= dali_small["files_opened"]
    assert dali_large["metadata_bytes"] * 3 <= dali_small["metadata_bytes"]
