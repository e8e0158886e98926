"""A LoRA'd U-Net's adapter as the file diffusers' `load_lora_weights(folder)` reads:
`pytorch_lora_weights.safetensors` with keys `unet.<diffusers module>.lora_A.weight` / `.lora_B.weight` (peft's
layout) and the peft `LoraConfig` (rank, alpha, dropout, target modules by diffusers' names) as JSON in the
`lora_adapter_metadata` header entry, each key prefixed `unet.` as diffusers writes it.

Our module names become diffusers' through the one key table (interop/keys.py); where diffusers holds a 1×1 conv
(SD 1.x proj_in / proj_out) the adapter's A and B become 1×1 convs too (a reshape: the same map).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from ldm_train.interop.keys import unet_table

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"


def diffusers_lora_state(unet: nn.Module, plain: nn.Module, linear_projection: bool) -> tuple[dict, dict]:
    """(tensors, LoraConfig kwargs) of the LoRA'd `unet` in diffusers' names; `plain` is an un-adapted U-Net of the
    same architecture (e.g. its merged copy) from which the key table is read."""
    from peft import get_peft_model_state_dict

    table = {e.ours: e for e in unet_table(plain, linear_projection)}
    tensors, modules = {}, set()
    for key, tensor in get_peft_model_state_dict(unet).items():  # '<our module>.lora_A.weight'
        module, part, _ = key.rsplit(".", 2)
        entry = table[f"{module}.weight"]
        theirs = entry.theirs[0].removesuffix(".weight")
        if entry.layout == "conv1x1":
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        tensors[f"unet.{theirs}.{part}.weight"] = tensor.detach().contiguous()
        modules.add(theirs)
    config = unet.peft_config["default"]
    kwargs = {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
              "target_modules": sorted(modules)}
    return tensors, kwargs


def save_diffusers_lora(unet: nn.Module, plain: nn.Module, folder: Path, linear_projection: bool) -> Path:
    """Write `folder/pytorch_lora_weights.safetensors` (see the module docstring); returns its path."""
    tensors, kwargs = diffusers_lora_state(unet, plain, linear_projection)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {f"unet.{k}": v for k, v in kwargs.items()}
    path = folder / WEIGHT_NAME
    save_file({k: v.cpu() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True)})
    return path
