"""The package as a user installs it: not editable, into a new environment, used from another
directory; first without DALI (the default loader falls back, saying so), then with it."""

import importlib.metadata
import json
import os
import signal
import subprocess
import tarfile
import time
import venv
from pathlib import Path

import pytest
import torch
from helpers.tables import markdown_rows
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.install, pytest.mark.timeout(900)]  # two pip installs


def runtime_closure() -> tuple[list, list]:
    """(needed, others): the distributions of this environment that alexnet_dist's own requirements
    (no extras) name, and theirs in turn; and all the other distributions here."""
    installed = {}
    for dist in importlib.metadata.distributions():
        installed.setdefault(canonicalize_name(dist.metadata["Name"]), dist)
    wanted: dict[str, set[str]] = {}
    todo = [Requirement(line) for line in importlib.metadata.requires("alexnet_dist")]
    todo = [req for req in todo if not req.marker or req.marker.evaluate({"extra": ""})]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in wanted and set(req.extras) <= wanted[name]:
            continue
        extras = wanted.setdefault(name, set())
        extras |= set(req.extras)
        for line in installed[name].requires or []:
            sub = Requirement(line)
            if not sub.marker or any(sub.marker.evaluate({"extra": extra}) for extra in ("", *extras)):
                todo.append(sub)
    return [installed[n] for n in wanted], [d for n, d in installed.items() if n not in wanted]


def dependency_site(folder: Path) -> Path:
    """A site folder of links to what this environment installed for alexnet_dist's declared
    dependencies, and nothing else: no DALI, no test tools, no alexnet_dist (each path links as high
    up as no other distribution's file lies under it). A new environment that sees it gets the
    dependencies without pip copying gigabytes of wheels again, and still fails where a module the
    package imports is not among its declared dependencies."""
    needed, others = runtime_closure()
    foreign = set()
    for dist in others:
        for file in dist.files or []:
            foreign.update(file.parts[:i] for i in range(1, len(file.parts) + 1))
    folder.mkdir()
    for dist in needed:
        assert dist.files is not None, f"{dist.metadata['Name']} lists no files (RECORD)"
        for file in dist.files:
            if file.parts[0] == "..":  # a script in bin/: the new environment has its own
                continue
            top = next(file.parts[:i] for i in range(1, len(file.parts) + 1) if file.parts[:i] not in foreign)
            link = folder.joinpath(*top)
            if not link.exists() and not link.is_symlink():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(Path(dist.locate_file(Path(*top))).resolve())
    return folder


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
    # the dependencies as this environment has them; alexnet_dist itself (and DALI below) by pip
    [site_packages] = env_dir.glob("lib/python*/site-packages")
    deps = dependency_site(tmp_path / "deps")
    (site_packages / "alexnet-deps.pth").write_text(f"import site; site.addsitedir({str(deps)!r})\n")
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

    user_model(env_dir, work, env)

    pip(env_dir, f"{ROOT}[dali]")
    with_dali = run(env_dir, "alexnet-train", *args, "run_id=dali", cwd=work, env=env)
    assert "notice:" not in with_dali.stderr
    assert json.loads((work / "runs/smoke/dali/results.json").read_text())["loader"] == "dali"
    for run_id in ("plain", "dali"):
        scored = run(env_dir, "alexnet-eval", f"ckpt_path=runs/smoke/{run_id}/checkpoints/last.ckpt", cwd=work, env=env)
        result = json.loads(scored.stdout.splitlines()[0])
        assert result["val_count"] == 500 and 0 <= result["val_top1"] <= 1
    table = markdown_rows(run(env_dir, "alexnet-runs", "runs", cwd=work, env=env).stdout)
    assert {row[-1]: row[1] for row in table[1:]} == {
        f"runs/smoke/{r}": "done" for r in ("cut", "dali", "plain", "whole")
    }


USER_MODEL = '''
"""A network of the user's own, outside alexnet_dist: a tiny residual net with batch norm."""
import torch
from torch import nn


def conv_bn(channels_in, channels_out):
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False), nn.BatchNorm2d(channels_out))


class TinyResNet(nn.Module):
    def __init__(self, num_classes, width=16):
        super().__init__()
        self.stem = conv_bn(3, width)
        self.block = nn.Sequential(conv_bn(width, width), nn.ReLU(), conv_bn(width, width))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.head(torch.relu(x + self.block(x)).mean(dim=(2, 3)))
'''


