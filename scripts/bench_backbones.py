"""Stage-2 backbones × objectives on shapes: U-Net/ε, U-Net/flow, DiT/ε, DiT/flow side by side.

    python scripts/bench_backbones.py                       # the quickstart budget (its stage-2 steps per case)
    python scripts/bench_backbones.py --steps 150 --eval-samples 64 --ae-steps 300   # a reduced budget

One stage-1 autoencoder (experiment=quickstart, KL f=4, 32 px) is trained once and shared; each case is then a
normal `python -m ldm_train experiment=quickstart stage=diffusion unet=<u> diffusion.objective=<o>` run, so the
figures are what a user gets. Printed per case: caption alignment at guidance 3 (`sampling.*` defaults, the
objective's default sampler), stage-2 wall time, ms per step, and the FLOPs of one denoiser training step
(forward + backward of the loss at the run's batch size, counted by torch's FlopCounterMode).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {"U-Net/ε": ("small", "ddpm"), "U-Net/flow": ("small", "flow"),
         "DiT/ε": ("dit_tiny", "ddpm"), "DiT/flow": ("dit_tiny", "flow")}


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def train_autoencoder(tmp: Path, ae_steps: int | None, extra: list[str]) -> Path:
    cmd = [sys.executable, "-m", "ldm_train", "stage=autoencoder", "experiment=quickstart", "logger=none",
           f"paths.artifacts={tmp}/artifacts", f"hydra.run.dir={tmp}/run_ae", "trainer.enable_progress_bar=false"]
    if ae_steps:
        cmd += [f"autoencoder.max_steps={ae_steps}", f"autoencoder.val_every={ae_steps}"]
    run(cmd + extra)
    return next(Path(tmp, "artifacts", "autoencoder").iterdir())


def step_flops(ae: Path, unet: str, objective: str, extra: list[str]) -> float:
    """FLOPs of one denoiser training step (loss forward + backward) at the case's batch size."""
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ldm_train.config import CONF_DIR
    from ldm_train.lit.diffusion import DiffusionModule
    from ldm_train.pipeline.first_stage import FirstStage
    from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline
    from ldm_train.stages.diffusion import pipeline_config
    from ldm_train.utils.flops import count_flops

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=quickstart", f"unet={unet}",
                                           f"diffusion.objective={objective}", *extra])
    first = FirstStage.from_artifact(ae, cfg.f, cfg.regularizer.name, bool(cfg.diffusion.sample_posterior))
    pipe = LatentDiffusionPipeline.build(first, pipeline_config(cfg, first))
    module = DiffusionModule(pipe, OmegaConf.to_container(cfg.diffusion, resolve=True), channels_last=False)
    b = cfg.diffusion.batch_size
    z0 = torch.randn(b, *first.latent_shape(cfg.data.resolution))
    ctx = pipe.text_encoder(["a red circle on the left"] * b)
    return count_flops(lambda: module.diffusion_loss(z0, ctx).backward())


def run_case(tmp: Path, ae: Path, name: str, steps: int | None, eval_samples: int | None,
             extra: list[str]) -> dict:
    unet, objective = CASES[name]
    tag = name.replace("/", "_").replace("ε", "eps").replace("-", "")
    cmd = [sys.executable, "-m", "ldm_train", "stage=diffusion", "experiment=quickstart", "logger=none",
           f"unet={unet}", f"diffusion.objective={objective}", f"autoencoder.path={ae}", f"name={tag}",
           f"paths.artifacts={tmp}/artifacts", f"hydra.run.dir={tmp}/run_{tag}", "trainer.enable_progress_bar=false",
           "sampling.guidance_scale=3.0"]
    if steps:
        cmd += [f"diffusion.max_steps={steps}", f"diffusion.val_every={steps}",
                f"diffusion.warmup_steps={max(1, min(100, steps // 8))}"]
    if eval_samples:
        cmd.append(f"diffusion.eval_samples={eval_samples}")
    run(cmd + extra)
    m = json.loads(Path(tmp, "artifacts", "diffusion", tag, "metrics.json").read_text())
    return {"case": name, "alignment_cfg3": m.get("caption_alignment_cfg"), "seconds": m["train_seconds"],
            "steps": m["steps"], "ms_per_step": 1000 * m["train_seconds"] / max(1, m["steps"]),
            "gflops_per_step": step_flops(ae, unet, objective, extra) / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=list(CASES), action="append")
    ap.add_argument("--steps", type=int, help="stage-2 steps per case (default: the quickstart's)")
    ap.add_argument("--eval-samples", type=int, help="samples scored for caption alignment (quickstart: 256)")
    ap.add_argument("--ae-steps", type=int, help="stage-1 steps (default: the quickstart's)")
    ap.add_argument("--autoencoder", help="an existing quickstart autoencoder artifact (skips stage 1)")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every case")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ae = Path(args.autoencoder) if args.autoencoder else train_autoencoder(tmp, args.ae_steps, args.overrides)
        for name in args.only or CASES:
            rows.append(run_case(tmp, ae, name, args.steps, args.eval_samples, args.overrides))
    print("\n| case | caption alignment (s=3) | stage-2 wall (s) | steps | ms/step | GFLOPs/step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        align = "—" if r["alignment_cfg3"] is None else f"{r['alignment_cfg3']:.3f}"
        print(f"| {r['case']} | {align} | {r['seconds']:.0f} | {r['steps']} | {r['ms_per_step']:.0f} | "
              f"{r['gflops_per_step']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
