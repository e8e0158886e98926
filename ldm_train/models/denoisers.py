"""The denoiser networks a `unet` config can pick (`kind`: unet | dit), and what each needs of the latent size.

Every denoiser is called as net(x (B, C, h, w), t (B,), context (B, L, context_dim)) -> (B, C, h, w).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ldm_train.models.dit import DiT
from ldm_train.models.unet import UNet


@dataclass(frozen=True)
class DenoiserKind:
    build: Callable[..., nn.Module]
    latent_multiple: Callable[[Mapping[str, Any]], tuple[int, str]]  # (m, why): h and w must divide by m


def _unet_multiple(cfg: Mapping[str, Any]) -> tuple[int, str]:
    levels = len(cfg["channel_mult"])
    return 2 ** (levels - 1), f"a {levels}-level U-Net (unet.channel_mult={list(cfg['channel_mult'])}) halves it " \
                              f"{levels - 1} times"


def _dit_multiple(cfg: Mapping[str, Any]) -> tuple[int, str]:
    return int(cfg["patch_size"]), f"the DiT cuts it into unet.patch_size={cfg['patch_size']} patches"


DENOISERS: dict[str, DenoiserKind] = {"unet": DenoiserKind(UNet, _unet_multiple),
                                      "dit": DenoiserKind(DiT, _dit_multiple)}


def denoiser_kind(cfg: Mapping[str, Any]) -> DenoiserKind:
    """The entry of `cfg["kind"]` (unet when absent: configs and artifacts from before DiT)."""
    kind = cfg.get("kind", "unet")
    if kind not in DENOISERS:
        raise ValueError(f"unknown unet.kind {kind!r}; valid: {', '.join(DENOISERS)}")
    return DENOISERS[kind]


def build_network(cfg: Mapping[str, Any], in_channels: int) -> nn.Module:
    """The network of a `unet` config (its keys other than `kind`) on `in_channels` latent channels."""
    kwargs = {k: v for k, v in cfg.items() if k not in ("kind", "in_channels")}
    return denoiser_kind(cfg).build(in_channels=in_channels, **kwargs)


def latent_multiple(cfg: Mapping[str, Any]) -> tuple[int, str]:
    """(m, why): the latent's height and width must be multiples of m for this network."""
    return denoiser_kind(cfg).latent_multiple(cfg)
