"""One row of launch/bench/large-batch.sh's table from a run's results.json and its settings."""

import json
import sys
from pathlib import Path

results, name, lr, seconds = sys.argv[1:5]
r = json.loads(Path(results).read_text())
batch = {"sgd-128": 128}.get(name, 4096)
recipe = {
    "sgd-128": "SGD, cosine, warm-up 0.2 epoch",
    "sgd-4096": "SGD, cosine, warm-up 0.2 epoch",
    "lars-4096": "LARS, poly 2, warm-up 1/4 of the epochs",
}[name]
print(f"| {name} | {batch} | {recipe} | {float(lr):g} | {r['val_top1']:.4f} | {int(seconds) / 60:.1f} |")
