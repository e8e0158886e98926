"""Text-to-image (and img2img) generation: text encoder → CFG sampler in latent space → first-stage decoder."""

from __future__ import annotations

import torch
from torch import nn

from ldm_train.diffusion.guidance import cfg_model_fn
from ldm_train.diffusion.samplers import sample
from ldm_train.diffusion.schedules import NoiseSchedule
from ldm_train.pipeline.first_stage import FirstStage


@torch.no_grad()
def generate(unet: nn.Module, text_encoder: nn.Module, first_stage: FirstStage, schedule: NoiseSchedule,
             prompts: list[str], *, resolution: int, prediction_type: str = "eps", guidance_scale: float = 3.0,
             sampler: str = "ddim", steps: int = 50, eta: float = 0.0, seed: int = 0, negative_prompt: str = "",
             labels: torch.Tensor | None = None, init_image: torch.Tensor | None = None,
             strength: float = 1.0) -> torch.Tensor:
    """One image per prompt (repeat prompts for more), in [-1, 1], shape (N, 3, H, W).

    The unconditional CFG branch is the negative prompt's encoding, or the null conditioning when it is empty.
    img2img: `init_image` (N or 1, 3, H, W) is encoded, noised to t = strength·T and denoised from there;
    strength 0 returns its reconstruction, strength 1 ignores it.
    """
    device = next(unet.parameters()).device
    n = len(prompts)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    context = text_encoder(list(prompts), labels=labels)  # (N, L, D)
    null = text_encoder([negative_prompt] * n, labels=labels) if negative_prompt else text_encoder.null(n)
    shape = (n, *first_stage.latent_shape(resolution))
    t_start = None
    x = torch.randn(shape, generator=gen).to(device)
    if init_image is not None:
        z0 = first_stage.encode(init_image.to(device).expand(n, -1, -1, -1), sample=False)
        if strength <= 0:
            return first_stage.decode(z0)
        if strength < 1:
            t_start = min(schedule.num_timesteps - 1, max(0, round(strength * schedule.num_timesteps) - 1))
            t = torch.full((n,), t_start, dtype=torch.long, device=device)
            x = schedule.q_sample(z0, t, x)
    model_fn = cfg_model_fn(unet, context, null.to(context.dtype), guidance_scale, schedule, prediction_type)
    z = sample(model_fn, x, schedule, sampler=sampler, steps=steps, eta=eta, generator=gen, t_start=t_start)
    return first_stage.decode(z)
