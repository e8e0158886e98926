"""`stage=export format=diffusers|single_file out=<path> name=<model>`: a diffusion artifact → a diffusers folder
or one .safetensors with the original (CompVis) key names."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from ldm_train.config import ConfigError, diffusion_dir

log = logging.getLogger(__name__)
FORMATS = ("diffusers", "single_file")


def run(cfg: DictConfig) -> dict:
    from ldm_train.interop.diffusers_export import export_diffusers
    from ldm_train.interop.single_file import export_single_file
    from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline

    if cfg.get("format") not in FORMATS:
        raise ConfigError(f"format={cfg.get('format')!r} is not supported; valid: {', '.join(FORMATS)}")
    if not cfg.get("out"):
        raise ConfigError("stage=export needs out=<folder to write> (format=single_file: out=<file>.safetensors)")
    if cfg.format == "single_file" and not str(cfg.out).endswith(".safetensors"):
        raise ConfigError(f"format=single_file writes a .safetensors file: out={cfg.out} must end in .safetensors")
    out = Path(cfg.out).expanduser().resolve()
    if out.exists() and not cfg.get("overwrite", False):
        raise ConfigError(f"{out} already exists: choose another out= or pass overwrite=true")
    pipe = LatentDiffusionPipeline.from_artifact(diffusion_dir(cfg))
    notes = (export_diffusers if cfg.format == "diffusers" else export_single_file)(pipe, out)
    for note in notes:
        log.warning("%s", note)
    log.info("exported %s → %s (%s)", diffusion_dir(cfg), out, cfg.format)
    return {"out": str(out), "format": cfg.format, "complete_pipeline": not notes, "notes": notes}
