"""alexnet-bench's modes on a fresh clone: each prints sane JSON (not a speed test)."""

import json

import pytest
from conftest import run_cli

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
def test_each_mode_prints_one_measurement(tmp_path, synthetic_root, cli_env, mode, extra):
    data = [] if mode == "model" else ["--data", str(synthetic_root)]
    (result,) = lines(run_cli("alexnet-bench", mode, *COMMON, *data, *extra, cwd=tmp_path, env=cli_env))
    assert result["name"].startswith(mode) and result["images_per_sec"] > 10
    if mode in ("train", "baseline"):
        assert 0 <= result["data_wait"] < 1 and result["step_ms"] > 0 and result["batch_size"] == 32


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


def test_a_missing_data_folder_is_one_line(tmp_path, cli_env):
    proc = run_cli("alexnet-bench", "train", *COMMON, cwd=tmp_path, env=cli_env, check=False)
    assert (
        proc.returncode == 2
        and proc.stderr.strip() == "error: train mode needs --data DIR (a folder made by alexnet-prepare)"
    )
