#!/usr/bin/env bash
# Every GPU check in one run (≤ 8 min on an H100/H200), printing the table:
#   0. scripts/mfu_probe.py: where the SD-1.5 step's GPU time goes (attention backends, kernels by kind);
#   1. scripts/bench.py on CUDA in bf16: ours vs diffusers (U-Net, AutoencoderKL), stage-1 step, sampling,
#      cached latents, data, and the SD-1.5-size U-Net (859.5M) train step with its MFU, eager and compiled;
#   2. a smoke pipeline on the GPU (precision auto → bf16-mixed, fused AdamW, perf/tflops and perf/mfu logged).
#
#   scripts/gpu_bench.sh --fetch-wheels   # here, once: the pure-Python packages a bare GPU machine lacks → .whl/
#   scripts/gpu_bench.sh                  # there (carry .whl); figures and logs go to $OUT (default /tmp/gpu_bench)
#   PEAK_TFLOPS=989.4 scripts/gpu_bench.sh   # the GPU's dense bf16 peak, where Lightning's table lacks its name
#                                            # (e.g. a plain "NVIDIA H200"): MFU needs a peak
#
# The GPU machine's python3 has torch, lightning, transformers and safetensors but not hydra-core, omegaconf,
# lpips, webdataset or diffusers: they are installed from .whl/ with --no-deps into a target folder on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  PY=${PYTHON:-.venv/bin/python}
  mkdir -p .whl
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl hydra-core==1.3.2 omegaconf==2.3.0 lpips==0.1.4 webdataset==1.0.2 \
    braceexpand==0.1.7 diffusers==0.42.1 importlib_metadata==8.7.0 zipp==3.23.0 || exit 1
  # antlr4-python3-runtime (hydra's parser) is published as an sdist only: build its pure-Python wheel here
  "$PY" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 || exit 1
  ls .whl
  exit 0
fi

PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "no .whl/ here: rows needing diffusers/lpips/webdataset are skipped, the smoke run needs hydra (see --fetch-wheels)"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no GPU"; exit 1; }
"$PY" -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"

echo "== 0. mfu_probe.py: attention backends, cudnn.benchmark, GPU time by kind of kernel (eager SD-1.5 step)"
timeout 240 "$PY" scripts/mfu_probe.py --compiled --json "$OUT/mfu_probe.json" 2>&1 | tee "$OUT/mfu_probe.log"

echo "== 1a. bench.py: SD-1.5-size U-Net train step, bf16, eager and torch.compile'd (MFU)"
timeout 300 "$PY" scripts/bench.py --device cuda --compile --only sd15 --json "$OUT/bench_sd15.json" 2>&1 \
  | tee "$OUT/bench_sd15.log"
[[ ${PIPESTATUS[0]} == 0 ]] || echo "bench.py sd15 did not finish (status ${PIPESTATUS[0]})"

echo "== 1b. bench.py: ours vs diffusers and the other rows, bf16 autocast"
timeout 180 "$PY" scripts/bench.py --device cuda --only unet autoencoder stage1 sampling cached_latents data \
  --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
[[ ${PIPESTATUS[0]} == 0 ]] || echo "bench.py did not finish (status ${PIPESTATUS[0]})"

echo "== 2. smoke pipeline on the GPU (precision auto, MFU callback)"
RUN=/tmp/gpu_bench_run
rm -rf "$RUN"
timeout 120 "$PY" -m ldm_train stage=pipeline experiment=smoke logger=csv trainer.accelerator=gpu \
  trainer.peak_tflops="${PEAK_TFLOPS:-auto}" \
  paths.artifacts="$RUN/artifacts" hydra.run.dir="$RUN/run" >"$OUT/smoke_gpu.log" 2>&1
echo "smoke pipeline exit status $? (log: $OUT/smoke_gpu.log)"
grep -hE "precision|GFLOPs per device|Error|error" "$OUT/smoke_gpu.log" | head -8
"$PY" - "$RUN" <<'EOF'
import csv, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).rglob("metrics.csv")):
    rows = [r for r in csv.DictReader(open(f)) if r.get("perf/tflops")]
    last = rows[-1] if rows else {}
    print(f"{f.parent.name:<12} perf rows {len(rows)}; last tflops {last.get('perf/tflops', '-')}, "
          f"mfu {last.get('perf/mfu', '-')}")
EOF
echo "== done in $SECONDS s"
