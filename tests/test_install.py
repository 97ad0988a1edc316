"""The package as a user installs it: not editable, into a new environment, used from another
directory; first without DALI (the default loader falls back, saying so), then with it."""

import json
import subprocess
import venv
from pathlib import Path

import pytest
import torch
from helpers.tables import markdown_rows

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.install, pytest.mark.timeout(900)]  # two pip installs


def pip(env_dir: Path, *args: str) -> None:
    # -c constraints.txt: the tested versions; torch: the build the suite already runs on
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    cmd = [
        str(env_dir / "bin/pip"),
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "-c",
        str(ROOT / "constraints.txt"),
    ]
    proc = subprocess.run([*cmd, torch_pin, *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def run(env_dir: Path, name: str, *args: str, cwd: Path, env: dict, code: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(env_dir / "bin" / name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == code, f"{name} {args}: {proc.stderr[-3000:]}"
    return proc


def test_a_plain_install_runs_from_anywhere_with_and_without_dali(tmp_path, cli_env):
    env_dir, work = tmp_path / "env", tmp_path / "elsewhere"
    work.mkdir()
    venv.create(env_dir, with_pip=True)
    pip(env_dir, str(ROOT))  # a wheel built from the checkout, not an editable link to it
    env = {k: v for k, v in cli_env.items() if k not in ("ALEXNET_VENV", "VIRTUAL_ENV", "PYTHONPATH")}
    located = run(env_dir, "python", "-c", "import alexnet_dist; print(alexnet_dist.__file__)", cwd=work, env=env)
    assert str(env_dir) in located.stdout and str(ROOT) not in located.stdout

    run(env_dir, "alexnet-prepare", "synthetic", "--out", "shards", cwd=work, env=env)
    args = [
        "experiment=smoke",
        "data.root=shards",
        "trainer.max_steps=4",
        "logger=csv",
        "+trainer.enable_progress_bar=false",
    ]
    plain = run(env_dir, "alexnet-train", *args, "run_id=plain", cwd=work, env=env)
    notices = [line for line in plain.stderr.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1 and "loader=auto uses the webdataset loader" in notices[0], plain.stderr[-2000:]
    assert json.loads((work / "runs/smoke/plain/results.json").read_text())["loader"] == "wds"
    refused = run(env_dir, "alexnet-train", *args, "loader=dali", cwd=work, env=env, code=2)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: loader=dali but NVIDIA DALI does not import here")
    assert "Traceback" not in refused.stderr

    pip(env_dir, f"{ROOT}[dali]")
    with_dali = run(env_dir, "alexnet-train", *args, "run_id=dali", cwd=work, env=env)
    assert "notice:" not in with_dali.stderr
    assert json.loads((work / "runs/smoke/dali/results.json").read_text())["loader"] == "dali"
    for run_id in ("plain", "dali"):
        scored = run(env_dir, "alexnet-eval", f"ckpt_path=runs/smoke/{run_id}/checkpoints/last.ckpt", cwd=work, env=env)
        result = json.loads(scored.stdout.splitlines()[0])
        assert result["val_count"] == 500 and 0 <= result["val_top1"] <= 1
    table = markdown_rows(run(env_dir, "alexnet-runs", "runs", cwd=work, env=env).stdout)
    assert [(row[0], row[1], row[-1]) for row in table[1:]] == [
        ("run_id=dali", "done", "runs/smoke/dali"),
        ("run_id=plain", "done", "runs/smoke/plain"),
    ]
