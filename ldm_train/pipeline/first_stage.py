"""The frozen autoencoder as stage 2 sees it: the only place the latent scale factor is applied.

Latents are computed in float32 with autocast disabled, so stage 2 under bf16-mixed trains on the same numbers
whether it encodes images or reads the latent cache (which holds float32/float16 values, not bf16 ones).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ldm_train.config import ConfigError
from ldm_train.errors import UserError
from ldm_train.pipeline.artifacts import ArtifactError, content_hash, load_autoencoder

log = logging.getLogger(__name__)


class LatentStdError(UserError, RuntimeError):
    """Scaled latents far from unit variance: training on them would quietly fail."""


@contextmanager
def float32_latents(device: torch.device):
    """Autocast off: under bf16-mixed the encoder would otherwise run (and return) in bf16."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def calibrated_on_samples(calibration: dict) -> bool:
    """Whether the scale factor was measured on posterior samples (calibrations before the choice: the mode)."""
    return bool(calibration.get("sample", False))


LATENT_NORMS = ("global", "channel")


def latent_normalization(calibration: dict, latent_norm: str, channels: int,
                         path: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale), each (1, C, 1, 1) float32, of `diffusion.latent_norm` from a calibration report."""
    if latent_norm == "global":
        return torch.zeros(1, channels, 1, 1), torch.full((1, channels, 1, 1), float(calibration["scale_factor"]))
    if latent_norm != "channel":
        raise ConfigError(f"diffusion.latent_norm={latent_norm!r} is not one of {', '.join(LATENT_NORMS)}")
    mean, std = calibration.get("channel_mean"), calibration.get("channel_std")
    if mean is None or std is None or len(mean) != channels or len(std) != channels or not min(std) > 0:
        raise ArtifactError(f"the calibration of {path or 'this autoencoder'} holds no per-channel mean and std for "
                            f"its {channels} latent channels, which diffusion.latent_norm=channel needs: re-run "
                            "stage=calibrate, or set diffusion.latent_norm=global")
    return (torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
            1.0 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))


class FirstStage(nn.Module):
    """Frozen autoencoder + calibration: encode(x) = (z − shift)·scale on the way in, decode(z) = D(z/scale + shift)
    out.

    `latent_norm` (`diffusion.latent_norm`): "global" (Stable Diffusion's): shift 0, scale = the calibrated
    scale_factor = 1/std(z); "channel": each latent channel shifted by its calibrated mean and divided by its std
    (`channel_mean`, `channel_std` of calibration.json), so every channel reaches stage 2 centred with unit std.
    `sample_posterior` (KL): encode posterior samples rather than the mode; None takes what calibration measured.
    A value that differs from it is logged as a warning: the scaled latents would not have unit std.
    """

    def __init__(self, autoencoder: nn.Module, calibration: dict, sample_posterior: bool | None = None,
                 path: Path | None = None, latent_norm: str = "global"):
        super().__init__()
        self.autoencoder = autoencoder
        self.calibration = calibration
        self.scale_factor = float(calibration["scale_factor"])
        self.latent_norm = latent_norm
        shift, scale = latent_normalization(calibration, latent_norm, autoencoder.z_channels, path)
        self.register_buffer("shift", shift, persistent=False)  # (1, C, 1, 1), follows .to(device)
        self.register_buffer("scale", scale, persistent=False)
        calibrated = calibrated_on_samples(calibration)
        self.sample_posterior = calibrated if sample_posterior is None else bool(sample_posterior)
        self.path = Path(path) if path else None
        self.latent_channels = autoencoder.z_channels
        self.f = autoencoder.f
        self.channels_last = False
        if self.regularizer.stochastic and self.sample_posterior != calibrated:
            log.warning(self.calibration_mismatch(calibrated))

    @property
    def regularizer(self) -> nn.Module:
        return self.autoencoder.regularizer

    def calibration_mismatch(self, calibrated: bool) -> str:
        reg = self.regularizer
        return (f"the scale factor of {self.path or 'this autoencoder'} was calibrated on the "
                f"{reg.describe_latent(calibrated)}, but stage 2 uses the {reg.describe_latent(self.sample_posterior)} "
                f"(diffusion.sample_posterior={str(self.sample_posterior).lower()}): the scaled latents will not have "
                f"unit std. Re-run stage=calibrate with diffusion.sample_posterior={str(self.sample_posterior).lower()}"
                f" (or autoencoder.calibration.latent={'sample' if self.sample_posterior else 'mode'}), "
                f"or set diffusion.sample_posterior={str(calibrated).lower()}")

    def check_options(self, regularizer_cfg: dict) -> None:
        """Refuse a run whose regularizer options that shape stage 2's latents (VQ `diffuse`) differ from the
        artifact's: they are fixed when stage 1 writes it (calibration and caches depend on them)."""
        for key in self.regularizer.stage2_options:
            stored = getattr(self.regularizer, key)
            if key in regularizer_cfg and regularizer_cfg[key] != stored:
                raise ArtifactError(
                    f"autoencoder {self.path} was written with regularizer.{key}={stored}, but this run asks for "
                    f"regularizer.{key}={regularizer_cfg[key]}: drop the override, or train stage 1 with it")

    def use_channels_last(self) -> FirstStage:
        """NHWC weights and inputs: faster convolutions (62 vs 89 ms to encode 128 images at 32 px on 2 CPU cores)."""
        self.autoencoder.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    @classmethod
    def from_artifact(cls, path: Path, f: int | None = None, regularizer: str | None = None,
                      sample_posterior: bool | None = None, latent_norm: str = "global") -> FirstStage:
        model, calibration = load_autoencoder(path, f, regularizer, require_calibration=True)
        return cls(model, calibration, sample_posterior, path, latent_norm)

    def train(self, mode: bool = True) -> FirstStage:
        return super().train(False)  # frozen: never back in training mode

    @property
    def content_hash(self) -> str:
        return content_hash(self.path)

    def _float_input(self, x: torch.Tensor) -> torch.Tensor:
        """x in the weights' dtype: float32, unless the whole model was cast (e.g. Lightning's bf16-true)."""
        x = x.to(next(self.autoencoder.parameters()).dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.no_grad()
    def encode(self, x: torch.Tensor, sample: bool | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] → scaled float32 latents (B, C, H/f, W/f): the latent the regularizer
        hands stage 2 (KL: posterior sample or mode; VQ: by `regularizer.diffuse`) times scale_factor."""
        sample = self.sample_posterior if sample is None else sample
        with float32_latents(x.device):
            return self.normalize(self.autoencoder.latent(self._float_input(x), sample=sample).float())

    @torch.no_grad()
    def raw_latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images → what the latent cache stores, unscaled float32: (posterior mean, std) for KL, (the diffused
        latent, None) for VQ."""
        with float32_latents(x.device):
            latent, std = self.regularizer.cache_latents(self.autoencoder.encode_moments(self._float_input(x)))
            return latent.float(), None if std is None else std.float()

    @torch.no_grad()
    def from_cache(self, latent: torch.Tensor, std: torch.Tensor | None = None,
                   sample: bool | None = None) -> torch.Tensor:
        """Cached raw latents → scaled float32 latents, as `encode` gives them: z = mean + std·ε (KL, sampling) or
        the stored latent, times scale_factor."""
        sample = self.sample_posterior if sample is None else sample
        with float32_latents(latent.device):
            z = latent.float()
            if sample and std is not None:
                z = z + torch.randn_like(z) * std.float()
            return self.normalize(z)

    def diffusers_scaling_factor(self) -> float:
        """The one `scaling_factor` a diffusers AutoencoderKL and Stable Diffusion pipeline apply; refuses a per-channel
        normalisation, which the Stable Diffusion pipeline cannot express."""
        if self.latent_norm != "global":
            raise ConfigError(f"this model was trained on latents normalised per channel (diffusion.latent_norm="
                              f"{self.latent_norm}); diffusers' Stable Diffusion pipeline applies one scaling_factor. "
                              "Export a model trained with diffusion.latent_norm=global")
        return self.scale_factor

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw float32 latents → what stage 2 sees: (z − shift)·scale."""
        return (z - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images in [-1, 1] (clamped); VQ quantizes them first (`Autoencoder.decode_latent`)."""
        # in z's dtype, as before the per-channel option (a bf16 latent stays bf16 for a bf16 decoder)
        return self.autoencoder.decode_latent((z.float() / self.scale + self.shift).to(z.dtype)).clamp(-1, 1)

    def latent_shape(self, height: int, width: int | None = None) -> tuple[int, int, int]:
        """(C, height/f, width/f) of the latent of a height × width image (width defaults to height)."""
        f, width = self.f, height if width is None else width
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
        raw = z.float() / self.scale + self.shift
        stats = {"scaled_mean": float(z.mean()), "scaled_std": float(z.std()), "scale_factor": self.scale_factor,
                 "raw_std": float(raw.std()), "calibrated_raw_std": self.calibration["raw_std"]}
        lo, hi = std_range
        if not lo <= stats["scaled_std"] <= hi:
            raise LatentStdError(
                f"latent health check failed: scaled latent std {stats['scaled_std']:.3f} is outside [{lo}, {hi}] "
                f"(scaled mean {stats['scaled_mean']:.3f}, scale_factor {self.scale_factor:.5f}, raw std "
                f"{stats['raw_std']:.4f}, raw std at calibration {stats['calibrated_raw_std']:.4f}). The autoencoder "
                "or data changed since calibration: re-run stage=calibrate, or widen diffusion.latent_std_range"
                + (". A raw std well above the calibrated one means the KL posterior is still wide (an undertrained "
                   "autoencoder): train stage 1 longer, or set diffusion.sample_posterior=false and re-run "
                   "stage=calibrate with it"
                   if self.sample_posterior and self.regularizer.stochastic else ""))
        return stats
