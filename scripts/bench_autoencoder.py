"""Stage-1 benchmark on shapes: a step budget under a wall-time cap; prints PSNR, the LPIPS variant, step time.

    python scripts/bench_autoencoder.py                # KL f=4 at 32 px (≤ 3 min), KL f=8 at 64 px (≤ 10 min)
    python scripts/bench_autoencoder.py --only f4 --minutes 3
    python scripts/bench_autoencoder.py --only f4 --logvar-ab   # fixed vs learned logvar: PSNR, KL, scale factor

--logvar-ab runs every case twice, with `autoencoder.loss.learn_logvar=false` (the default: the paper's KL
weight) and `=true`, and adds the KL (mean of the last logged train/kl values: nats per image, summed over the
latent), the final logvar and the calibrated scale factor (1/std of the latents) to each row.

Each case is a normal `python -m ldm_train stage=autoencoder` run (quickstart settings, time-limited), so
the figures are what a user gets; artifacts go to a temporary folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# Step budgets sized to the wall time on 2 cores (cosine LR decays to 0 at the budget); the wall time is a cap.
CASES = {
    "f4": {"minutes": 3, "steps": 1800, "overrides": ["f=4", "data.resolution=32"], "goal_db": 33.0},
    "f8": {"minutes": 10, "steps": 1000, "overrides": ["f=8", "data.resolution=64", "autoencoder.batch_size=32"],
           "goal_db": 28.0},
}


def run_case(name: str, minutes: float, steps: int, extra: list[str]) -> dict:
    case = CASES[name]
    with tempfile.TemporaryDirectory() as tmp:
        t = int(minutes * 60)
        cmd = [sys.executable, "-m", "ldm_train", "stage=autoencoder", "experiment=quickstart", "logger=csv",
               f"paths.artifacts={tmp}/artifacts", f"hydra.run.dir={tmp}/run", f"autoencoder.max_steps={steps}",
               f"autoencoder.max_time=00:00:{t // 60:02d}:{t % 60:02d}", f"autoencoder.val_every={steps}",
               "trainer.enable_progress_bar=false", *case["overrides"], *extra]
        subprocess.run(cmd, check=True)
        art = next(Path(tmp, "artifacts", "autoencoder").iterdir())
        metrics = json.loads((art / "metrics.json").read_text())
        train = last_logged(Path(tmp, "run", "csv", "autoencoder", "metrics.csv"), ("train/kl", "train/logvar"))
    lp = next(k for k in metrics if k.startswith("recon_lpips"))
    choice = {"autoencoder.loss.learn_logvar=true": "learned", "autoencoder.loss.learn_logvar=false": "fixed"}
    logvar = next((choice[o] for o in extra if o in choice), "config")  # config: the quickstart's own setting
    return {"case": f"KL {name} {case['overrides'][1].split('=')[1]} px", "logvar": logvar,
            "kl": train["train/kl"], "final_logvar": train["train/logvar"], "scale_factor": metrics["scale_factor"],
            "minutes": metrics["train_seconds"] / 60, "steps": metrics["steps"],
            "step_ms": 1000 * metrics["train_seconds"] / max(1, metrics["steps"]), "psnr": metrics["recon_psnr"],
            "ssim": metrics["recon_ssim"], "lpips_name": lp, "lpips_value": metrics[lp], "goal_db": case["goal_db"],
            "params_M": metrics["parameters"] / 1e6}


def last_logged(path: Path, keys: tuple[str, ...], last: int = 5) -> dict[str, float]:
    """Mean of the last `last` logged values of each key in a Lightning CSV log (NaN if never logged)."""
    rows = list(csv.DictReader(path.open())) if path.exists() else []
    out = {}
    for key in keys:
        values = [float(r[key]) for r in rows if r.get(key)][-last:]
        out[key] = sum(values) / len(values) if values else float("nan")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=list(CASES), action="append")
    ap.add_argument("--minutes", type=float, help="override each case's wall-time cap")
    ap.add_argument("--steps", type=int, help="override each case's step budget")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every case")
    ap.add_argument("--logvar-ab", action="store_true", help="each case with fixed and with learned logvar")
    args = ap.parse_args()
    variants = [["autoencoder.loss.learn_logvar=false"], ["autoencoder.loss.learn_logvar=true"]] if args.logvar_ab \
        else [[]]
    rows = [run_case(n, args.minutes or CASES[n]["minutes"], args.steps or CASES[n]["steps"], [*args.overrides, *v])
            for n in (args.only or list(CASES)) for v in variants]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    print(f"\n{'case':<16}{'logvar':>8}{'min':>5}{'params':>9}{'steps':>7}{'ms/step':>9}{'PSNR dB':>9}{'goal':>6}"
          f"{'SSIM':>7}{'KL':>9}{'logvar':>8}{'scale':>7}  perceptual")
    for r in rows:
        print(f"{r['case']:<16}{r['logvar']:>8}{r['minutes']:>5.1f}{r['params_M']:>8.2f}M{r['steps']:>7}"
              f"{r['step_ms']:>9.0f}{r['psnr']:>9.2f}{r['goal_db']:>6.0f}{r['ssim']:>7.3f}{r['kl']:>9.1f}"
              f"{r['final_logvar']:>8.2f}{r['scale_factor']:>7.3f}  {r['lpips_name']}={r['lpips_value']:.4f}")


if __name__ == "__main__":
    main()
