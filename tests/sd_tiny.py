"""A tiny random Stable Diffusion pipeline in the diffusers folder layout, built offline for the interop tests."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

# SD 1.x in miniature: the same block types and conventions (flip_sin_to_cos, conv proj_in, `attention_head_dim`
# = number of heads, scaled_linear betas, leading spacing with steps_offset 1), widths a few hundred times smaller.
UNET_SD1 = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
                norm_num_groups=8)
# SD 2.x in miniature: linear proj_in, a fixed head width (here 8) so the head count grows with the width, upcast.
UNET_SD2 = dict(UNET_SD1, attention_head_dim=(4, 8), use_linear_projection=True, upcast_attention=True,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           norm_num_groups=8, sample_size=64)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def tiny_tokenizer(folder: Path):
    """A CLIP BPE tokenizer over single letters (word-final letters carry `</w>`), no merges."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=16)
    assert tok(["ab"]).input_ids == [[0, vocab["a"], vocab["b</w>"], 1]]
    return tok


def tiny_sd(folder: Path, version: int = 1, seed: int = 0, prediction_type: str = "epsilon"):
    """Build, randomise (every zero-initialised tensor gets values) and `save_pretrained` a tiny SD pipeline."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(Path(folder) / "_tok")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(**(UNET_SD1 if version == 1 else UNET_SD2))
    vae = AutoencoderKL(**VAE)
    with torch.no_grad():
        for module in (unet, vae):
            for p in module.parameters():
                if not p.any():
                    p.normal_(0, 0.2)
    scheduler = DDIMScheduler(**SCHEDULER, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return pipe
