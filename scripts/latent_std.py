"""The scaled latent std stage 2 trains on, with the scale factor calibrated on the posterior mode vs on samples.

    python scripts/latent_std.py ARTIFACT [hydra overrides ...]   # e.g. experiment=smoke (the data it trained on)

Calibrates ARTIFACT (a KL autoencoder directory; nothing is written) on `autoencoder.calibration.num_samples`
validation images twice, on the posterior mode and on seeded posterior samples, then encodes up to 1024 training
images as stage 2 does with `diffusion.sample_posterior: true` and prints the std of the scaled latents under each
factor. Calibrating the mode gives std ≈ √(1 + E[σ²]/Var(μ)) > 1 on samples.
"""

from __future__ import annotations

import sys

import torch

from ldm_train.config import CONF_DIR
from ldm_train.data import build_datasets, make_loader
from ldm_train.pipeline.artifacts import load_autoencoder
from ldm_train.pipeline.calibration import calibrate
from ldm_train.pipeline.first_stage import FirstStage


def main(artifact: str, overrides: list[str]) -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    model, _ = load_autoencoder(artifact, require_calibration=False)
    train, val = build_datasets(cfg.data)
    n = min(cfg.autoencoder.calibration.num_samples, len(val))
    cals = {which: calibrate(model, make_loader(val, 64, False), n, sample=which == "sample")
            for which in ("mode", "sample")}
    unscaled = FirstStage(model, {"scale_factor": 1.0, "raw_std": 1.0, "sample": True})
    torch.manual_seed(0)
    raw = []
    for batch in make_loader(train, 128, False):
        raw.append(unscaled.encode(batch["image"]))
        if sum(len(r) for r in raw) >= 1024:
            break
    raw = torch.cat(raw)[:1024]
    print(f"{artifact}: {n} calibration images, {len(raw)} training images encoded with posterior sampling")
    for cal in cals.values():
        print(f"  calibrated on the {cal['latent']:<16} scale_factor {cal['scale_factor']:.5f}  "
              f"std stage 2 sees {(raw * cal['scale_factor']).std().item():.4f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
