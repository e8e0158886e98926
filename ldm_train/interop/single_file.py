"""Original single-file Stable Diffusion checkpoints (CompVis names: `first_stage_model.`, `model.diffusion_model.`,
`cond_stage_model.`) ↔ the diffusers layout, through diffusers' own converters; from there the key table of
`keys.py` gives our modules.

A single file holds weights only. The configs come from, in this order: `import.config=<diffusers folder>`; the
`ldm_train` metadata our own `format=single_file` export writes; else the checkpoint's shapes plus what shapes
cannot tell (`import.*` options, SD defaults: 32 GroupNorm groups, 8 heads for SD 1.x, head width 64 for 2.x).
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm_train.config import ConfigError

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP, OPEN_CLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
# tensors a CompVis training checkpoint holds besides the networks: the noise schedule's buffers, the training
# loss (LPIPS + discriminator of a VAE checkpoint) and the EMA copy; counted and left out
SCHEDULE_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "logvar"}
LEFT_OUT_PREFIXES = ("model_ema.", "loss.")
METADATA_KEY = "ldm_train.configs"  # safetensors metadata of our export: the diffusers configs + tokenizer files


@dataclass
class Layout:
    """The diffusers configs a single file's weights are read with (`text` is a CLIPTextConfig dict)."""

    unet: dict | None
    vae: dict
    scheduler: dict | None
    text: dict | None
    tokenizer: Path | None
    origin: str  # where the configs came from, for the log and the artifact


def family(state: dict) -> str:
    """What the file holds: `sd1` (CLIP ViT text tower), `sd2` (OpenCLIP), `unet_vae` (no text tower) or
    `vae` (a VAE alone, e.g. SD's ft-MSE VAE release, with or without the `first_stage_model.` prefix)."""
    if any(k.startswith(UNET) for k in state):
        if any(k.startswith(CLIP) for k in state):
            return "sd1"
        return "sd2" if any(k.startswith(OPEN_CLIP) for k in state) else "unet_vae"
    if any(k.startswith(VAE) or k.startswith("encoder.") for k in state):
        return "vae"
    raise ConfigError("the file holds neither `model.diffusion_model.` (U-Net) nor `first_stage_model.` / "
                      "`encoder.` (VAE) tensors: not an original Stable Diffusion checkpoint")


def _with_defaults(cls: type, config: dict) -> dict:
    """A diffusers model config with the class's constructor defaults filled in (no model is built)."""
    defaults = {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **config}


def _indices(keys: list[str], pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})


