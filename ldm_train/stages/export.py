"""`stage=export format=diffusers out=<path> name=<model>`: a diffusion artifact → a diffusers folder."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from ldm_train.config import ConfigError, diffusion_dir

log = logging.getLogger(__name__)
FORMATS = ("diffusers",)


def run(cfg: DictConfig) -> dict:
    from ldm_train.interop.diffusers_export import export_diffusers
    from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline

    if cfg.get("format") not in FORMATS:
        raise ConfigError(f"format={cfg.get('format')!r} is not supported; valid: {', '.join(FORMATS)} "
                          "(single_file is not implemented yet)")
    if not cfg.get("out"):
        raise ConfigError("stage=export needs out=<folder to write>")
    out = Path(cfg.out).expanduser().resolve()
    if out.exists() and not cfg.get("overwrite", False):
        raise ConfigError(f"{out} already exists: choose another out= or pass overwrite=true")
    pipe = LatentDiffusionPipeline.from_artifact(diffusion_dir(cfg))
    notes = export_diffusers(pipe, out)
    for note in notes:
        log.warning("%s", note)
    log.info("exported %s → %s (%s)", diffusion_dir(cfg), out, cfg.format)
    return {"out": str(out), "format": cfg.format, "complete_pipeline": not notes, "notes": notes}
