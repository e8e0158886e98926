"""`stage=sample`: load a diffusion artifact and write a captioned PNG grid plus one PNG per sample."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig
from PIL import Image

from ldm_train.config import diffusion_dir, run_dir
from ldm_train.data.shapes import captions_to_labels
from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline
from ldm_train.utils.images import save_grid, save_png

log = logging.getLogger(__name__)
HEADLINE_METRIC = "caption_alignment"  # shapes only; what `main()` returns to a Hydra sweeper


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


def how_sampled(cfg: DictConfig, pipe: LatentDiffusionPipeline, images: torch.Tensor) -> dict:
    """What makes these samples repeatable, stored with them: the negative prompt, the batch's noise seed (image i is
    position `batch_index` = i of that batch), the sampler (auto resolved), steps, guidance, η, size and model."""
    s = pipe.sampling_settings(**cfg.sampling)
    settings = {"negative_prompt": cfg.negative_prompt, "seed": int(s["seed"]), "batch_size": len(images),
                "sampler": pipe.parameterization.sampler_name(s["sampler"]), "steps": int(s["steps"]),
                "guidance_scale": float(s["guidance_scale"]), "eta": float(s["eta"]),
                "height": images.shape[-2], "width": images.shape[-1], "model": str(diffusion_dir(cfg))}
    if cfg.init_image:
        settings.update(init_image=str(cfg.init_image), strength=float(cfg.strength))
    return settings


def run(cfg: DictConfig, out_dir: Path | None = None) -> dict:
    """Sample `prompt` × `n_per_prompt` with `sampling.*` into `out_dir` (default `out_dir` config, else
    <run dir>/samples)."""
    pipe = LatentDiffusionPipeline.from_artifact(diffusion_dir(cfg))
    prompts = list(cfg.prompt) if isinstance(cfg.prompt, (list, ListConfig)) else [str(cfg.prompt)]
    expanded = [p for p in prompts for _ in range(cfg.n_per_prompt)]
    labels = captions_to_labels(expanded) if pipe.text_encoder.needs_labels else None
    init = load_image(cfg.init_image, pipe.resolution) if cfg.init_image else None
    images = pipe.generate(expanded, **cfg.sampling, negative_prompt=cfg.negative_prompt, labels=labels,
                           init_image=init, strength=cfg.strength)
    settings = how_sampled(cfg, pipe, images)
    out = Path(out_dir or cfg.out_dir or run_dir(cfg) / "samples")
    grid = save_grid(images, out / "grid.png", nrow=cfg.n_per_prompt, captions=prompts,
                     scale=max(1, 128 // pipe.resolution), text={**settings, "prompts": json.dumps(prompts)})
    files = []
    for i, img in enumerate(images):
        name = f"{i // cfg.n_per_prompt:02d}_{slug(expanded[i])}_{i % cfg.n_per_prompt}.png"
        save_png(img, out / name, {"prompt": expanded[i], **settings, "batch_index": i})
        files.append({"file": name, "prompt": expanded[i], "batch_index": i})
    log.info("wrote %s and %d single PNGs in %s (how each was made: in its PNG text and metrics.json)", grid,
             len(images), out)
    result = {"grid": str(grid), "num_images": len(images), "sampling": settings, "images": files}
    if pipe.config.get("data") == "shapes" and labels is None:
        from ldm_train.data.shapes import caption_alignment

        result["caption_alignment"] = caption_alignment(images, expanded)
        log.info("caption alignment of these samples: %.3f", result["caption_alignment"])
    return result