def _ldm_unet_params(shapes: dict[str, torch.Size], options: dict, fam: str) -> dict:
    """The `unet_config.params` of an original LDM config, read off the tensor shapes (+ the head options)."""
    keys = list(shapes)
    mc, in_ch = shapes["input_blocks.0.0.weight"][:2]
    downs = _indices(keys, r"input_blocks\.(\d+)\.0\.op\.weight$")
    levels = len(downs) + 1
    n_in = len(_indices(keys, r"input_blocks\.(\d+)\."))
    layers = (n_in - 1 - len(downs)) // levels
    first = [1 + level * (layers + 1) for level in range(levels)]  # each level's first block
    mult = [shapes[f"input_blocks.{i}.0.out_layers.3.weight"][0] // mc for i in first]
    attention = [level for level, i in enumerate(first) if f"input_blocks.{i}.1.proj_in.weight" in shapes]
    proj = next(k for k in keys if k.endswith(".proj_in.weight"))
    depth = len(_indices([k for k in keys if k.startswith(proj.removesuffix("proj_in.weight"))],
                         r".*\.transformer_blocks\.(\d+)\."))
    context = shapes[next(k for k in keys if k.endswith("attn2.to_k.weight"))][1]
    params = dict(in_channels=in_ch, out_channels=shapes["out.2.weight"][0], model_channels=mc, channel_mult=mult,
                  num_res_blocks=layers, attention_resolutions=[2 ** level for level in attention],
                  transformer_depth=depth, context_dim=context, use_linear_in_transformer=len(shapes[proj]) == 2)
    if options.get("num_heads") not in (None, "auto"):
        params["num_heads"] = int(options["num_heads"])
    elif fam == "sd2" or params["use_linear_in_transformer"]:
        params["num_head_channels"] = 64 if options.get("head_channels") in (None, "auto") \
            else int(options["head_channels"])
    else:
        params["num_heads"] = 8  # SD 1.x
    if "num_head_channels" in params and not params["use_linear_in_transformer"]:
        raise ConfigError("import.head_channels needs a U-Net with Linear proj_in (SD 2.x); give import.num_heads")
    return params


def _ldm_vae_params(shapes: dict[str, torch.Size]) -> dict:
    """The first stage's `ddconfig` of an original LDM config, read off the tensor shapes."""
    keys = list(shapes)
    ch, in_ch = shapes["encoder.conv_in.weight"][:2]
    levels = _indices(keys, r"encoder\.down\.(\d+)\.")
    mult = [shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] // ch for i in levels]
    return dict(ch=ch, ch_mult=mult, num_res_blocks=len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\.")),
                in_channels=in_ch, out_ch=shapes["decoder.conv_out.weight"][0],
                z_channels=shapes["decoder.conv_in.weight"][1], attn_resolutions=[], double_z=True, dropout=0.0)


def _text_config(state: dict, fam: str, tokenizer, options: dict) -> dict:
    """A CLIPTextConfig from the text tower's shapes; head count and activation are not in the shapes."""
    if fam == "sd1":
        p, layer = CLIP + "text_model.", r"text_model\.encoder\.layers\.(\d+)\."
        tok, pos, fc1 = (p + "embeddings.token_embedding.weight", p + "embeddings.position_embedding.weight",
                         p + "encoder.layers.0.mlp.fc1.weight")
        layers = len(_indices([k.removeprefix(CLIP) for k in state if k.startswith(CLIP)], layer))
    else:  # OpenCLIP: diffusers keeps all but the last layer (SD 2.x conditions on the penultimate one)
        tok, pos, fc1 = (OPEN_CLIP + "token_embedding.weight", OPEN_CLIP + "positional_embedding",
                         OPEN_CLIP + "transformer.resblocks.0.mlp.c_fc.weight")
        layers = len(_indices(list(state), re.escape(OPEN_CLIP) + r"transformer\.resblocks\.(\d+)\.")) - 1
    vocab, width = state[tok].shape
    heads = options.get("text_heads")
    return dict(vocab_size=vocab, hidden_size=width, intermediate_size=state[fc1].shape[0],
                num_hidden_layers=layers, max_position_embeddings=state[pos].shape[0],
                num_attention_heads=width // 64 if heads in (None, "auto") else int(heads),
                hidden_act="quick_gelu" if fam == "sd1" else "gelu", bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _sd_defaults(fam: str, options: dict) -> tuple[str, int, bool]:
    """(prediction type, resolution, upcast attention): SD 1.x ε at 512 px; SD 2.x v at 768 px with fp32
    attention (stable-diffusion-2-1); `import.prediction_type` / `import.resolution` override (2.x-base: eps, 512)."""
    prediction = {"eps": "epsilon", "v": "v_prediction", None: None, "auto": None}[options.get("prediction_type")]
    res = options.get("resolution")
    two = fam == "sd2"
    upcast = options.get("upcast_attention")
    return (prediction or ("v_prediction" if two else "epsilon"), 768 if two and res in (None, "auto") else
            512 if res in (None, "auto") else int(res), two if upcast in (None, "auto") else bool(upcast))


# ------------------------------------------------------------------------------------------------ import

def _layout(state: dict, fam: str, metadata: dict, options: dict, work: Path) -> Layout:
    """The diffusers configs for this file: `import.config` folder, else our export's metadata, else shapes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    from ldm_train.interop.diffusers_import import full_scheduler_config

    if options.get("config"):
        folder = Path(str(options["config"])).expanduser()

        def read(name: str) -> dict | None:
            path = folder / name
            return json.loads(path.read_text()) if path.exists() else None
        if read("vae/config.json") is None:
            raise ConfigError(f"import.config={folder} is not a diffusers pipeline folder (no vae/config.json)")
        sched = read("scheduler/scheduler_config.json")
        return Layout(read("unet/config.json"), read("vae/config.json"), sched and full_scheduler_config(sched),
                      read("text_encoder/config.json"),
                      folder / "tokenizer" if (folder / "tokenizer").is_dir() else None, f"import.config={folder}")
    if METADATA_KEY in metadata:
        stored = json.loads(metadata[METADATA_KEY])
        tokenizer = None
        if stored.get("tokenizer"):
            tokenizer = work / "tokenizer"
            tokenizer.mkdir(parents=True, exist_ok=True)
            for name, text in stored["tokenizer"].items():
                (tokenizer / name).write_text(text)
        return Layout(stored.get("unet"), stored["vae"], stored.get("scheduler"), stored.get("text"), tokenizer,
                      "the ldm_train metadata stored in the file")
    prediction, resolution, upcast = _sd_defaults(fam, options)
    groups = int(options.get("norm_groups") or 32)
    vae_prefix = VAE if any(k.startswith(VAE) for k in state) else ""
    vae_shapes = {k[len(vae_prefix):]: v.shape for k, v in state.items() if k.startswith(vae_prefix)}
    params: dict[str, Any] = {"first_stage_config": {"params": {"ddconfig": _ldm_vae_params(vae_shapes)}}}
    if options.get("scale_factor") not in (None, "auto"):
        params["scale_factor"] = float(options["scale_factor"])
    vae = sfu.create_vae_diffusers_config_from_ldm({"model": {"params": params}}, state)
    vae = _with_defaults(AutoencoderKL, {**vae, "sample_size": resolution, "norm_num_groups": groups})
    unet = scheduler = None
    if fam != "vae":
        params["unet_config"] = {"params": _ldm_unet_params({k[len(UNET):]: v.shape for k, v in state.items()
                                                             if k.startswith(UNET)}, options, fam)}
        unet = sfu.create_unet_diffusers_config_from_ldm({"model": {"params": params}}, state)
        f = 2 ** (len(vae["block_out_channels"]) - 1)
        unet = _with_defaults(UNet2DConditionModel, {**unet, "sample_size": resolution // f,
                                                     "upcast_attention": upcast, "norm_num_groups": groups})
        scheduler = full_scheduler_config({**sfu.SCHEDULER_DEFAULT_CONFIG, "prediction_type": prediction,
                                           "_class_name": "DDIMScheduler"})
    tokenizer = options.get("tokenizer")
    return Layout(unet, vae, scheduler, None, Path(str(tokenizer)).expanduser() if tokenizer else None,
                  "the checkpoint's shapes and import.* options")


def _consumed(given: dict[str, torch.Tensor], converted: dict[str, torch.Tensor], what: str) -> None:
    """diffusers' converters pick tensors by name patterns: every tensor of the part must have been picked."""
    used = {v.data_ptr() for v in converted.values()}
    left = sorted(k for k, v in given.items() if v.data_ptr() not in used)
    if left or len(converted) != len(given):
        from ldm_train.interop.keys import KeyMismatchError, _listing

        raise KeyMismatchError(f"{what}: {len(left)} tensors are not part of the architecture read from the file "
                               f"({_listing(left)}); {len(converted)} converted of {len(given)}")


def _text_model(state: dict, fam: str, layout: Layout, options: dict):
    """(CLIPTextModel, tokenizer) from the file's text tower via diffusers' converters; the left-out keys."""
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if layout.tokenizer is None or not layout.tokenizer.is_dir():
        raise ConfigError("a single-file checkpoint holds no tokenizer: pass import.tokenizer=<a folder with the "
                          "CLIP tokenizer (vocab.json, merges.txt), e.g. the tokenizer/ folder of the model's "
                          "diffusers release> or import.config=<a diffusers folder of the same model>")
    tokenizer = CLIPTokenizer.from_pretrained(layout.tokenizer, local_files_only=True)
    config = layout.text or _text_config(state, fam, tokenizer, options)
    model = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures",)}))
    left_out = []
    if fam == "sd1":
        given = {k: v for k, v in state.items() if k.startswith(CLIP) and not k.endswith("position_ids")}
        theirs = sfu.convert_ldm_clip_checkpoint(given)
    else:
        last = model.config.num_hidden_layers  # the file's final layer, which SD 2.x does not use
        left_out = [k for k in state if k.startswith(f"{OPEN_CLIP}transformer.resblocks.{last}.")
                    or k == OPEN_CLIP + "text_projection" or k == OPEN_CLIP + "logit_scale"]
        given = {k: v for k, v in state.items() if k.startswith(OPEN_CLIP) and k not in left_out}
        theirs = sfu.convert_open_clip_checkpoint(model, given, prefix=OPEN_CLIP)
    theirs = {k.removeprefix("text_model."): v for k, v in theirs.items()}
    missing, unexpected = model.load_state_dict(theirs, strict=False)
    if missing or unexpected:
        from ldm_train.interop.keys import KeyMismatchError, _listing

        raise KeyMismatchError(f"text tower: {len(missing)} missing ({_listing(missing)}), {len(unexpected)} "
                               f"unexpected ({_listing(unexpected)})")
    return model.eval(), tokenizer, set(given) | set(left_out) | {k for k in state if k.endswith("position_ids")}


def convert_single_file(path: Path, work: Path, options: dict):
    """Read an original single-file checkpoint and convert it (in memory; the text tower is saved under `work`)."""
    from diffusers.loaders import single_file_utils as sfu

    from ldm_train.interop.diffusers_import import assemble, save_text
    from ldm_train.interop.keys import KeyMismatchError, _listing
    from ldm_train.interop.weights import read_metadata, read_state_dict

    state = read_state_dict(path)
    fam = family(state)
    layout = _layout(state, fam, read_metadata(path), options, Path(work))
    vae_prefix = VAE if any(k.startswith(VAE) for k in state) else ""
    vae_given = {k: v for k, v in state.items() if k.startswith(VAE) or (
        not vae_prefix and k.split(".")[0] in ("encoder", "decoder", "quant_conv", "post_quant_conv"))}
    vae = sfu.convert_ldm_vae_checkpoint(vae_given, layout.vae)
    _consumed(vae_given, vae, f"{path} (VAE)")
    unet_given, unet, text, text_keys = {}, None, (None, None), set()
    if fam != "vae":
        unet_given = {k: v for k, v in state.items() if k.startswith(UNET)}
        unet = sfu.convert_ldm_unet_checkpoint(unet_given, layout.unet)
        _consumed(unet_given, unet, f"{path} (U-Net)")
    if fam in ("sd1", "sd2"):
        model, tokenizer, text_keys = _text_model(state, fam, layout, options)
        text = save_text(model, tokenizer, layout.unet["cross_attention_dim"], Path(work))
    left_out = [k for k in state if k in SCHEDULE_BUFFERS or k.startswith(LEFT_OUT_PREFIXES)]
    rest = set(state) - set(vae_given) - set(unet_given) - text_keys - set(left_out)
    if rest:
        raise KeyMismatchError(f"{path}: {len(rest)} unexpected tensors ({_listing(rest)}): not a Stable Diffusion "
                               "1.x/2.x checkpoint of the original layout, or a variant we do not import")
    imported = assemble(layout.vae, vae, f"{path} (VAE)", layout.unet, unet, f"{path} (U-Net)", layout.scheduler,
                        text, source=f"scaling_factor {layout.vae['scaling_factor']} ({layout.origin})")
    imported.interop.update(source=str(Path(path).resolve()), format="single_file", family=fam,
                            configs=layout.origin)
    if left_out:
        imported.notes.append(f"{len(left_out)} tensors of the file are not network weights we import (schedule "
                              f"buffers, EMA copy, training loss): {_listing(left_out, 4)}")
    if fam == "unet_vae":
        imported.notes.append("the file holds no text tower: imported the VAE only; the diffusion artifact is not "
                              "written")
    if fam == "vae":
        imported.notes.append("the file holds a VAE only: imported as an autoencoder artifact")
    return imported


# ------------------------------------------------------------------------------------------------ export

def check_inverse(original: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], convert, what: str) -> None:
    """diffusers' own converter maps our original-named tensors back to exactly `theirs` (names and values)."""
    back = convert(original)
    if back.keys() != theirs.keys() or not all(torch.equal(back[k], theirs[k]) for k in theirs):
        diff = sorted(set(back) ^ set(theirs))[:5]
        raise RuntimeError(f"{what}: the original names do not convert back to diffusers' names ({diff}); "
                           "diffusers' single-file converters changed, so this export is not written")


def original_state(pipe) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """Our pipeline → (tensors with the original names, the diffusers configs for the file's metadata, notes)."""
    from diffusers.loaders import single_file_utils as sfu

    from ldm_train.interop.diffusers_export import diffusers_modules, pooled_text_notes
    from ldm_train.interop.keys import original_unet, original_vae
    from ldm_train.models.text import ClipTextEncoder

    vae, unet, scheduler = diffusers_modules(pipe)  # refuses a first stage diffusers has no AutoencoderKL for
    up_attention = {i for i, t in enumerate(unet.config.up_block_types) if t.startswith("CrossAttn")}
    top_unet = dict(sfu.DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if unet.config.class_embed_type == "projection":  # unet.pooled_text: label_emb.0.*, as SD's upscaler/unCLIP
        top_unet.update(sfu.DIFFUSERS_TO_LDM_MAPPING["unet"]["class_embed_type"])
    out = original_unet(unet.state_dict(), unet.config.layers_per_block, up_attention, top_unet, UNET)
    check_inverse(out, unet.state_dict(), lambda sd: sfu.convert_ldm_unet_checkpoint(sd, unet.config), "U-Net")
    levels = len(vae.config.block_out_channels)
    vae_out = original_vae(vae.state_dict(), levels, sfu.DIFFUSERS_TO_LDM_MAPPING["vae"], VAE)
    check_inverse(vae_out, vae.state_dict(), lambda sd: sfu.convert_ldm_vae_checkpoint(sd, vae.config), "VAE")
    out.update(vae_out)
    configs = {"unet": dict(unet.config), "vae": dict(vae.config),
               "scheduler": {**dict(scheduler.config), "_class_name": type(scheduler).__name__}}
    notes = pooled_text_notes(unet)
    if isinstance(pipe.text_encoder, ClipTextEncoder):
        model = pipe.text_encoder.model
        text = {CLIP + "text_model." + k: v for k, v in model.state_dict().items()}
        check_inverse(text, {"text_model." + k: v for k, v in model.state_dict().items()},
                      sfu.convert_ldm_clip_checkpoint, "text tower")
        out.update(text)
        configs["text"] = model.config.to_dict()
        if model.config.hidden_act != "quick_gelu":
            notes.append("the text tower is written in the SD 1.x layout (cond_stage_model.transformer., "
                         "transformers' CLIP); SD 2.x tools expect OpenCLIP's cond_stage_model.model.")
    else:
        kind = pipe.config["text_encoder"].get("name")
        notes.append(f"text_encoder={kind} is not a CLIP text tower: wrote the VAE (first_stage_model.) and the "
                     "U-Net (model.diffusion_model.) only")
    return {k: v.detach().contiguous() for k, v in out.items()}, configs, notes


def export_single_file(pipe, out: Path) -> list[str]:
    """Write one .safetensors with the original key names (atomically); returns notes."""
    import tempfile

    from safetensors.torch import save_file

    from ldm_train.utils.io import atomic_write_file

    tensors, configs, notes = original_state(pipe)
    with tempfile.TemporaryDirectory() as tok:
        tokenizer = getattr(pipe.text_encoder, "tokenizer", None)
        if "text" in configs and tokenizer is not None:
            tokenizer.save_pretrained(tok)
            configs["tokenizer"] = {p.name: p.read_text() for p in sorted(Path(tok).iterdir()) if p.is_file()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(configs, default=_json_default)}
    atomic_write_file(out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return notes


def _json_default(value: Any) -> Any:
    """diffusers configs hold tuples and the odd non-JSON value (FrozenDict, numpy scalars)."""
    if isinstance(value, (tuple, set)):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)
