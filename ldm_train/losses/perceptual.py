"""Perceptual distance for the stage-1 loss and metrics: the `lpips` package, with an honest name.

`weights: imagenet` uses torchvision's ImageNet backbone (the published LPIPS); `random` a randomly
initialised backbone with LPIPS's shipped linear heads (not LPIPS as published, so it is logged as
`lpips_rand<net>`); `auto` takes imagenet when the weights file is present or downloadable, random otherwise.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm_train.errors import MissingWeightsError

log = logging.getLogger(__name__)

MIN_SIZE = 32
BACKBONES = {"vgg": "vgg16", "alex": "alexnet", "squeeze": "squeezenet1_1"}


def backbone_weights_file(net: str) -> Path:
    """Where torchvision keeps (or would download) the ImageNet weights of an LPIPS backbone."""
    import torchvision.models as tv

    enum = {"vgg": tv.VGG16_Weights, "alex": tv.AlexNet_Weights, "squeeze": tv.SqueezeNet1_1_Weights}[net]
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.IMAGENET1K_V1.url)


def _try_download(net: str) -> bool:
    import torchvision.models as tv

    try:
        getattr(tv, BACKBONES[net])(weights="IMAGENET1K_V1")
        return True
    except Exception as exc:  # offline machines end here; the caller decides whether that is fatal
        log.debug("download of %s weights failed: %s", net, exc)
        return False


def resolve_backbone_weights(net: str, weights: str) -> str:
    """Return "imagenet" or "random" for `weights: auto|imagenet|random`, raising when imagenet is impossible."""
    if net not in BACKBONES:
        raise ValueError(f"unknown perceptual net {net!r}; valid: {', '.join(BACKBONES)}")
    if weights == "random":
        warnings.warn(f"perceptual loss uses a RANDOM {net} backbone: logged as lpips_rand{net}, not LPIPS",
                      stacklevel=2)
        return "random"
    available = backbone_weights_file(net).exists() or _try_download(net)
    if weights == "imagenet":
        if not available:
            path = backbone_weights_file(net)
            raise MissingWeightsError(
                f"ImageNet weights for the LPIPS {net} backbone are missing: {path}. Put the file there (TORCH_HOME "
                f"sets the cache root, now {torch.hub.get_dir()}), run once with internet, or choose "
                "loss.perceptual.weights=random (logged as a variant, not as LPIPS)")
        return "imagenet"
    if weights == "auto":
        if available:
            return "imagenet"
        log.warning("LPIPS %s ImageNet weights not found (%s): using a RANDOM backbone; the metric is named "
                    "lpips_rand%s. Set loss.perceptual.weights=imagenet to require real LPIPS.",
                    net, backbone_weights_file(net), net)
        return "random"
    raise ValueError(f"loss.perceptual.weights must be auto, imagenet or random, got {weights!r}")


def perceptual_metric_name(net: str, resolved: str) -> str:
    """`lpips` only for an ImageNet backbone; a random backbone gives e.g. `lpips_randvgg`."""
    return "lpips" if resolved == "imagenet" else f"lpips_rand{net}"


class FrozenLPIPS(nn.Module):
    """lpips.LPIPS kept frozen and in eval mode (its heads have dropout) whatever the parent does."""

    def __init__(self, net: str, resolved: str):
        super().__init__()
        import lpips

        with warnings.catch_warnings():  # lpips calls torchvision with the deprecated `pretrained=` argument
            warnings.simplefilter("ignore")
            self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=resolved == "random", verbose=False)
        self.net, self.resolved = net, resolved
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenLPIPS:
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distance (B, 1, 1, 1) between images in [-1, 1]; images under 32 px are upsampled (AlexNet needs it)."""
        if min(x.shape[-2:]) < MIN_SIZE:
            size = [max(MIN_SIZE, s) for s in x.shape[-2:]]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return self.lpips(x, y)


def build_perceptual(cfg: dict) -> tuple[nn.Module, str]:
    """(module, metric name) from `{net, weights, weight}`; an unused perceptual term builds nothing heavy."""
    net = cfg.get("net", "vgg")
    resolved = resolve_backbone_weights(net, cfg.get("weights", "auto"))
    module = FrozenLPIPS(net, resolved)
    return module, perceptual_metric_name(net, resolved)
