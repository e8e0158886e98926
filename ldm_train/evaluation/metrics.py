"""Reconstruction and generation metrics over whole sets, named after the networks that computed them."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchmetrics.image.fid import FrechetInceptionDistance  # not re-exported without torch-fidelity

from ldm_train.evaluation.features import FeatureNetwork

# evaluation runs in one process (rank 0 under DDP): metrics must not wait for the other ranks
LOCAL = {"sync_on_compute": False}


def frechet(features: FeatureNetwork) -> FrechetInceptionDistance:
    """torchmetrics' FID machinery over any feature network; inputs are floats in [0, 1]."""
    # its running sums are float64 already
    return FrechetInceptionDistance(feature=features.module, normalize=True, **LOCAL)


def unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1]."""
    return ((x.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def reconstruction_metrics(reconstruct: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor],
                           perceptual: nn.Module, perceptual_name: str,
                           features: FeatureNetwork | None) -> dict[str, float]:
    """PSNR, SSIM (images in [-1, 1], data range 2), the perceptual distance and the reconstruction Fréchet
    distance, over every batch. Keys: recon_psnr, recon_ssim, recon_<perceptual name>, rfid | rfd_<net>."""
    psnr = PeakSignalNoiseRatio(data_range=2.0, reduction="elementwise_mean", dim=(1, 2, 3), **LOCAL)  # per image
    ssim = StructuralSimilarityIndexMeasure(data_range=2.0, **LOCAL)
    fd = frechet(features) if features else None
    dist, n = 0.0, 0
    for x in batches:
        xrec = reconstruct(x).clamp(-1, 1)
        psnr.update(xrec, x)
        ssim.update(xrec, x)
        dist += float(perceptual(x, xrec).sum())
        n += len(x)
        if fd is not None:
            fd.update(unit(x), real=True)
            fd.update(unit(xrec), real=False)
    out = {"recon_psnr": float(psnr.compute()), "recon_ssim": float(ssim.compute()),
           f"recon_{perceptual_name}": dist / max(n, 1), "recon_samples": n}
    if fd is not None:
        out[features.rfid_key] = float(fd.compute())
    return out

