"""The frozen autoencoder as stage 2 sees it: the only place the latent scale factor is applied."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ldm_train.pipeline.artifacts import content_hash, load_autoencoder


class LatentStdError(RuntimeError):
    """Scaled latents far from unit variance: training on them would quietly fail."""


class FirstStage(nn.Module):
    """Frozen autoencoder + calibrated `scale_factor`: encode(x) = z·s on the way in, decode(z) = D(z/s) out."""

    def __init__(self, autoencoder: nn.Module, calibration: dict, sample_posterior: bool = True,
                 path: Path | None = None):
        super().__init__()
        self.autoencoder = autoencoder
        self.calibration = calibration
        self.scale_factor = float(calibration["scale_factor"])
        self.sample_posterior = sample_posterior
        self.path = Path(path) if path else None
        self.latent_channels = autoencoder.z_channels
        self.downsample_factor = autoencoder.downsample_factor
        self.channels_last = False

    def use_channels_last(self) -> FirstStage:
        """NHWC weights and inputs: faster convolutions (62 vs 89 ms to encode 128 images at 32 px on 2 CPU cores)."""
        self.autoencoder.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    @classmethod
    def from_artifact(cls, path: Path, f: int | None = None, regularizer: str | None = None,
                      sample_posterior: bool = True) -> FirstStage:
        model, calibration = load_autoencoder(path, f, regularizer, require_calibration=True)
        return cls(model, calibration, sample_posterior, path)

    def train(self, mode: bool = True) -> FirstStage:
        return super().train(False)  # frozen: never back in training mode

    @property
    def content_hash(self) -> str:
        return content_hash(self.path)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, sample: bool | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] → scaled latents (B, C, H/f, W/f)."""
        sample = self.sample_posterior if sample is None else sample
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.autoencoder.latent(x, sample=sample) * self.scale_factor

    @torch.no_grad()
    def raw_latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images → what the latent cache stores, unscaled: (posterior mean, std) for KL, (z_q, None) for VQ."""
        moments = self.autoencoder.encode_moments(x)
        if self.autoencoder.arch["regularizer"]["name"] == "kl":
            mean, logvar = self.autoencoder.regularizer.posterior(moments)
            return mean, (0.5 * logvar).exp()
        return self.autoencoder.regularizer.latent(moments, sample=False), None

    @torch.no_grad()
    def from_cache(self, latent: torch.Tensor, std: torch.Tensor | None = None,
                   sample: bool | None = None) -> torch.Tensor:
        """Cached raw latents → scaled latents, as `encode` gives them: z = mean + std·ε (KL, sampling) or the
        mean / z_q, times scale_factor."""
        sample = self.sample_posterior if sample is None else sample
        z = latent.float()
        if sample and std is not None:
            z = z + torch.randn_like(z) * std.float()
        return z * self.scale_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images in [-1, 1] (clamped)."""
        return self.autoencoder.decode_latent(z / self.scale_factor).clamp(-1, 1)

    def latent_shape(self, height: int, width: int | None = None) -> tuple[int, int, int]:
        """(C, height/f, width/f) of the latent of a height × width image (width defaults to height)."""
        f, width = self.downsample_factor, height if width is None else width
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} is not divisible by the autoencoder's f={f}; "
                             f"use multiples of {f}")
        return (self.latent_channels, height // f, width // f)

    @torch.no_grad()
    def health_check(self, x: torch.Tensor | None, std_range: tuple[float, float],
                     latents: torch.Tensor | None = None) -> dict:
        """Encode a batch (or take scaled `latents`); refuse (LatentStdError) when the scaled std is outside
        `std_range`."""
        z = self.encode(x) if latents is None else latents
        stats = {"scaled_mean": float(z.mean()), "scaled_std": float(z.std()), "scale_factor": self.scale_factor,
                 "raw_std": float(z.std()) / self.scale_factor, "calibrated_raw_std": self.calibration["raw_std"]}
        lo, hi = std_range
        if not lo <= stats["scaled_std"] <= hi:
            raise LatentStdError(
                f"latent health check failed: scaled latent std {stats['scaled_std']:.3f} is outside [{lo}, {hi}] "
                f"(scaled mean {stats['scaled_mean']:.3f}, scale_factor {self.scale_factor:.5f}, raw std "
                f"{stats['raw_std']:.4f}, raw std at calibration {stats['calibrated_raw_std']:.4f}). The autoencoder "
                "or data changed since calibration: re-run stage=calibrate, or widen diffusion.latent_std_range"
                + (". A raw std well above the calibrated one means the KL posterior is still wide (an undertrained "
                   "autoencoder): train stage 1 longer or set diffusion.sample_posterior=false"
                   if self.sample_posterior and self.autoencoder.arch["regularizer"]["name"] == "kl" else ""))
        return stats
