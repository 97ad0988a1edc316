#!/usr/bin/env bash
# Multi-node DDP without SLURM, through torchrun's c10d rendezvous. Run it on every node with the
# same NNODES, MASTER_ADDR, MASTER_PORT and RUN_ID, and each node's own NODE_RANK:
#   NNODES=2 NODE_RANK=0 NPROC=8 MASTER_ADDR=node0 RUN_ID=exp1 bash launch/torchrun.sh experiment=alexnet2012 data.root=/data/imagenet-wds
#   NNODES=2 NODE_RANK=1 NPROC=8 MASTER_ADDR=node0 RUN_ID=exp1 bash launch/torchrun.sh experiment=alexnet2012 data.root=/data/imagenet-wds
# NPROC: processes per node (= GPUs). RUN_ID names the run directory on every rank alike, so
# running the same command again resumes it. Hydra overrides pass through. torchrun and
# alexnet_dist come from PATH; ALEXNET_VENV=/path/to/venv activates that environment first.
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC=${NPROC:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${RUN_ID:-}" ]; then
    if [ "$NNODES" != 1 ]; then
        echo "error: set RUN_ID (the same on every node) so all ranks share one run directory" >&2
        exit 2
    fi
    RUN_ID=$(date +%Y%m%d-%H%M%S)-$$  # the pid: two launches in one second get two runs
fi
if [ -n "${ALEXNET_VENV:-}" ]; then
    export PATH="$ALEXNET_VENV/bin:$PATH"
fi
if ! command -v torchrun >/dev/null; then
    echo "error: torchrun is not on PATH; activate the environment with torch and alexnet_dist, or set ALEXNET_VENV" >&2
    exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$NPROC" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RUN_ID" \
    -m alexnet_dist.cli.train trainer.strategy=ddp trainer.devices="$NPROC" trainer.num_nodes="$NNODES" \
    run_id="$RUN_ID" "$@"
