#!/usr/bin/env bash
# The GPU check (launch/gpu_check.py): figures of the DALI GPU loader, both networks, the 2012
# recipe end to end, DDP, bad JPEGs and kill-and-resume, as JSON lines in OUT_DIR.
#
#   bash launch/gpu-check.sh wheels      on a machine that reaches PyPI, from the repository root:
#                                        .whl/ gets this project and the pure-Python packages a stock
#                                        CUDA/PyTorch image lacks (hydra, omegaconf, webdataset, ...)
#   bash launch/gpu-check.sh OUT_DIR [gpu_check.py options]
#                                        on the GPU machine, from the repository root, with .whl/
#                                        and DALI there (DALI: ../shared/tools/dali-ferry.sh, whose
#                                        `env` must be sourced first); at most 8 minutes
#
# Where every package is already installed (a venv with alexnet_dist), .whl/ is not needed; on a
# machine without a GPU the same commands run at toy sizes (--quick), which is how it is tested.
set -euo pipefail
if [ "${1:-}" = wheels ]; then
    rm -rf .whl && mkdir -p .whl
    python3 -m pip wheel -q --no-deps -w .whl . "hydra-core>=1.3.2,<1.4" "omegaconf>=2.3" \
        "antlr4-python3-runtime==4.9.3" "webdataset>=0.2.100,<2" "braceexpand>=0.1.7"
    ls .whl
    exit 0
fi
out=${1:?usage: bash launch/gpu-check.sh OUT_DIR [--quick] [--parts a,b,...]   (or: wheels)}
shift
here=$(cd "$(dirname "$0")" && pwd)
if [ -d .whl ]; then  # this checkout's own code and its pure-Python dependencies, beside the image's
    python3 -m pip install -q --no-index --no-deps --target /tmp/gpu-check-site .whl/*
    export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
    export PATH=/tmp/gpu-check-site/bin:$PATH
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU: --quick"
python3 -c "import sys, torch, lightning; print('python', sys.version.split()[0], 'torch', torch.__version__, 'lightning', lightning.__version__)"
python3 -c "import nvidia.dali as d; print('dali', d.__version__)" || echo "DALI does not import: parts a, c-f need it"
exec python3 "$here/gpu_check.py" "$out" "$@"
