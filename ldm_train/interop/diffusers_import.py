"""A Stable Diffusion pipeline in diffusers' folder layout → our autoencoder and diffusion artifacts.

Everything is read, converted and checked in memory first (strict loads into our modules); only then are the two
artifacts written, each atomically, and the autoencoder is removed again if the diffusion artifact fails.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm_train.config import ConfigError
from ldm_train.interop.configs import schedule_from_diffusers, unet_from_diffusers, vae_from_diffusers
from ldm_train.interop.keys import autoencoder_table, to_ours, unet_table
from ldm_train.interop.weights import find_weights, read_state_dict

CLIP_FOLDER = "clip"  # the text tower + tokenizer inside an imported diffusion artifact (relative: moves with it)


@dataclass
class Imported:
    """A converted pipeline, not yet written: our modules' state dicts and the configs of both artifacts."""

    vae_arch: dict
    vae_state: dict[str, torch.Tensor]
    calibration: dict
    unet_config: dict
    unet_state: dict[str, torch.Tensor]
    diffusion: dict
    sampling: dict
    interop: dict
    text_folder: Path | None  # a folder holding the CLIPTextModel and its tokenizer (written by `convert`)
    text_config: dict | None
    notes: list[str] = field(default_factory=list)


def _json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: not a complete diffusers pipeline folder")
    return json.loads(path.read_text())


def full_scheduler_config(raw: dict) -> dict:
    """A scheduler config with its diffusers class's defaults filled in (e.g. PNDM's `leading` spacing)."""
    import diffusers

    cls = getattr(diffusers, raw.get("_class_name", ""), None)
    if cls is None:
        return raw
    return {**dict(cls.from_config(raw).config), "_class_name": raw["_class_name"]}


def _meta_module(build):
    """Build a module on the meta device (no memory, no init): its state-dict names and shapes for the table."""
    with torch.device("meta"):
        return build()


def convert(folder: Path, work: Path) -> Imported:
    """Read and convert a diffusers SD folder; the text tower is re-saved (safetensors) under `work`."""
    folder = Path(folder)
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"{folder} has no model_index.json: `source=` must be a diffusers pipeline folder "
                                "(model_index.json, vae/, unet/, text_encoder/, tokenizer/, scheduler/)")
    index = _json(folder / "model_index.json")
    vae_weights, unet_weights = find_weights(folder / "vae"), find_weights(folder / "unet")
    unet_config = _json(folder / "unet" / "config.json")
    text_folder, text_config = _convert_text(folder, index, unet_config["cross_attention_dim"], work)
    imported = assemble(_json(folder / "vae" / "config.json"), read_state_dict(vae_weights), str(vae_weights),
                        unet_config, read_state_dict(unet_weights), str(unet_weights),
                        full_scheduler_config(_json(folder / "scheduler" / "scheduler_config.json")),
                        (text_folder, text_config), source=f"scaling_factor of {folder / 'vae' / 'config.json'}")
    imported.interop.update(source=str(folder.resolve()), format="diffusers", pipeline=index.get("_class_name"))
    if text_folder is None:
        imported.notes.append(f"text encoder {index.get('text_encoder')} is not a CLIPTextModel: imported the VAE "
                              "and U-Net only; the diffusion artifact is not written")
    return imported