def step_files(ckpt_dir: Path) -> list[int]:
    return [int(p.name[5:14]) for p in ckpt_dir.glob("step-*.ckpt")] if ckpt_dir.exists() else []


def user_model(env_dir: Path, work: Path, env: dict) -> None:
    """A user's model class in their own file and config folder (--config-dir), with batch norm:
    two DDP ranks with ddp.sync_batchnorm=true, killed with SIGKILL and resumed to the very weights
    of an uninterrupted run, then evaluated, exported and used to predict, with no wrapper."""
    (work / "usercode").mkdir()
    (work / "usercode/mymodels.py").write_text(USER_MODEL)
    (work / "myconf/model").mkdir(parents=True)
    (work / "myconf/model/tiny.yaml").write_text("_target_: mymodels.TinyResNet\nwidth: 8\n")
    env = dict(env, PYTHONPATH=str(work / "usercode"))
    train = [
        "--config-dir=myconf",
        "experiment=smoke",
        "model=tiny",
        "data.root=shards",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "ddp.sync_batchnorm=true",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=20",  # epochs of 20 steps
        "logger=csv",
        "+trainer.enable_progress_bar=false",
    ]
    run(env_dir, "alexnet-train", *train, "run_id=whole", cwd=work, env=env)
    ckpt_dir = work / "runs/smoke/cut/checkpoints"
    proc = subprocess.Popen(
        [str(env_dir / "bin/alexnet-train"), *train, "run_id=cut"],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while max(step_files(ckpt_dir), default=0) < 25:  # in the second epoch
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # both ranks and their loader workers
    proc.wait()
    resumed = run(env_dir, "alexnet-train", *train, "run_id=cut", cwd=work, env=env)
    assert f"resuming from {ckpt_dir}/last.ckpt" in resumed.stdout
    whole, cut = (
        torch.load(work / f"runs/smoke/{r}/checkpoints/last.ckpt", weights_only=True) for r in ("whole", "cut")
    )
    assert whole["global_step"] == cut["global_step"] == 40
    assert any("running_var" in name for name in whole["state_dict"])
    for name, tensor in whole["state_dict"].items():
        assert torch.equal(cut["state_dict"][name], tensor), name
    assert whole["hyper_parameters"]["model"] == {"_target_": "mymodels.TinyResNet", "width": 8, "num_classes": 10}

    ckpt = "runs/smoke/cut/checkpoints/last.ckpt"
    scored = json.loads(run(env_dir, "alexnet-eval", f"ckpt_path={ckpt}", cwd=work, env=env).stdout.splitlines()[0])
    results = json.loads((work / "runs/smoke/cut/results.json").read_text())
    assert scored["val_top1"] == pytest.approx(results["val_top1"]) and scored["val_count"] == 500
    exported = json.loads(run(env_dir, "alexnet-export", f"ckpt_path={ckpt}", "out=tiny", cwd=work, env=env).stdout)
    assert exported["written"] == ["model.onnx", "model.pt2", "preprocess.json", "weights.pt"]
    with tarfile.open(work / "shards/val/000000.tar") as tar:
        tar.extractall(work / "photos", members=[m for m in tar.getmembers() if m.name.endswith(".jpg")][:5])
    plain_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # the export needs no user code
    by_export = run(env_dir, "alexnet-predict", "model=tiny", "images=photos", cwd=work, env=plain_env).stdout
    by_ckpt = run(env_dir, "alexnet-predict", f"model={ckpt}", "images=photos", cwd=work, env=env).stdout
    lines = [json.loads(line) for line in by_export.splitlines()]
    assert len(lines) == 5 and [p["top"][0]["class"] for p in lines] == [
        json.loads(line)["top"][0]["class"] for line in by_ckpt.splitlines()
    ]
    lost = run(env_dir, "alexnet-eval", f"ckpt_path={ckpt}", cwd=work, env=plain_env, code=2)
    assert lost.stderr.strip() == (
        "error: model._target_=mymodels.TinyResNet: no module mymodels to import; put its folder on PYTHONPATH "
        "or install its package"
    )
