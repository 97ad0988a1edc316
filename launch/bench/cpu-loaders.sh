#!/usr/bin/env bash
# The CPU loader comparison in docs/performance.md: DALI's CPU mode and the webdataset loader read the
# same shards of real photos (random-resized crop 224 + flip, and the paper's random 224 crop +
# flip), batch 64, 2 threads / 2 worker processes; then FFCV on the same image folder if FFCV_PY
# names a python that has ffcv (its own venv: see docs/performance.md). Two rounds, so the spread
# between runs shows. Usage: bash launch/bench/cpu-loaders.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-/tmp/loader-bench}
BIN=${BIN:-.venv/bin}
mkdir -p "$WORK"
if [ ! -d "$WORK/seeds" ]; then  # 20 ImageNet validation photos shipped inside the foolbox wheel
    "$BIN/pip" download foolbox==3.3.4 --no-deps -q -d "$WORK/dl"
    "$BIN/python" -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); [z.extract(n, sys.argv[2]) for n in z.namelist() if n.startswith('foolbox/data/imagenet_')]" "$WORK"/dl/foolbox-*.whl "$WORK/x"
    mv "$WORK/x/foolbox/data" "$WORK/seeds"
fi
[ -d "$WORK/imagefolder" ] || "$BIN/python" launch/bench/make_jpeg_fixture.py --src "$WORK/seeds" --out "$WORK/imagefolder"
[ -f "$WORK/shards/manifest.json" ] || "$BIN/alexnet-prepare" imagefolder --src "$WORK/imagefolder" --out "$WORK/shards" --workers 2
for round in 1 2; do
    for augment in modern paper; do
        for loader in dali wds; do
            "$BIN/alexnet-bench" loader --loader "$loader" --augment "$augment" --data "$WORK/shards" --device cpu \
                --batch-size 64 --steps 150 --warmup 10 --threads 2 --workers 2 2>/dev/null
        done
    done
    if [ -n "${FFCV_PY:-}" ]; then
        "$FFCV_PY" launch/bench/ffcv_reference.py --data "$WORK/imagefolder" --epochs 3 2>/dev/null
    fi
done
