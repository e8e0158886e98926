"""Our diffusion artifact → a diffusers `StableDiffusionPipeline` folder (written atomically).

A model with a CLIP text tower exports whole; with another text encoder (minilm, scratch, class) only the VAE and
the U-Net are written (diffusers' SD pipeline needs a CLIPTextModel + CLIPTokenizer), and the caller is told so.
"""

from __future__ import annotations

import json
from pathlib import Path

from ldm_train.config import ConfigError
from ldm_train.interop.configs import schedule_to_diffusers, unet_to_diffusers, vae_to_diffusers
from ldm_train.interop.keys import autoencoder_table, to_theirs, unet_table
from ldm_train.utils.io import atomic_write_dir


def diffusers_modules(pipe) -> tuple:
    """(AutoencoderKL, UNet2DConditionModel, DDIMScheduler) holding the pipeline's weights and settings."""
    from ldm_train.models.unet import UNet

    if not isinstance(pipe.denoiser, UNet):
        raise ConfigError(f"this model's denoiser is a {type(pipe.denoiser).__name__}, which has no diffusers "
                          "UNet2DConditionModel form: format=diffusers and format=single_file export U-Net models "
                          "only; keep the artifact itself (stage=sample reads it)")
    import diffusers

    first = pipe.first_stage
    interop = pipe.config.get("interop", {})
    vae = diffusers.AutoencoderKL(**vae_to_diffusers(first.autoencoder.arch, first.diffusers_scaling_factor()))
    vae.load_state_dict(to_theirs(first.autoencoder.state_dict(), autoencoder_table(first.autoencoder)), strict=True)
    unet_cfg = dict(pipe.config["unet"], in_channels=pipe.first_stage.latent_channels)
    unet = diffusers.UNet2DConditionModel(**unet_to_diffusers(unet_cfg, interop,
                                                              pipe.resolution // first.f))
    table = unet_table(pipe.denoiser, unet.config.use_linear_projection)
    unet.load_state_dict(to_theirs(pipe.denoiser.state_dict(), table), strict=True)
    scheduler = diffusers.DDIMScheduler(**schedule_to_diffusers(pipe.config["diffusion"], pipe.sampling))
    return vae, unet, scheduler


def pooled_text_notes(unet) -> list[str]:
    """How to call an exported U-Net with a pooled-text path (`unet.pooled_text`), which diffusers' pipelines do not."""
    if unet.config.class_embed_type != "projection":
        return []
    return ["the U-Net was trained with unet.pooled_text=true, exported as class_embed_type='projection': call it "
            "with class_labels=prompt_embeds.mean(dim=1) (the mean over all caption tokens); StableDiffusionPipeline "
            "does not pass class_labels, so run the denoising loop yourself"]


def export_diffusers(pipe, out: Path) -> list[str]:
    """Write `out` as a diffusers folder; returns notes (what was left out and why)."""
    import diffusers

    from ldm_train.models.text import ClipTextEncoder

    vae, unet, scheduler = diffusers_modules(pipe)  # refuses a first stage diffusers has no AutoencoderKL for
    notes = pooled_text_notes(unet)
    if isinstance(pipe.text_encoder, ClipTextEncoder):
        tokenizer = pipe.text_encoder.tokenizer
        tokenizer.model_max_length = pipe.text_encoder.max_length  # diffusers pads prompts to this length
        sd = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=pipe.text_encoder.model, tokenizer=tokenizer,
                                               unet=unet, scheduler=scheduler, safety_checker=None,
                                               feature_extractor=None, requires_safety_checker=False)

        def write(tmp: Path) -> None:
            sd.save_pretrained(tmp, safe_serialization=True)
    else:
        kind = pipe.config["text_encoder"].get("name")
        notes.append(f"text_encoder={kind} is not a CLIP text tower: exported vae/, unet/ and scheduler/ only "
                     "(no model_index.json); load them as AutoencoderKL / UNet2DConditionModel and pass "
                     "prompt_embeds from our text encoder")

        def write(tmp: Path) -> None:
            vae.save_pretrained(tmp / "vae", safe_serialization=True)
            unet.save_pretrained(tmp / "unet", safe_serialization=True)
            scheduler.save_pretrained(tmp / "scheduler")
            (tmp / "ldm_train_export.json").write_text(json.dumps({"notes": notes}, indent=2) + "\n")

    atomic_write_dir(Path(out), write)
    return notes
