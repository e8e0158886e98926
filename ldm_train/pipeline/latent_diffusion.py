"""The trained model at the seam: frozen first stage (with its scale factor), denoiser, text encoder,
parameterisation and default sampling settings, loaded from and saved as one diffusion artifact.

Every caller that makes images (validation grids, `stage=sample`, `stage=evaluate`, caption-alignment scoring,
the benchmarks) goes through `LatentDiffusionPipeline.generate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm_train.config import ConfigError
from ldm_train.diffusion.parameterization import Parameterization, build_parameterization
from ldm_train.models.denoisers import build_network
from ldm_train.models.lora import has_lora, merged_copy
from ldm_train.models.text import Conditioner, build_text_encoder
from ldm_train.pipeline.artifacts import load_weights, read_diffusion, save_diffusion
from ldm_train.pipeline.first_stage import FirstStage

SAMPLING_KEYS = ("sampler", "steps", "guidance_scale", "eta", "seed", "timestep_spacing", "steps_offset",
                 "final_alpha_one", "guidance_rescale", "height", "width")
# the sampling settings of artifacts written before these keys existed (today's grid, no rescale, the training size)
GRID_DEFAULTS = {"timestep_spacing": "trailing", "steps_offset": 0, "final_alpha_one": True, "guidance_rescale": 0.0}


def build_denoiser(unet_cfg: Mapping[str, Any], latent_channels: int, context_dim: int,
                   size_conditioning: bool = False) -> nn.Module:
    """The denoising network of a `unet` config (U-Net or DiT, by `kind`), checked against the latents and the text
    encoder's width."""
    cfg = dict(unet_cfg)
    if size_conditioning:
        cfg["size_conditioning"] = True
    if cfg["context_dim"] != context_dim:
        raise ConfigError(f"unet.context_dim={cfg['context_dim']} but the text encoder's width is {context_dim}; "
                          "leave unet.context_dim=${text_encoder.dim} or set it to the encoder's width")
    in_channels = cfg.pop("in_channels", latent_channels)
    if in_channels != latent_channels:
        raise ConfigError(f"unet.in_channels={in_channels} but the autoencoder's latents have {latent_channels} "
                          "channels; remove the override (it follows the artifact)")
    return build_network(cfg, latent_channels)


def sampling_settings(sampling: Mapping[str, Any]) -> dict:
    """The SAMPLING_KEYS of a sampling node; a grid key left null (or absent) takes GRID_DEFAULTS."""
    given = {k: v for k, v in sampling.items() if v is not None}
    return {k: {**GRID_DEFAULTS, **given}.get(k) for k in SAMPLING_KEYS}


def with_local_paths(config: dict, artifact: Path) -> dict:
    """A text encoder stored inside the artifact (an imported CLIP tower) is named relative to it, so the
    artifact can move; resolve that name against the artifact's folder."""
    name = config.get("text_encoder", {}).get("name_or_path")
    if isinstance(name, str) and not Path(name).is_absolute() and (Path(artifact) / name).is_dir():
        return {**config, "text_encoder": {**config["text_encoder"], "name_or_path": str(Path(artifact) / name)}}
    return config