def assemble(vae_config: dict, vae_weights: dict, vae_what: str, unet_config: dict | None,
             unet_weights: dict | None, unet_what: str, scheduler_config: dict | None,
             text: tuple[Path | None, dict | None], source: str) -> Imported:
    """diffusers-layout configs and state dicts → our state dicts, checked by the key table (strict). Without a
    U-Net (a VAE-only checkpoint) only the autoencoder part is filled."""
    from ldm_train.models.autoencoder import Autoencoder
    from ldm_train.models.unet import UNet

    vae_arch, scale = vae_from_diffusers(vae_config)
    vae = _meta_module(lambda: Autoencoder(vae_arch))
    vae_state = to_ours(vae_weights, autoencoder_table(vae), vae.state_dict(), vae_what)
    calibration = {"scale_factor": scale, "raw_std": 1.0 / scale,
                   "source": f"stored: {source} (not measured here; `stage=calibrate` measures it on your data)"}
    if unet_config is None:
        return Imported(vae_arch, vae_state, calibration, {}, {}, {}, {}, {"sample_size": 0}, None, None, [])
    unet_cfg, interop = unet_from_diffusers(unet_config)
    unet = _meta_module(lambda: UNet(**unet_cfg))
    unet_state = to_ours(unet_weights, unet_table(unet, interop["use_linear_projection"]), unet.state_dict(),
                         unet_what)
    if unet_cfg["in_channels"] != vae_arch["z_channels"]:
        raise ConfigError(f"unet in_channels={unet_cfg['in_channels']} but the VAE has "
                          f"{vae_arch['z_channels']} latent channels")
    diffusion, sampling, notes = schedule_from_diffusers(scheduler_config)
    return Imported(vae_arch, vae_state, calibration, unet_cfg, unet_state, diffusion, sampling, interop,
                    text[0], text[1], notes)


def _convert_text(folder: Path, index: dict, context_dim: int, work: Path) -> tuple[Path | None, dict | None]:
    """The CLIP text tower and tokenizer, loaded by transformers and re-saved as one folder (safetensors)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    if list(index.get("text_encoder") or [])[-1:] != ["CLIPTextModel"]:
        return None, None
    text_dir = folder / "text_encoder"
    if not any((text_dir / f).exists() for f in ("model.safetensors", "pytorch_model.bin")):
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {text_dir}")
    if not (text_dir / "model.safetensors").exists():
        read_state_dict(text_dir / "pytorch_model.bin")  # refuse a pickle with code before transformers sees it
    model = CLIPTextModel.from_pretrained(text_dir, local_files_only=True, use_safetensors=None)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    return save_text(model, tokenizer, context_dim, work)


def save_text(model, tokenizer, context_dim: int, work: Path) -> tuple[Path, dict]:
    """Save a CLIP text tower + tokenizer under `work` (safetensors); (folder, our `clip_l` text_encoder config)."""
    if model.config.hidden_size != context_dim:
        raise ConfigError(f"text encoder width {model.config.hidden_size} != unet cross_attention_dim {context_dim}")
    out = Path(work) / CLIP_FOLDER
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    config = dict(name="clip_l", name_or_path=CLIP_FOLDER, max_length=int(tokenizer.model_max_length),
                  dim=int(model.config.hidden_size), local_files_only=True)
    return out, config


def write_artifacts(imported: Imported, autoencoder_dir: Path, diffusion_dir: Path | None) -> None:
    """Write the autoencoder artifact and (with a CLIP text tower) the diffusion artifact; all or nothing."""
    from ldm_train.pipeline.artifacts import save_autoencoder, save_diffusion

    class _State(torch.nn.Module):  # save_* take modules; these hold the converted tensors as they are
        def __init__(self, state: dict[str, torch.Tensor]):
            super().__init__()
            self._state = state

        def state_dict(self, *args, **kwargs):
            return self._state

    metrics = {"imported_from": imported.interop["source"]}
    save_autoencoder(autoencoder_dir, _State(imported.vae_state), imported.vae_arch, imported.calibration, metrics)
    if diffusion_dir is None or imported.text_folder is None:
        return
    try:
        vae = imported.vae_arch
        config = {"unet": imported.unet_config, "text_encoder": imported.text_config,
                  "diffusion": imported.diffusion, "sampling": imported.sampling,
                  "resolution": imported.interop["sample_size"] * vae["f"], "latent_channels": vae["z_channels"],
                  "f": vae["f"], "regularizer": "kl", "data": "imported", "interop": imported.interop}

        def extra(tmp: Path) -> None:
            shutil.copytree(imported.text_folder, tmp / CLIP_FOLDER)

        save_diffusion(diffusion_dir, _State(imported.unet_state), None, config, autoencoder_dir, metrics,
                       extra=extra)
    except BaseException:
        shutil.rmtree(autoencoder_dir, ignore_errors=True)
        raise
