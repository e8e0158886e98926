"""LoRA on the U-Net through peft: the base frozen, a trainable low-rank update on the chosen layers, so that a
targeted layer computes W·x + (alpha/rank)·B·A·x (A: rank × in, B: out × rank, B starts at zero), and a merged
copy with W ← W + (alpha/rank)·B·A for the artifact. The layers themselves are peft's; this module only configures,
counts and merges them. See docs/interop.md (LoRA)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import nn

from ldm_train.config import ConfigError

# the U-Net's attention projections by our module names (suffixes; diffusers' names come from interop/keys.py)
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
OPTIONAL_TARGETS = ("proj_in", "proj_out", "ff.proj", "ff.out")


def lora_enabled(lora_cfg: Mapping[str, Any] | None) -> bool:
    """`diffusion.lora.rank` null (or no `lora` node): full fine-tuning."""
    return bool(lora_cfg) and lora_cfg.get("rank") is not None


def lora_config(lora_cfg: Mapping[str, Any]):
    """peft's `LoraConfig` of a `diffusion.lora` node; alpha null means alpha = rank (scale 1)."""
    try:
        from peft import LoraConfig
    except ImportError as exc:
        raise ConfigError("diffusion.lora needs the peft package: pip install 'ldm_train[lora]' (or peft), or set "
                          "diffusion.lora.rank=null") from exc

    rank = lora_cfg["rank"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"diffusion.lora.rank={rank!r}: give a positive integer (e.g. 8), or null to train the "
                          "whole U-Net")
    alpha = lora_cfg.get("alpha")
    targets = list(lora_cfg.get("target_modules") or ATTENTION_PROJECTIONS)
    return LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha),
                      lora_dropout=float(lora_cfg.get("dropout") or 0.0), target_modules=targets)


def _check_targets(unet: nn.Module, targets: list[str]) -> None:
    names = [name for name, _ in unet.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise ConfigError(f"diffusion.lora.target_modules {unmatched} name no layer of the U-Net; use our module "
                          f"names, e.g. {list(ATTENTION_PROJECTIONS)} (the default) plus any of "
                          f"{list(OPTIONAL_TARGETS)}")


def add_lora(unet: nn.Module, lora_cfg: Mapping[str, Any]) -> nn.Module:
    """Freeze `unet` and inject peft LoRA adapters into the layers named by `target_modules` (suffixes of our
    module names), in place; only the adapters' A and B require gradients afterwards. Returns `unet`."""
    from ldm_train.models.unet import UNet

    if not isinstance(unet, UNet):
        raise ConfigError(f"diffusion.lora works on the U-Net (unet kind=unet), not on a {type(unet).__name__}; "
                          "set diffusion.lora.rank=null or choose a U-Net config")
    config = lora_config(lora_cfg)  # first: without peft, it names the install command
    from peft import inject_adapter_in_model

    _check_targets(unet, sorted(config.target_modules))
    unet.requires_grad_(False)
    inject_adapter_in_model(config, unet)
    return unet


def has_lora(module: nn.Module) -> bool:
    """Whether `module` holds peft adapter layers."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without peft there are no adapters
        return False

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def frozen_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters that do not train (a LoRA'd U-Net's base)."""
    return [p for p in module.parameters() if not p.requires_grad]


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    return (sum(p.numel() for p in module.parameters() if p.requires_grad),
            sum(p.numel() for p in module.parameters()))


def merged_copy(unet: nn.Module) -> nn.Module:
    """A plain copy of a LoRA'd U-Net with every adapter merged into its base layer (peft's `merge`: W ← W +
    (alpha/rank)·B·A) and the adapter layers replaced by their base layers: the state-dict keys of an un-adapted
    U-Net. `unet` itself is left as it is."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(unet)
    for name, module in list(merged.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent), child, module.get_base_layer())
    if hasattr(merged, "peft_config"):
        del merged.peft_config
    return merged
