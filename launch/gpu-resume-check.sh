#!/usr/bin/env bash
# Kill-and-resume on a GPU (docs/reliability.md): an uninterrupted smoke run and one killed with
# SIGKILL mid-epoch then resumed; prints how far apart their final weights are. Run from the
# repository root on a GPU machine; .whl/ as in launch/gpu-check.sh when hydra etc. are missing.
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
work=/tmp/resume-check
python3 -m alexnet_dist.cli.prepare synthetic --out $work/data --workers 8 >/dev/null 2>&1
args="experiment=smoke data.root=$work/data logger=csv +trainer.enable_progress_bar=false model.dropout=0.5 trainer.max_epochs=3 paths.runs=$work/runs"
python3 -m alexnet_dist.cli.train $args run_id=ref 2>&1 | grep "val top"
python3 -m alexnet_dist.cli.train $args run_id=killed >/dev/null 2>&1 &
pid=$!
until ls $work/runs/smoke/killed/checkpoints/step-0000000[7-9]?.ckpt >/dev/null 2>&1; do sleep 0.05; done
sleep 0.3
kill -9 $pid || true
wait $pid || true
python3 -m alexnet_dist.cli.train $args run_id=killed 2>&1 | grep "resuming\|val top"
python3 - $work/runs/smoke <<'PY' | tee "$OUT/resume_check.json"
import json, sys, torch
a = torch.load(f"{sys.argv[1]}/ref/checkpoints/last.ckpt", weights_only=True)
b = torch.load(f"{sys.argv[1]}/killed/checkpoints/last.ckpt", weights_only=True)
diffs = {k: (a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"]}
print(json.dumps({"device": torch.cuda.get_device_name(0), "global_step": [a["global_step"], b["global_step"]],
                  "bit_identical_tensors": sum(v == 0 for v in diffs.values()), "tensors": len(diffs),
                  "max_abs_diff": max(diffs.values()),
                  "max_abs_weight": max(t.abs().max().item() for t in a["state_dict"].values())}))
PY
