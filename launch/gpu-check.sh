#!/usr/bin/env bash
# The GPU measurements in docs/performance.md, as run on a lent single-GPU machine whose image has
# torch and lightning but not hydra/webdataset: those come from wheels in .whl/ (pure Python).
# Usage, from the repository root: bash launch/gpu-check.sh   (writes results to $OUT or /tmp/out;
# SKIP_MODEL=1 leaves out the model-only benchmarks)
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
bench="python3 -m alexnet_dist.cli.bench"
[ -n "${SKIP_MODEL:-}" ] || {
    for model in alexnet2012 alexnet_owt; do
        for precision in fp32 bf16; do
            $bench model --model "$model" --precision "$precision" --batch-size 256 --steps 50
        done
        $bench model --model "$model" --precision bf16 --channels-last --batch-size 256 --steps 50
    done
    $bench model --model alexnet2012 --precision bf16 --channels-last --batch-size 1024 --steps 30
} | tee "$OUT/model.jsonl"
# 256x256 JPEG shards, like the paper's storage, 100 classes of synthetic pictures
python3 -m alexnet_dist.cli.prepare synthetic --out /tmp/syn256 --size 256 --classes 100 \
    --train-count 25600 --val-count 2000 --workers 16 --min-shards 32 2>/dev/null
{
    for workers in 4 8 14; do
        $bench loader --loader wds --data /tmp/syn256 --size 224 --batch-size 256 --workers $workers --steps 40
    done
    if python3 -c "import nvidia.dali" 2>/dev/null; then  # the DALI wheel must be installed on the machine
        for threads in 2 4 8; do
            $bench loader --loader dali --device gpu --data /tmp/syn256 --size 224 --batch-size 256 --threads $threads --steps 100
        done
    fi
} | tee "$OUT/loader.jsonl"
# end to end: the 2012 network and recipe, bf16, two epochs; DALI (GPU decoding) when installed
LOADER=$(python3 -c "import nvidia.dali" 2>/dev/null && echo "loader=dali" || echo "loader=wds loader.workers=14")
python3 -m alexnet_dist.cli.train experiment=alexnet2012 data.root=/tmp/syn256 logger=csv run_id=gpu \
    paths.runs=/tmp/runs trainer.max_epochs=2 trainer.precision=bf16-mixed $LOADER \
    +trainer.enable_progress_bar=false 2>&1 | grep -v Warning | tail -5
cp /tmp/runs/alexnet2012/gpu/results.json "$OUT/train_results.json"
cp /tmp/runs/alexnet2012/gpu/logs/version_0/metrics.csv "$OUT/train_metrics.csv"
# the DDP code path on a GPU (NCCL), one process: a short run must finish and report world_size 1
python3 -m alexnet_dist.cli.train experiment=alexnet2012 data.root=/tmp/syn256 logger=csv run_id=ddp \
    paths.runs=/tmp/runs trainer.max_epochs=1 trainer.precision=bf16-mixed $LOADER \
    trainer.strategy=ddp trainer.limit_train_batches=20 +trainer.enable_progress_bar=false 2>&1 | tail -2
cp /tmp/runs/alexnet2012/ddp/results.json "$OUT/ddp_results.json"
