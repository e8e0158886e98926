"""`stage=sample`: load a diffusion artifact and write a captioned PNG grid plus one PNG per sample."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig
from PIL import Image

from ldm_train.config import diffusion_dir, run_dir
from ldm_train.diffusion.schedules import NoiseSchedule
from ldm_train.models.text import build_text_encoder
from ldm_train.pipeline.artifacts import load_weights, read_diffusion
from ldm_train.pipeline.first_stage import FirstStage
from ldm_train.sampling import generate
from ldm_train.stages.diffusion import build_unet
from ldm_train.utils.images import save_grid, save_png

log = logging.getLogger(__name__)


def load_pipeline(artifact: Path) -> tuple[torch.nn.Module, torch.nn.Module, FirstStage, NoiseSchedule, dict]:
    """(EMA U-Net, text encoder, first stage, schedule, config) from a diffusion artifact."""
    config, ae_path = read_diffusion(artifact)
    first_stage = FirstStage.from_artifact(ae_path)
    text_encoder = build_text_encoder(config["text_encoder"])
    if (Path(artifact) / "text_encoder.safetensors").exists():
        text_encoder.load_state_dict(load_weights(Path(artifact) / "text_encoder.safetensors"))
    unet = build_unet(config["unet"], first_stage.latent_channels, text_encoder.dim)
    unet.load_state_dict(load_weights(Path(artifact) / "model.safetensors"))
    d = config["diffusion"]
    schedule = NoiseSchedule.from_name(d["schedule"], d["num_timesteps"], beta_start=d["beta_start"],
                                       beta_end=d["beta_end"])
    return unet.eval().requires_grad_(False), text_encoder.eval(), first_stage, schedule, config


def load_image(path: str, resolution: int) -> torch.Tensor:
    """An init image as (1, 3, R, R) in [-1, 1] (resized shorter side, centre crop)."""
    img = Image.open(path).convert("RGB")
    scale = resolution / min(img.size)
    img = img.resize((max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))),
                     Image.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    arr = np.asarray(img.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)[None] / 127.5 - 1


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "empty"


def run(cfg: DictConfig) -> dict:
    artifact = diffusion_dir(cfg)
    unet, text_encoder, first_stage, schedule, config = load_pipeline(artifact)
    prompts = list(cfg.prompt) if isinstance(cfg.prompt, (list, ListConfig)) else [str(cfg.prompt)]
    expanded = [p for p in prompts for _ in range(cfg.n_per_prompt)]
    labels = None
    if config["text_encoder"]["name"] == "class":
        from ldm_train.data.shapes import attributes_to_label, parse_caption

        labels = torch.tensor([attributes_to_label(*parse_caption(p)) for p in expanded])
    init = load_image(cfg.init_image, config["resolution"]) if cfg.init_image else None
    images = generate(unet, text_encoder, first_stage, schedule, expanded, resolution=config["resolution"],
                      prediction_type=config["diffusion"]["prediction_type"], guidance_scale=cfg.guidance_scale,
                      sampler=cfg.sampler, steps=cfg.steps, eta=cfg.eta, seed=cfg.seed,
                      negative_prompt=cfg.negative_prompt, labels=labels, init_image=init, strength=cfg.strength)
    out = Path(cfg.out_dir) if cfg.out_dir else run_dir(cfg) / "samples"
    grid = save_grid(images, out / "grid.png", nrow=cfg.n_per_prompt, captions=prompts,
                     scale=max(1, 128 // config["resolution"]))
    for i, img in enumerate(images):
        save_png(img, out / f"{i // cfg.n_per_prompt:02d}_{slug(expanded[i])}_{i % cfg.n_per_prompt}.png")
    log.info("wrote %s and %d single PNGs in %s", grid, len(images), out)
    result = {"grid": str(grid), "num_images": len(images)}
    if config.get("data") == "shapes" and labels is None:
        from ldm_train.data.shapes import caption_alignment

        result["caption_alignment"] = caption_alignment(images, expanded)
        log.info("caption alignment of these samples: %.3f", result["caption_alignment"])
    return result