def size_conditioned(net: nn.Module, values: list[float], n: int):
    """net(x, t, context) with size_cond = `values` for the n conditional rows, zeros for an unconditional half."""
    cond = torch.tensor(values, dtype=torch.float32).expand(n, -1)

    def call(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        sc = cond if x.shape[0] == n else torch.cat([torch.zeros_like(cond), cond])  # [uncond, cond] batches
        return net(x, t, context=context, size_cond=sc.to(x.device))

    return call


class LatentDiffusionPipeline:
    """Text → latent sampler with CFG → first-stage decoder. `config` is what the artifact's config.yaml holds:
    {unet, text_encoder, diffusion, sampling, resolution, latent_channels, f, regularizer, data}."""

    def __init__(self, first_stage: FirstStage, denoiser: nn.Module, text_encoder: Conditioner,
                 parameterization: Parameterization, config: dict):
        self.first_stage, self.denoiser, self.text_encoder = first_stage, denoiser, text_encoder
        self.parameterization = parameterization
        self.config = config
        self.resolution = int(config["resolution"])
        self.sampling = sampling_settings(config.get("sampling", {}))

    # ------------------------------------------------------------------------------------------- build / load

    @staticmethod
    def artifact_config(*, unet: dict, text_encoder: dict, diffusion: dict, sampling: dict, resolution: int,
                        first_stage: FirstStage, data: str) -> dict:
        """Everything needed to rebuild and sample the model: the artifact's config.yaml."""
        return {"unet": dict(unet), "text_encoder": dict(text_encoder), "diffusion": dict(diffusion),
                "sampling": sampling_settings(sampling), "resolution": int(resolution),
                "latent_channels": first_stage.latent_channels, "f": first_stage.f,
                "regularizer": first_stage.regularizer.name, "data": data}

    @classmethod
    def build(cls, first_stage: FirstStage, config: dict) -> LatentDiffusionPipeline:
        """Fresh (untrained) denoiser and text encoder for `config` (see `artifact_config`)."""
        text_encoder = build_text_encoder(config["text_encoder"])
        denoiser = build_denoiser(config["unet"], first_stage.latent_channels, text_encoder.dim,
                                  bool(config["diffusion"].get("size_conditioning", False)))
        return cls(first_stage, denoiser, text_encoder, build_parameterization(config["diffusion"]), config)

    @classmethod
    def from_artifact(cls, path: Path | str) -> LatentDiffusionPipeline:
        """Load a diffusion artifact (EMA weights) with the autoencoder it was trained on; frozen, eval mode."""
        path = Path(path)
        config, ae_path = read_diffusion(path)
        config = with_local_paths(config, path)
        latent_norm = config["diffusion"].get("latent_norm", "global")  # artifacts from before the option: global
        pipe = cls.build(FirstStage.from_artifact(ae_path, latent_norm=latent_norm), config)
        if (path / "text_encoder.safetensors").exists():
            pipe.text_encoder.load_state_dict(load_weights(path / "text_encoder.safetensors"))
        pipe.denoiser.load_state_dict(load_weights(path / "model.safetensors"))
        pipe.denoiser.eval().requires_grad_(False)
        pipe.text_encoder.eval().requires_grad_(False)
        return pipe

    @classmethod
    def init_from(cls, path: Path | str, overrides: Mapping[str, Any]) -> LatentDiffusionPipeline:
        """Start training from a diffusion artifact (imported or ours): its autoencoder, architectures and weights,
        with `overrides` (the run's `diffusion` training settings, `data`, `resolution`) replacing config keys.
        The denoiser (and a jointly trained text encoder) is trainable again; a frozen encoder stays frozen."""
        pipe = cls.from_artifact(path)
        pipe.config = {**pipe.config, **overrides}
        pipe.resolution = int(pipe.config["resolution"])
        pipe.denoiser.train().requires_grad_(True)
        if getattr(pipe.text_encoder, "trainable", False):
            pipe.text_encoder.train().requires_grad_(True)
        return pipe

    def save(self, path: Path | str, metrics: dict, provenance: dict | None = None) -> None:
        """Write the diffusion artifact (atomically): denoiser, a jointly trained text encoder, config, the
        autoencoder reference (path + content hash), metrics, and where the weights came from (provenance). A LoRA'd
        denoiser is stored merged (model.safetensors loads as any U-Net), its adapter alone in
        `lora/pytorch_lora_weights.safetensors` (diffusers' `load_lora_weights` format)."""
        trained_text = self.text_encoder if getattr(self.text_encoder, "trainable", False) else None
        denoiser, extra = self.denoiser, None
        if has_lora(self.denoiser):  # LoRA: the merged U-Net, plus the adapter alone in diffusers' format
            from ldm_train.interop.lora import save_diffusers_lora

            denoiser = merged_copy(self.denoiser)
            # diffusers' proj_in/proj_out layout of this model (SD 1.x: 1×1 convs); ours and SD 2.x: Linear
            linear = bool(self.config.get("interop", {}).get("use_linear_projection", True))

            def extra(tmp: Path) -> None:
                save_diffusers_lora(self.denoiser, denoiser, tmp / "lora", linear)
        save_diffusion(Path(path), denoiser, trained_text, self.config, self.first_stage.path, metrics,
                       provenance, extra)

    def to(self, device: torch.device | str) -> LatentDiffusionPipeline:
        for part in (self.first_stage, self.denoiser, self.text_encoder):
            part.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    # ------------------------------------------------------------------------------------------------ sample

    @torch.no_grad()
    def sampling_settings(self, **given) -> dict:
        """The settings `generate(**given)` samples with: the pipeline's defaults (`config["sampling"]`) overridden by
        the given values that are not None."""
        return {**self.sampling, **{k: v for k, v in given.items() if v is not None}}

    def generate(self, prompts: list[str], *, sampler: str | None = None, steps: int | None = None,
                 guidance_scale: float | None = None, eta: float | None = None, seed: int | None = None,
                 negative_prompt: str = "", labels: torch.Tensor | None = None,
                 init_image: torch.Tensor | None = None, strength: float = 1.0,
                 resolution: int | None = None, timestep_spacing: str | None = None,
                 steps_offset: int | None = None, final_alpha_one: bool | None = None,
                 guidance_rescale: float | None = None, height: int | None = None, width: int | None = None,
                 original_size: tuple[int, int] | None = None, crop_top_left: tuple[int, int] = (0, 0)
                 ) -> torch.Tensor:
        """One image per prompt (repeat prompts for more), in [-1, 1], shape (N, 3, H, W).

        Sampling settings left at None take the pipeline's defaults (`config["sampling"]`). The image is height ×
        width (each defaults to `resolution`, else the training resolution), e.g. an aspect bucket's size. The
        unconditional CFG branch is the negative prompt's encoding, or the null conditioning when it is empty.
        img2img: `init_image` (N or 1, 3, H, W) is encoded, noised to the objective's time for `strength`
        (t = strength·T for ddpm, t = strength for flow) and denoised from there; strength 0 returns its
        reconstruction, strength 1 ignores it. `sampler` auto is the objective's default (ddim for ddpm, euler for
        flow). A size-conditioned model is told `original_size` (default: the target size) and `crop_top_left`
        (default: no crop); the unconditional CFG branch gets zeros, as in training's dropout.
        """
        s = self.sampling_settings(sampler=sampler, steps=steps, guidance_scale=guidance_scale, eta=eta, seed=seed,
                                   timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                                   final_alpha_one=final_alpha_one, guidance_rescale=guidance_rescale, height=height,
                                   width=width)
        device, n = self.device, len(prompts)
        gen = torch.Generator(device="cpu").manual_seed(int(s["seed"]))
        context = self.text_encoder(list(prompts), labels=labels)  # (N, L, D)
        null = self.text_encoder.unconditional(negative_prompt, n)
        side = resolution or self.resolution
        shape = (n, *self.first_stage.latent_shape(int(s["height"] or side), int(s["width"] or side)))
        x = torch.randn(shape, generator=gen).to(device)
        t_start, param = None, self.parameterization
        sampler = param.sampler(s["sampler"])  # refuses a sampler of the other objective before any work
        if init_image is not None:
            z0 = self.first_stage.encode(init_image.to(device).expand(n, -1, -1, -1), sample=False)
            if strength <= 0:
                return self.first_stage.decode(z0)
            if strength < 1:
                t_start = param.start_time(strength)
                x = param.noised(z0, param.time_batch(t_start, n, device), x)
        net = self.denoiser
        if getattr(net, "size_embed", None) is not None:
            h, w = shape[-2] * self.first_stage.f, shape[-1] * self.first_stage.f
            net = size_conditioned(net, [*(original_size or (h, w)), *crop_top_left, h, w], n)
        model_fn = param.guided_model_fn(net, context, null.to(context.dtype), float(s["guidance_scale"]),
                                         guidance_rescale=float(s["guidance_rescale"] or 0.0))
        z = sampler(model_fn, x, param.schedule, int(s["steps"]), eta=float(s["eta"]), generator=gen,
                    t_start=t_start, **param.grid_options(s))
        return self.first_stage.decode(z)
