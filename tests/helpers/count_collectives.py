"""alexnet-train with torch.distributed's Python collectives counted: each process writes
{"in_steps": calls made while Lightning's training loop ran one batch, "all": every call} to
$COUNT_DIR/<pid>.json as it exits. The gradients' all-reduce runs inside DDP's C++ reducer and
is not counted: what is counted is the bookkeeping around it. Lightning starts the other DDP
ranks by running this same script again, so they count too. With DEBUG_COLLECTIVES=1 the file
also says where the calls inside steps came from."""

import atexit
import json
import os
import sys
import traceback
from pathlib import Path

import torch.distributed as dist

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "monitored_barrier",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "scatter_object_list",
)
counts = {"in_steps": 0, "all": 0}


def in_a_training_step() -> bool:
    """Whether Lightning's training epoch loop is running one batch (fetch, step, callbacks)."""
    return any(f.name == "advance" and f.filename.endswith("training_epoch_loop.py") for f in traceback.extract_stack())


def counted(collective):
    def call(*args, **kwargs):
        counts["all"] += 1
        if in_a_training_step():
            counts["in_steps"] += 1
            if os.environ.get("DEBUG_COLLECTIVES"):  # where each one comes from, to find a new one
                frames = " < ".join(f"{f.filename.split('/')[-1]}:{f.name}" for f in traceback.extract_stack()[-8:-1])
                where = counts.setdefault("where", {})
                where[frames] = where.get(frames, 0) + 1
        return collective(*args, **kwargs)

    return call


for name in COLLECTIVES:
    setattr(dist, name, counted(getattr(dist, name)))
atexit.register(lambda: (Path(os.environ["COUNT_DIR"]) / f"{os.getpid()}.json").write_text(json.dumps(counts)))

from alexnet_dist.cli.train import main  # noqa: E402  (after the collectives are wrapped)

sys.exit(main())
