"""diffusers component configs ↔ our configs (U-Net, autoencoder architecture, noise schedule, sampling).

The conventions that differ between the two worlds are explicit fields, never special cases:
    flip_sin_to_cos     timestep embedding [cos, sin] (SD) or [sin, cos] (ours by default)      → unet config
    upcast_attention    attention in fp32 under half precision (SD 2.x 768-px v)                → unet config
    head count / width  diffusers' `attention_head_dim` is a head count per level (its SD 1.x naming quirk);
                        one count everywhere → `num_heads`, one width → `num_head_channels`   → unet config
    use_linear_projection  Linear (SD 2.x) or 1×1-conv (SD 1.x) proj_in/out: a weight layout only → `interop`
    timestep_spacing, steps_offset, set_alpha_to_one  the scheduler's inference grid           → sampling config
    scaling_factor      the VAE's stored latent scale (0.18215 for SD's VAE)                    → calibration.json
"""

from __future__ import annotations

from typing import Any

from ldm_train.config import ConfigError
from ldm_train.models.regularizers import regularizer_class

# diffusers UNet2DConditionModel options our U-Net implements only at these values (anything else is refused).
UNET_FIXED: dict[str, Any] = {
    "act_fn": "silu", "addition_embed_type": None, "center_input_sample": False, "class_embed_type": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_norm": None, "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "freq_shift": 0, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-5, "num_class_embeds": None,
    "only_cross_attention": False, "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "time_cond_proj_dim": None, "time_embedding_act_fn": None,
    "time_embedding_dim": None, "time_embedding_type": "positional", "timestep_post_act": None,
    "attention_type": "default", "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "reverse_transformer_layers_per_block": None, "addition_time_embed_dim": None,
}
VAE_FIXED: dict[str, Any] = {"act_fn": "silu", "mid_block_add_attention": True, "use_quant_conv": True,
                             "use_post_quant_conv": True, "shift_factor": None, "latents_mean": None,
                             "latents_std": None}
SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}
SAMPLERS = {"DDIMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpmpp_2m", "DDPMScheduler": "ddpm"}


def _refuse_unsupported(config: dict, fixed: dict, what: str) -> None:
    bad = {k: config[k] for k, v in fixed.items() if k in config and config[k] != v and
           not (isinstance(v, float) and isinstance(config[k], (int, float)) and abs(config[k] - v) < 1e-12)}
    if bad:
        raise ConfigError(f"{what} uses options our model does not implement: "
                          + ", ".join(f"{k}={v!r} (supported: {fixed[k]!r})" for k, v in sorted(bad.items())))


