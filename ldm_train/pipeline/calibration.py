"""Latent scale-factor calibration: scale_factor = 1/std(z), measured over all elements and all ranks, on the
latent stage 2 consumes (KL: posterior samples or the mode, as `diffusion.sample_posterior`; VQ: by
`regularizer.diffuse`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from ldm_train.config import ConfigError
from ldm_train.utils.distributed import sum_over_ranks

CALIBRATION_LATENTS = ("auto", "sample", "mode")


def calibration_sample(cfg) -> bool:
    """Calibrate on posterior samples? `autoencoder.calibration.latent`: sample | mode | auto (= what stage 2
    consumes, `diffusion.sample_posterior`)."""
    latent = cfg.autoencoder.calibration.get("latent", "auto")
    if latent not in CALIBRATION_LATENTS:
        raise ConfigError(f"autoencoder.calibration.latent={latent!r}; valid: {', '.join(CALIBRATION_LATENTS)} "
                          "(auto follows diffusion.sample_posterior)")
    return bool(cfg.diffusion.sample_posterior) if latent == "auto" else latent == "sample"


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = (x - y).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(4.0 / mse)


def image_seed(seed: int, index: int) -> int:
    """(seed · 2654435761 + index) mod 2³²: a CPU generator keeps only 32 bits of its seed, so mix into those;
    for one seed, distinct images get distinct seeds."""
    return (seed * 2654435761 + index) % 2**32


def image_noise(shape: Sequence[int], indices: Iterable[int], seed: int) -> torch.Tensor:
    """ε (len(indices), *shape) with image i's noise drawn from its own generator seeded by image_seed(seed, i):
    the same numbers whatever the batching, the rank that sees the image, or the state of the global generators."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(image_seed(seed, i)))
                        for i in indices])


@torch.no_grad()
def calibrate(autoencoder: torch.nn.Module, batches, num_samples: int, device: torch.device | str = "cpu",
              sample: bool = False, seed: int = 0, indices: Sequence[int] | None = None,
              reconstruct: bool = True) -> dict:
    """Encode up to `num_samples` images (per rank) and report

    scale_factor = 1/std(z) (unbiased std over every element of every rank), per-channel mean/std, and a
    health report: raw std, scaled mean and std, reconstruction PSNR (of the deterministic latent).
    z is what the regularizer hands stage 2: with `sample` (KL) a posterior sample μ + σ·ε, ε from
    `image_noise(seed, indices[k])` for this rank's k-th image (`indices`: the images' global numbers; default
    0, 1, ...), else the mode; VQ: the pre-quantisation z or z_q (`regularizer.diffuse`). `reconstruct=False`
    skips the decoder (no PSNR: `recon_psnr` is None), for a quick measurement of a large imported VAE.
    """
    reg = autoencoder.regularizer
    sample = bool(sample and reg.stochastic)
    indices = range(num_samples) if indices is None else indices
    c = autoencoder.z_channels
    s = torch.zeros(c, dtype=torch.float64, device=device)     # Σz per channel
    s2 = torch.zeros(c, dtype=torch.float64, device=device)    # Σz² per channel
    n = torch.zeros(c, dtype=torch.float64, device=device)     # element count per channel
    psnr_sum = torch.zeros(2, dtype=torch.float64, device=device)  # Σ psnr, images
    seen = 0
    for batch in batches:
        x = (batch["image"] if isinstance(batch, dict) else batch).to(device)
        x = x[: num_samples - seen]
        moments = autoencoder.encode_moments(x)
        mode = reg.latent(moments, sample=False)  # (B, C, h, w)
        noise = image_noise(mode.shape[1:], indices[seen: seen + len(x)], seed).to(mode) if sample else None
        z = reg.latent(moments, sample=True, noise=noise).double() if sample else mode.double()
        s += z.sum((0, 2, 3))
        s2 += z.pow(2).sum((0, 2, 3))
        n += z[:, 0].numel()
        quality = psnr(autoencoder.decode_latent(mode), x).double().sum() if reconstruct else \
            torch.zeros((), dtype=torch.float64, device=device)
        psnr_sum += torch.stack([quality, torch.tensor(float(len(x)), dtype=torch.float64, device=device)])
        seen += len(x)
        if seen >= num_samples:
            break
    s, s2, n, psnr_sum = (sum_over_ranks(t) for t in (s, s2, n, psnr_sum))
    total = n.sum()
    if total < 2:
        raise RuntimeError("calibration saw no data: check the dataset and autoencoder.calibration.num_samples")
    mean = s.sum() / total
    var = (s2.sum() - total * mean**2) / (total - 1)
    std = math.sqrt(max(float(var), 0.0))
    if not std > 0:
        raise RuntimeError("calibration: the latents have zero variance; the autoencoder has collapsed")
    scale = 1.0 / std
    ch_mean = s / n
    ch_std = ((s2 - n * ch_mean**2) / (n - 1)).clamp_min(0).sqrt()
    return {
        "scale_factor": scale,
        "raw_mean": float(mean),
        "raw_std": std,
        "scaled_mean": float(mean) * scale,
        "scaled_std": std * scale,
        "channel_mean": ch_mean.tolist(),
        "channel_std": ch_std.tolist(),
        "recon_psnr": float(psnr_sum[0] / psnr_sum[1]) if reconstruct else None,
        "num_samples": int(psnr_sum[1]),
        "num_elements": int(total),
        "latent": reg.describe_latent(sample),
        "sample": sample,
        **({"seed": seed} if sample else {}),
    }


def format_report(cal: dict) -> str:
    return (f"calibration on the {cal['latent']}: scale_factor={cal['scale_factor']:.5f}  raw std={cal['raw_std']:.4f} "
            f"mean={cal['raw_mean']:.4f} | scaled mean={cal['scaled_mean']:.4f} std={cal['scaled_std']:.4f} | "
            f"recon PSNR={cal['recon_psnr']:.2f} dB over {cal['num_samples']} images")
