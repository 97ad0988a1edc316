#!/usr/bin/env bash
# The CPU framework-overhead comparison in docs/performance.md: alexnet-bench train (Lightning,
# our data module and loaders) against alexnet-bench baseline (a plain PyTorch loop over a plain
# webdataset DataLoader), same model, data, batch and optimiser, interleaved for two rounds;
# then DDP with 1 and 2 processes. Usage: bash launch/bench/cpu-train.sh DATA  (shards, e.g. the
# demo's data/fashion-mnist-wds)
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${1:?usage: cpu-train.sh DATA}
BIN=${BIN:-.venv/bin}
ARGS=(--data "$DATA" --model alexnet_small --size 28 --batch-size 128 --steps 80 --warmup 5 --device cpu --workers 2)
for round in 1 2; do
    "$BIN/alexnet-bench" baseline "${ARGS[@]}" 2>/dev/null
    "$BIN/alexnet-bench" train --loader wds "${ARGS[@]}" 2>/dev/null
    "$BIN/alexnet-bench" train --loader dali "${ARGS[@]}" 2>/dev/null
done
"$BIN/alexnet-bench" ddp --loader wds "${ARGS[@]}" 2>/dev/null
