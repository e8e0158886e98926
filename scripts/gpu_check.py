"""GPU check: stage 1 and stage 2 of `experiment=smoke` on one GPU with bf16, stage 2 with strategy=fsdp, stage 1
with DDP + SyncBatchNorm; prints PASS/FAIL per item and exits 1 if any failed. About 2-4 minutes (each item is a fresh
`python -m ldm_train` process: most of its time is start-up); every item has its own time limit, 8 minutes in all.

    python scripts/gpu_check.py [--workdir DIR] [--only NAME ...]

On the lent GPU machine (python3 with torch+CUDA, lightning, torchmetrics, transformers, but no hydra-core,
omegaconf, lpips, webdataset or wandb) run scripts/gpu_check.sh instead: it installs carried wheels first and
puts the checkout on PYTHONPATH (this script imports the installed `ldm_train`, like every script here).
Logs go to CSV (logger=csv) and the text encoder is `tiny` (the smoke default), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = 8 * 60

# name, stage-specific overrides, artifacts folder, what it checks (artifact kind)
ITEMS = [
    ("stage1_bf16", ["stage=autoencoder", "trainer.precision=bf16-mixed"], "bf16", "autoencoder"),
    ("stage2_bf16", ["stage=diffusion", "trainer.precision=bf16-mixed"], "bf16", "diffusion"),
    ("sample_bf16", ["stage=sample", "prompt=a red circle on the left"], "bf16", "samples"),
    ("stage2_fsdp", ["stage=diffusion", "strategy=fsdp", "trainer.precision=bf16-mixed"], "fsdp", "diffusion"),
    ("stage1_ddp_syncbn", ["stage=autoencoder", "strategy=ddp", "autoencoder.loss.disc.sync_batchnorm=true",
                           "autoencoder.loss.disc_start=2"], "ddp", "autoencoder"),
]
COMMON = ["experiment=smoke", "logger=csv", "text_encoder=tiny", "trainer.devices=1"]


def finite_numbers(metrics: dict) -> bool:
    values = [v for v in metrics.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return bool(values) and all(math.isfinite(v) for v in values)


def check_outputs(kind: str, artifacts: Path, run_dir: Path) -> str:
    """'' when the item's outputs are there and sane, else what is wrong."""
    if kind == "samples":
        grid = run_dir / "samples" / "grid.png"
        return "" if grid.is_file() else f"no {grid}"
    folder = artifacts / kind / "kl_f4"
    files = ["model.safetensors", "config.yaml", "metrics.json"] + (["calibration.json"] if kind == "autoencoder"
                                                                    else [])
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        return f"missing {missing} in {folder}"
    metrics = json.loads((folder / "metrics.json").read_text())
    if not finite_numbers(metrics):
        return f"non-finite metrics {metrics}"
    if kind == "autoencoder" and not metrics.get("scale_factor", 0) > 0:
        return f"scale_factor {metrics.get('scale_factor')}"
    if not (run_dir / "checkpoints" / "last.ckpt").exists():
        return "no checkpoints/last.ckpt"
    return ""


def run_item(name: str, overrides: list[str], group: str, kind: str, workdir: Path, limit_s: float,
             accelerator: str = "gpu") -> tuple:
    artifacts, run_dir = workdir / group / "artifacts", workdir / name
    if group == "fsdp":  # FSDP trains stage 2 only (stage 1 is refused at start-up): on the bf16 stage-1 artifact
        overrides = overrides + [f"autoencoder.path={workdir / 'bf16' / 'artifacts' / 'autoencoder' / 'kl_f4'}"]
    cmd = [sys.executable, "-m", "ldm_train", *COMMON, f"trainer.accelerator={accelerator}", *overrides,
           f"paths.artifacts={artifacts}",
           f"hydra.run.dir={run_dir}"]
    start = time.time()
    try:
        out = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=max(10, limit_s))
        problem = f"exit code {out.returncode}" if out.returncode else check_outputs(kind, artifacts, run_dir)
        log = out.stdout + out.stderr
    except subprocess.TimeoutExpired as err:
        problem, log = f"timed out after {limit_s:.0f} s", str(err.stdout or "") + str(err.stderr or "")
    return problem, time.time() - start, log


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="where runs and artifacts go (default: a temp dir)")
    parser.add_argument("--only", nargs="*", default=None, help="item names to run (default: all)")
    parser.add_argument("--accelerator", default="gpu", help="cpu: a dry run of this script's plumbing (no GPU)")
    args = parser.parse_args()

    import torch

    if args.accelerator == "gpu" and not torch.cuda.is_available():
        print("SKIP: no CUDA GPU visible to torch")
        return 0
    if args.accelerator == "gpu":
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, bf16 supported: "
              f"{torch.cuda.is_bf16_supported()}", flush=True)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="ldm_gpu_check_"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    deadline, results = time.time() + BUDGET_S, []
    items = [i for i in ITEMS if args.only is None or i[0] in args.only]
    for n, (name, overrides, group, kind) in enumerate(items):
        left = deadline - time.time()
        if left < 20:
            results.append((name, "not run: the 8-minute budget is spent"))
            print(f"FAIL {name}: not run, budget spent", flush=True)
            continue
        problem, seconds, log = run_item(name, overrides, group, kind, workdir, left / (len(items) - n) * 2,
                                         args.accelerator)
        results.append((name, problem))
        print(f"{'FAIL' if problem else 'PASS'} {name} ({seconds:.0f} s){': ' + problem if problem else ''}",
              flush=True)
        if problem:
            print("    " + "\n    ".join(log.strip().splitlines()[-25:]), flush=True)
    failed = [n for n, p in results if p]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
