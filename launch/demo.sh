#!/usr/bin/env bash
# The demo behind `make demo`: get Fashion-MNIST, write JPEG shards, train alexnet_small, print
# the run directory and the test top-1. DATA=DIR points at the four IDX files if they are
# elsewhere; extra arguments go to alexnet-train (e.g. trainer.max_epochs=1).
set -euo pipefail
BIN=${BIN:-.venv/bin}
SHARDS=${SHARDS:-data/fashion-mnist-wds}
DEBIAN_DIR=/usr/share/datasets/fashion-mnist
FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"

has_files() {
    for f in $FILES; do [ -f "$1/$f" ] || [ -f "$1/${f%.gz}" ] || return 1; done
}

if [ -z "${DATA:-}" ]; then
    DATA=$DEBIAN_DIR
    if ! has_files "$DATA" && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing the Debian package dataset-fashion-mnist (31 MB) ..."
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
    fi
fi
if ! has_files "$DATA"; then
    cat >&2 <<MSG
error: the Fashion-MNIST IDX files are not in $DATA.
  Put these four files (gzipped or not) in one folder and run: make demo DATA=/that/folder
    $FILES
  On Debian or Ubuntu, as root, 'apt-get install dataset-fashion-mnist' puts them in $DEBIAN_DIR.
MSG
    exit 1
fi

if [ ! -f "$SHARDS/manifest.json" ]; then
    "$BIN/alexnet-prepare" fashion-mnist --src "$DATA" --out "$SHARDS" --quality 95
fi
run_id=demo-$(date +%Y%m%d-%H%M%S)
"$BIN/alexnet-train" experiment=fashion_mnist data.root="$SHARDS" run_id="$run_id" "$@"
"$BIN/python" - "runs/fashion_mnist/$run_id/results.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"Fashion-MNIST test top-1: {r['val_top1']:.4f} (the 10,000 test images, used as the val split)")
print(f"results: {sys.argv[1]}")
PY
