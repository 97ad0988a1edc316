"""One row of launch/bench/large-batch.sh's table, from what the run recorded: its config.yaml
(global batch, optimiser, schedule, rate) and results.json (test top-1), or the reason it
stopped. Arguments: RUN_DIR NAME SECONDS [REASON]."""

import json
import sys
from pathlib import Path

import yaml

run, name, seconds, *reason = Path(sys.argv[1]), *sys.argv[2:]
outcome = reason[0] if reason else f"{json.loads((run / 'results.json').read_text())['val_top1']:.4f}"
cfg = yaml.safe_load((run / "config.yaml").read_text())
o, s = cfg["optim"], cfg["optim"]["schedule"]
batch = cfg["data"]["batch_size"] * cfg["trainer"]["accumulate_grad_batches"]
assert o["reference_batch"] is None  # the rate below is applied as is
schedule = s["name"] + (f" power {s['power']:g}" if s["name"] == "poly" else "")
start = f" from {s['warmup_from']:g}x the rate" if "warmup_from" in s else ""
warmup = f", warm-up {s['warmup_epochs']:g} epoch{start}" if s["warmup_epochs"] else ""
print(f"| {name} | {batch} | {o['name']}, {schedule}{warmup} | {o['lr']:g} | {outcome} | {int(seconds) / 60:.1f} |")
