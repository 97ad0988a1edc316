"""Launching for real: sbatch on a real SLURM cluster with two emulated nodes (launch/local-slurm),
preemption and requeue, and torchrun with two "nodes" on this machine."""

import csv
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, wandb_records
from helpers.tables import markdown_rows

# a job waits for the cluster, may be requeued and start again: minutes, each bounded inside the test
pytestmark = pytest.mark.timeout(480)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["experiment=smoke", "+trainer.enable_progress_bar=false"]


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local cluster of launch/local-slurm, started here if it is not up (needs root)."""
    if shutil.which("sinfo") and subprocess.run(["sinfo"], capture_output=True).returncode == 0:
        return
    if os.geteuid() != 0:
        pytest.fail(
            "the SLURM tests need the local cluster: run `sudo bash launch/local-slurm/start.sh` "
            "first, or leave them out with -m 'not slurm'"
        )
    subprocess.run(["bash", str(ROOT / "launch/local-slurm/start.sh")], check=True, timeout=300)


@pytest.fixture
def job_env(cli_env):
    return dict(cli_env)


def sbatch(args, cwd, env) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def job_state(job: str) -> dict:
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(JobState|Restarts|ExitCode)=(\S+)", text))


def wait_for(job: str, timeout=300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_state(job)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not finish in {timeout} s: {job_state(job)}")


@pytest.mark.slurm
def test_sbatch_trains_with_one_rank_on_each_of_two_nodes(tmp_path, synthetic_root, job_env, slurm_cluster):
    job = sbatch(
        [
            "--nodes=2",
            "--ntasks-per-node=1",
            str(ROOT / "launch/slurm/train.sbatch"),
            *SMOKE,
            "logger=csv",
            f"data.root={synthetic_root}",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=10",  # an epoch of 10 steps
            "trainer.limit_val_batches=2",
        ],
        tmp_path,
        job_env,
    )
    state = wait_for(job)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED", log[-3000:]
    results = json.loads((tmp_path / "runs/smoke" / job / "results.json").read_text())  # run dir named by job id
    assert results["world_size"] == 2 and results["run_id"] == job and results["global_step"] == 10
    assert f"job {job} (restart 0): 2 nodes x 1 tasks" in log


@pytest.mark.slurm
def test_preempted_job_checkpoints_requeues_and_resumes_into_the_same_wandb_run(
    tmp_path, synthetic_root, job_env, slurm_cluster
):
    job = sbatch(
        [
            "--nodes=2",
            "--ntasks-per-node=1",
            str(ROOT / "launch/slurm/train.sbatch"),
            *SMOKE,
            "logger=wandb",
            f"data.root={synthetic_root}",
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=20",  # 40 steps: the warning comes at step 5 or so
        ],
        tmp_path,
        job_env,
    )
    ckpt_dir = tmp_path / "runs/smoke" / job / "checkpoints"
    deadline = time.time() + 180
    while not list(ckpt_dir.glob("step-*.ckpt")):
        assert time.time() < deadline and job_state(job).get("JobState") in ("PENDING", "RUNNING"), job_state(job)
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    state = wait_for(job)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log[-3000:]
    saved = int(re.search(r"preempted: checkpoint saved at step (\d+)", log).group(1))
    assert f"requeued job {job}" in log and f"job {job} (restart 1)" in log
    assert "Traceback" not in log
    run_dir = tmp_path / "runs/smoke" / job
    results = json.loads((run_dir / "results.json").read_text())
    assert results["global_step"] == 2 * 20 and results["world_size"] == 2
    # the second part started from the checkpoint, not from step 0
    second = (run_dir / "logs/version_1/metrics.csv").read_text().splitlines()
    header = second[0].split(",")
    steps = [int(row.split(",")[header.index("step")]) for row in second[1:]]
    assert 0 < saved < 2 * 20 and min(steps) >= saved
    # both parts logged to one W&B run
    records = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [p.name for p in records] == [f"run-smoke-{job}.wandb"] * 2


@pytest.mark.slurm
def test_a_launch_that_disagrees_with_the_config_stops_every_rank_at_once(
    tmp_path, synthetic_root, job_env, slurm_cluster
):
    start = time.time()
    proc = subprocess.run(
        [
            "srun",
            "--job-name=alexnet",
            "--nodes=2",
            "--ntasks-per-node=1",
            str(BIN / "alexnet-train"),
            *SMOKE,
            "logger=csv",
            f"data.root={synthetic_root}",
            "trainer.strategy=ddp",
        ],
        cwd=tmp_path,
        env=job_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and time.time() - start < 60
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all(
        "trainer.devices=1 x trainer.num_nodes=1 does not match the SLURM job (2 nodes x 1 tasks per node)" in e
        for e in errors
    ), proc.stderr[-2000:]


@pytest.mark.slow
def test_torchrun_with_two_nodes_on_localhost(tmp_path, synthetic_root, cli_env):
    env = dict(cli_env, NNODES="2", RUN_ID="tr", MASTER_ADDR="127.0.0.1", MASTER_PORT="29631")
    cmd = [
        "bash",
        str(ROOT / "launch/torchrun.sh"),
        *SMOKE,
        "logger=csv",
        f"data.root={synthetic_root}",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=10",  # an epoch of 10 steps; all 500 validation images
    ]
    nodes = [
        subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=dict(env, NODE_RANK=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    results = json.loads((tmp_path / "runs/smoke/tr/results.json").read_text())
    assert results["world_size"] == 2 and results["global_step"] == 10 and results["val_count"] == 500


@pytest.mark.slurm
def test_hydra_submitit_launcher_runs_a_sweep_of_ddp_jobs_each_its_own_wandb_run(
    tmp_path, synthetic_root, job_env, slurm_cluster
):
    cmd = [
        str(BIN / "alexnet-train"),
        "-m",
        "hydra/launcher=slurm",
        *SMOKE,
        "logger=wandb",
        f"data.root={synthetic_root}",
    ]
    cmd += ["trainer.max_epochs=1", "trainer.strategy=ddp", "trainer.devices=1", "trainer.num_nodes=2"]
    cmd += ["trainer.limit_train_batches=10", "trainer.limit_val_batches=2"]  # epochs of 10 steps
    proc = subprocess.run(
        [*cmd, "optim.lr=0.02,0.05"], cwd=tmp_path, env=job_env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # no run_id given: the sweep's jobs and submitit's own files share the folder the command chose
    [sweep] = list((tmp_path / "runs/smoke").iterdir())
    assert sorted(p.name for p in sweep.iterdir()) == [".submitit", "0", "1", "multirun.yaml", "sweep.md", "sweep.png"]
    rows = markdown_rows(proc.stdout)  # the table the sweep ends with, a row per job
    for job_num, lr in ((0, 0.02), (1, 0.05)):  # a sweep of two jobs, each with two ranks on two nodes
        run_dir = sweep / str(job_num)
        results = json.loads((run_dir / "results.json").read_text())
        assert rows[1 + job_num] == [
            f"optim.lr={lr}",
            "done",
            f"{results['val_top1']:.4f}",
            f"{results['val_loss']:.4f}",
            f"{results['train_images_per_sec']:.1f}",
            f"runs/smoke/{sweep.name}/{job_num}",
        ]
        assert results["world_size"] == 2 and results["global_step"] == 10
        assert results["run_id"] == f"{sweep.name}-{job_num}"
        assert f"lr: {lr}" in (run_dir / "config.yaml").read_text()
        [record] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
        run = next(r.run for r in wandb_records(record) if r.WhichOneof("record_type") == "run")
        assert run.run_id == f"smoke-{sweep.name}-{job_num}" and run.run_group == f"smoke-{sweep.name}"


def submitit_job(tmp_path: Path, sweep: str) -> tuple[str, str]:
    """(job id, signal) of the job a submitit sweep has submitted: its id as squeue shows it, and
    the signal its batch script asks SLURM for (#SBATCH --signal=SIG@SECONDS)."""
    scripts = list((tmp_path / "runs/smoke" / sweep / ".submitit").glob("*/*_submission.sh"))
    assert len(scripts) == 1, scripts
    asked = re.search(r"^#SBATCH --signal=(\w+)@\d+$", scripts[0].read_text(), re.MULTILINE).group(1)
    return scripts[0].name.removesuffix("_submission.sh"), asked


@pytest.mark.slurm
@pytest.mark.parametrize("signal_override", [None, "preemption.signal=TERM"], ids=["submitits-signal", "TERM"])
def test_a_submitit_job_preempted_resumes_in_the_same_run_and_finishes(
    tmp_path, synthetic_root, job_env, slurm_cluster, signal_override
):
    # W&B's own service process also takes SLURM's TERM and stops: that case logs to CSV only
    extra = [signal_override, "logger=csv"] if signal_override else ["logger=wandb"]
    cmd = [str(BIN / "alexnet-train"), "-m", "hydra/launcher=slurm", *SMOKE, "run_id=pre", "trainer.max_epochs=2"]
    cmd += ["trainer.limit_train_batches=20"]  # 40 steps
    cmd += [f"data.root={synthetic_root}", "trainer.strategy=ddp", "trainer.devices=1", "trainer.num_nodes=2", *extra]
    sweep = subprocess.Popen(cmd, cwd=tmp_path, env=job_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs/smoke/pre/0"
    deadline = time.time() + 240
    while not list((run_dir / "checkpoints").glob("step-*.ckpt")):
        assert time.time() < deadline and sweep.poll() is None, sweep.communicate()
        time.sleep(0.5)
    job, asked = submitit_job(tmp_path, "pre")
    signal = "TERM" if signal_override else asked
    assert asked == "USR2"  # submitit's choice, which the training takes over
    subprocess.run(["scancel", f"--signal={signal}", job], check=True)
    out, err = sweep.communicate(timeout=400)
    assert sweep.returncode == 0, err[-3000:]
    state = wait_for(job, timeout=60)  # the results are in; the job itself may still be completing
    log = "".join(p.read_text() for p in sorted(run_dir.parent.glob(".submitit/*/*_0_log.*")))
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log[-3000:]
    saved = int(re.search(r"preempted: checkpoint saved at step (\d+)", log).group(1))
    assert "requeued job" in log and "Traceback" not in log
    # submitit's own handlers never acted on the warning (SLURM's SIGCONT at the requeue is logged only)
    assert "Caught signal" not in log and f"Bypassing signal SIG{signal}" not in log
    results = json.loads((run_dir / "results.json").read_text())
    assert results["global_step"] == 2 * 20 and results["world_size"] == 2 and results["run_id"] == "pre-0"
    second = list(csv.DictReader((run_dir / "logs/version_1/metrics.csv").open()))
    assert 0 < saved < 2 * 20 and min(int(row["step"]) for row in second) >= saved
    if not signal_override:
        records = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        assert [p.name for p in records] == ["run-smoke-pre-0.wandb"] * 2  # both parts in one W&B run
