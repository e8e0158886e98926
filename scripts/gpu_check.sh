#!/usr/bin/env bash
# GPU check on a machine whose python3 has torch+CUDA, lightning, torchmetrics, transformers and safetensors but
# not hydra-core, omegaconf, lpips, webdataset or wandb (the lent GPU machine): install carried wheels into a
# target folder (no dependencies resolved, nothing downloaded there), put it on PYTHONPATH, run gpu_check.py.
#
# 1. Here (with network), once, from the repository root: fetch the pure-Python wheels into .whl/ (the same set
#    scripts/gpu_bench.sh uses; .whl/ is git-ignored through .git/info/exclude)
#      scripts/gpu_check.sh --download        # = scripts/gpu_bench.sh --fetch-wheels
# 2. On the GPU machine, from the repository root, carrying .whl (device tool: carry=[".whl"], timeout ~540 s):
#      bash scripts/gpu_check.sh
#    It prints PASS/FAIL per item and "N passed, N failed"; exit code 1 if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--download" ]]; then
  exec bash scripts/gpu_bench.sh --fetch-wheels
fi

SITE=${GPU_CHECK_SITE:-/tmp/ldm_site}
if ! python3 -c "import hydra, omegaconf, lpips" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/: run 'scripts/gpu_check.sh --download' first"; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
# the package is not pip-installed there: the checkout stands in for it (the child `python -m ldm_train` runs too)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec timeout 520 python3 scripts/gpu_check.py "${@}"
