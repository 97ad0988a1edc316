#!/usr/bin/env bash
# The LARS paper's claim at small scale (docs/performance.md, "Large batches at small scale"):
# model=alexnet_tiny (AlexNetSmall at its narrowest: width 16, fc 64, no dropout; alexnet_small
# ran at 100-250 img/s on the shared 2 cores, too slow for three rows in 25 minutes) on
# Fashion-MNIST at 28 px, the demo's recipe otherwise, the same number of epochs for three rows:
#   sgd-128    global batch 128, torch SGD at the demo's rate 0.05, cosine decay, warm-up 0.2
#              epoch (experiment=fashion_mnist as it is)
#   sgd-4096   global batch 4096 (512 x 8 accumulated), SGD at 0.05 x 4096/128 = 1.6 (linear
#              scaling), with lars-4096's schedule: a linear warm-up over the first quarter of the
#              epochs from 1/8 of the rate, then poly decay of power 2
#   lars-4096  the same with optim=lars (the published rule: trust 0.001, biases decayed too) at
#              a global rate of 8 (2 at 1K in the LARS authors' AlexNet-BN solvers, scaled
#              linearly to 4K; their 8K rate is 10)
# A row whose loss turns NaN or infinite (the run stops: optim.on_nonfinite=stop) reads "diverged".
# Usage: bash launch/bench/large-batch.sh [DATA] [EPOCHS]   (defaults: data/fashion-mnist-wds 2)
# Validates once, after the last epoch. Prints one row per run (test top-1 on the 10,000 test
# images, the peak global rate, the minutes it took). Extra settings for every row:
# ARGS="loader=wds ..." in the environment.
set -euo pipefail
BIN=${BIN:-.venv/bin}
DATA=${1:-data/fashion-mnist-wds}
EPOCHS=${2:-2}
stamp=$(date +%Y%m%d-%H%M%S)
common=(experiment=fashion_mnist model=alexnet_tiny "data.root=$DATA" experiment_name=large_batch logger=csv
    "trainer.max_epochs=$EPOCHS" "trainer.check_val_every_n_epoch=$EPOCHS" optim.reference_batch=null ${ARGS:-})
large=(data.batch_size=512 trainer.accumulate_grad_batches=8)

run() {  # NAME SETTINGS...: one training, then its row
    local name=$1 start log
    shift
    start=$(date +%s) log="runs-$stamp-$name.log"
    if "$BIN/alexnet-train" "${common[@]}" run_id="$stamp-$name" "$@" >"$log" 2>&1; then
        "$BIN/python" launch/bench/large_batch_row.py "runs/large_batch/$stamp-$name" "$name" "$(($(date +%s) - start))"
    elif stop=$(grep -ao "error: loss is [a-z]* at step [0-9]*" "$log"); then
        "$BIN/python" launch/bench/large_batch_row.py "runs/large_batch/$stamp-$name" "$name" "$(($(date +%s) - start))" \
            "diverged (${stop#error: })"
    else
        echo "error: $name failed; its output: $log" >&2
        exit 1
    fi
    rm -f "$log"
}

echo "| row | global batch | optimiser, schedule | global rate (peak) | test top-1 | minutes |"
echo "|---|---|---|---|---|---|"
warmup=("optim.schedule.warmup_epochs=$(awk "BEGIN { print $EPOCHS / 4 }")" optim.schedule.warmup_from=0.125
    optim.schedule.name=poly optim.schedule.power=2)
run sgd-128 optim.lr=0.05 data.batch_size=128
run sgd-4096 optim.lr=1.6 "${large[@]}" "${warmup[@]}"
run lars-4096 optim.lr=8 "${large[@]}" optim=lars "${warmup[@]}"
