"""Kill training with SIGKILL at random moments, resume it each time, and check that the final
weights equal those of an uninterrupted run with the same seed.

    .venv/bin/python tests/chaos/chaos.py --data DIR --trials 5 [--kills 3] [override ...]

DIR holds shards (e.g. `alexnet-prepare synthetic --out DIR`). Runs go to --workdir (a fresh
temporary folder by default). Prints one JSON line per trial and a summary line.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BIN = Path(sys.executable).parent
BASE = ["experiment=smoke", "logger=csv", "+trainer.enable_progress_bar=false", "model.dropout=0.5"]


def train(args, cwd, run_id, kill_after=None) -> tuple[bool, float]:
    """Runs (or resumes) run_id; kills it after kill_after seconds. Returns (finished, seconds)."""
    start = time.time()
    proc = subprocess.Popen(
        [str(BIN / "alexnet-train"), *args, f"run_id={run_id}"],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the process group: loader workers die too, as in a job kill
        proc.wait()
        return False, time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"{run_id} failed (exit {proc.returncode}):\n{proc.stderr.read()[-3000:]}")
    return True, time.time() - start


def final_state(cwd, run_id) -> dict:
    return torch.load(Path(cwd) / "runs/smoke" / run_id / "checkpoints/last.ckpt", weights_only=True)


def kind_of(step: int | None, per_epoch: int = 62) -> str:
    if step is None:
        return "before the first checkpoint"
    return "epoch end" if step % per_epoch == 0 else "mid-epoch"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--kills", type=int, default=3, help="SIGKILLs per trial before it may finish")
    p.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    p.add_argument("--workdir", default=None)
    p.add_argument("overrides", nargs="*")
    opts = p.parse_args()
    cwd = opts.workdir or tempfile.mkdtemp(prefix="chaos-")
    args = [*BASE, f"data.root={Path(opts.data).resolve()}", *opts.overrides]
    rng = random.Random(opts.seed)
    _, duration = train(args, cwd, "reference")
    reference = final_state(cwd, "reference")
    equal_trials = 0
    for trial in range(opts.trials):
        run_id, kills = f"trial{trial}", []
        for _ in range(opts.kills):
            moment = rng.uniform(2.0, 0.9 * duration)  # from start-up to near the end of a whole run
            finished, _ = train(args, cwd, run_id, kill_after=moment)
            if finished:
                break
            ckpt = Path(cwd) / "runs/smoke" / run_id / "checkpoints/last.ckpt"
            step = torch.load(ckpt, weights_only=True)["global_step"] if ckpt.exists() else None
            kills.append({"after_s": round(moment, 2), "last_ckpt_step": step, "resumed_from": kind_of(step)})
        else:
            train(args, cwd, run_id)
        state = final_state(cwd, run_id)
        equal = state["global_step"] == reference["global_step"] and all(
            torch.equal(state["state_dict"][k], v) for k, v in reference["state_dict"].items()
        )
        equal_trials += equal
        print(
            json.dumps({"trial": trial, "kills": kills, "global_step": state["global_step"], "bit_identical": equal}),
            flush=True,
        )
    print(
        json.dumps(
            {
                "trials": opts.trials,
                "bit_identical": equal_trials,
                "reference_seconds": round(duration, 1),
                "workdir": cwd,
            }
        )
    )
    sys.exit(0 if equal_trials == opts.trials else 1)


if __name__ == "__main__":
    main()