def _per_level(value: Any, levels: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels:
        raise ConfigError(f"unet/config.json: {name} has {len(values)} entries for {levels} levels")
    return values


# ------------------------------------------------------------------------------------------------ U-Net

def unet_from_diffusers(config: dict) -> tuple[dict, dict]:
    """diffusers UNet2DConditionModel config → (our `unet` config, interop options)."""
    _refuse_unsupported(config, UNET_FIXED, "unet/config.json")
    widths = list(config["block_out_channels"])
    mc, levels = widths[0], len(widths)
    if any(w % mc for w in widths):
        raise ConfigError(f"unet/config.json: block_out_channels {widths} are not multiples of the first")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    attention = [i for i, t in enumerate(down) if t == "CrossAttnDownBlock2D"]
    known_down, known_up = {"CrossAttnDownBlock2D", "DownBlock2D"}, {"CrossAttnUpBlock2D", "UpBlock2D"}
    mirrored = [levels - 1 - i for i, t in enumerate(up) if t == "CrossAttnUpBlock2D"]
    if set(down) - known_down or set(up) - known_up or sorted(mirrored) != attention:
        raise ConfigError(f"unet/config.json: block types {down} / {up} are not the SD layout (CrossAttn/plain "
                          "down blocks mirrored by the up blocks)")
    res = set(_per_level(config["layers_per_block"], levels, "layers_per_block"))
    depth = set(_per_level(config.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block"))
    if len(res) != 1 or len(depth) != 1:
        raise ConfigError("unet/config.json: a different layers_per_block or transformer_layers_per_block per "
                          "level is not supported")
    heads = _per_level(config.get("num_attention_heads") or config["attention_head_dim"], levels, "attention heads")
    used = [i for i in attention] + [levels - 1]  # the attention levels and the middle block
    counts, head_widths = {heads[i] for i in used}, {widths[i] // heads[i] for i in used}
    if len(counts) == 1:
        head_cfg = dict(num_heads=heads[used[0]], num_head_channels=widths[0] // heads[used[0]])
    elif len(head_widths) == 1 and all(widths[i] % heads[i] == 0 for i in used):
        head_cfg = dict(num_heads=None, num_head_channels=head_widths.pop())
    else:
        raise ConfigError(f"unet/config.json: head counts {heads} give neither one count nor one head width")
    unet = dict(in_channels=config["in_channels"], out_channels=config["out_channels"], model_channels=mc,
                channel_mult=[w // mc for w in widths], num_res_blocks=res.pop(), attention_levels=attention,
                mid_attention=True, transformer_depth=depth.pop(), context_dim=config["cross_attention_dim"],
                num_groups=config["norm_num_groups"], dropout=float(config.get("dropout", 0.0)),
                gradient_checkpointing=False, flip_sin_to_cos=bool(config["flip_sin_to_cos"]),
                upcast_attention=bool(config.get("upcast_attention", False)), **head_cfg)
    interop = dict(use_linear_projection=bool(config.get("use_linear_projection", False)),
                   sample_size=int(config["sample_size"]))
    return unet, interop


def unet_to_diffusers(unet: dict, interop: dict, sample_size: int) -> dict:
    """Our `unet` config → diffusers UNet2DConditionModel kwargs."""
    mc, mult = unet["model_channels"], list(unet["channel_mult"])
    levels, attention = len(mult), set(unet["attention_levels"])
    if not unet.get("mid_attention", True):
        raise ConfigError("a U-Net without mid-block attention has no diffusers UNet2DConditionModel equivalent")
    widths = [mc * m for m in mult]
    if unet.get("num_heads"):
        heads = [unet["num_heads"]] * levels
    else:
        heads = [max(1, w // unet["num_head_channels"]) for w in widths]
    # unet.pooled_text: MLP(mean caption token) added to the timestep embedding = diffusers' "projection" class
    # embedding, called with class_labels=prompt_embeds.mean(dim=1)
    pooled = dict(class_embed_type="projection", projection_class_embeddings_input_dim=unet["context_dim"]) \
        if unet.get("pooled_text") else {}
    return dict(**pooled, sample_size=sample_size, in_channels=unet.get("in_channels", 4),
                out_channels=unet.get("out_channels") or unet.get("in_channels", 4), block_out_channels=widths,
                layers_per_block=unet["num_res_blocks"],
                down_block_types=["CrossAttnDownBlock2D" if i in attention else "DownBlock2D" for i in range(levels)],
                up_block_types=["CrossAttnUpBlock2D" if i in attention else "UpBlock2D"
                                for i in reversed(range(levels))],
                cross_attention_dim=unet["context_dim"], attention_head_dim=heads,
                transformer_layers_per_block=unet.get("transformer_depth", 1), norm_num_groups=unet["num_groups"],
                flip_sin_to_cos=bool(unet.get("flip_sin_to_cos", False)), freq_shift=0,
                upcast_attention=bool(unet.get("upcast_attention", False)),
                use_linear_projection=bool(interop.get("use_linear_projection", True)),
                dropout=float(unet.get("dropout", 0.0)))


# ------------------------------------------------------------------------------------------------ autoencoder

def vae_from_diffusers(config: dict) -> tuple[dict, float]:
    """diffusers AutoencoderKL config → (our autoencoder architecture, the stored scaling_factor)."""
    _refuse_unsupported(config, VAE_FIXED, "vae/config.json")
    widths = list(config["block_out_channels"])
    ch = widths[0]
    if set(config["down_block_types"]) != {"DownEncoderBlock2D"} or \
            set(config["up_block_types"]) != {"UpDecoderBlock2D"} or any(w % ch for w in widths):
        raise ConfigError(f"vae/config.json: blocks {config['down_block_types']} / {config['up_block_types']} "
                          f"widths {widths} are not the SD VAE layout")
    if config["in_channels"] != config["out_channels"]:
        raise ConfigError("vae/config.json: in_channels != out_channels is not supported")
    arch = dict(f=2 ** (len(widths) - 1), in_channels=config["in_channels"], resolution=config["sample_size"],
                ch=ch, num_res_blocks=config["layers_per_block"], num_groups=config["norm_num_groups"], dropout=0.0,
                z_channels=config["latent_channels"], ch_mult=[w // ch for w in widths], attn_resolutions=[],
                regularizer={"name": "kl", "sample": True})
    return arch, float(config.get("scaling_factor", 0.18215))


def vae_to_diffusers(arch: dict, scale_factor: float) -> dict:
    """Our KL autoencoder architecture → diffusers AutoencoderKL kwargs."""
    kind = arch["regularizer"]["name"]
    if not regularizer_class(kind).diffusers_vae or arch.get("attn_resolutions"):
        raise ConfigError(f"only a KL autoencoder without attention outside its mid blocks (attn_resolutions: []) "
                          f"has a diffusers AutoencoderKL equivalent; this model's first stage is {kind}")
    levels = len(arch["ch_mult"])
    return dict(in_channels=arch["in_channels"], out_channels=arch["in_channels"],
                block_out_channels=[arch["ch"] * m for m in arch["ch_mult"]], layers_per_block=arch["num_res_blocks"],
                down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
                latent_channels=arch["z_channels"], norm_num_groups=arch["num_groups"],
                sample_size=arch["resolution"], scaling_factor=float(scale_factor))


# ------------------------------------------------------------------------------------------------ schedule

def schedule_from_diffusers(config: dict) -> tuple[dict, dict, list[str]]:
    """A full scheduler config (diffusers' defaults filled in) → (our `diffusion` schedule keys, sampling keys,
    notes on what had no exact equivalent)."""
    notes = []
    if config.get("trained_betas") is not None or config.get("rescale_betas_zero_snr"):
        raise ConfigError("scheduler/config: trained_betas / rescale_betas_zero_snr are not supported")
    if config["beta_schedule"] not in SCHEDULES or config["prediction_type"] not in PREDICTIONS:
        raise ConfigError(f"scheduler/config: beta_schedule={config['beta_schedule']!r}, "
                          f"prediction_type={config['prediction_type']!r}; supported: {list(SCHEDULES)}, "
                          f"{list(PREDICTIONS)}")
    diffusion = dict(num_timesteps=int(config["num_train_timesteps"]), schedule=SCHEDULES[config["beta_schedule"]],
                     beta_start=float(config["beta_start"]), beta_end=float(config["beta_end"]),
                     prediction_type=PREDICTIONS[config["prediction_type"]])
    cls = config.get("_class_name", "")
    sampler = SAMPLERS.get(cls, "ddim")
    if cls not in SAMPLERS:
        notes.append(f"scheduler {cls} has no sampler of ours: sampling defaults to DDIM on its timestep grid")
    sampling = dict(sampler=sampler, steps=50, guidance_scale=7.5, eta=0.0, seed=0,
                    timestep_spacing=config.get("timestep_spacing", "leading"),
                    steps_offset=int(config.get("steps_offset", 0)),
                    final_alpha_one=bool(config.get("set_alpha_to_one", True)))
    return diffusion, sampling, notes


def schedule_to_diffusers(diffusion: dict, sampling: dict) -> dict:
    """Our schedule + sampling settings → DDIMScheduler kwargs (the scheduler an exported pipeline ships)."""
    inverse_schedule = {v: k for k, v in SCHEDULES.items()}
    inverse_prediction = {v: k for k, v in PREDICTIONS.items()}
    return dict(num_train_timesteps=diffusion["num_timesteps"], beta_start=diffusion["beta_start"],
                beta_end=diffusion["beta_end"], beta_schedule=inverse_schedule[diffusion["schedule"]],
                prediction_type=inverse_prediction[diffusion["prediction_type"]], clip_sample=False,
                set_alpha_to_one=bool(sampling.get("final_alpha_one", True)),
                steps_offset=int(sampling.get("steps_offset", 0)),
                timestep_spacing=sampling.get("timestep_spacing", "trailing"))
