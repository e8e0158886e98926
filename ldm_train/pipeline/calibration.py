"""Latent scale-factor calibration: scale_factor = 1/std(z), measured over all elements and all ranks."""

from __future__ import annotations

import math

import torch

from ldm_train.utils.distributed import sum_over_ranks


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = (x - y).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(4.0 / mse)


@torch.no_grad()
def calibrate(autoencoder: torch.nn.Module, batches, num_samples: int, device: torch.device | str = "cpu") -> dict:
    """Encode up to `num_samples` images (per rank; z = posterior mode for KL, z_q for VQ) and report

    scale_factor = 1/std(z) (unbiased std over every element of every rank), per-channel mean/std, and a
    health report: raw std, scaled mean and std, reconstruction PSNR.
    """
    c = autoencoder.z_channels
    s = torch.zeros(c, dtype=torch.float64, device=device)     # Σz per channel
    s2 = torch.zeros(c, dtype=torch.float64, device=device)    # Σz² per channel
    n = torch.zeros(c, dtype=torch.float64, device=device)     # element count per channel
    psnr_sum = torch.zeros(2, dtype=torch.float64, device=device)  # Σ psnr, images
    seen = 0
    for batch in batches:
        x = (batch["image"] if isinstance(batch, dict) else batch).to(device)
        x = x[: num_samples - seen]
        z = autoencoder.latent(x, sample=False).double()  # (B, C, h, w)
        s += z.sum((0, 2, 3))
        s2 += z.pow(2).sum((0, 2, 3))
        n += z[:, 0].numel()
        psnr_sum += torch.stack([psnr(autoencoder.decode_latent(z.float()), x).double().sum(),
                                 torch.tensor(float(len(x)), dtype=torch.float64, device=device)])
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
        "recon_psnr": float(psnr_sum[0] / psnr_sum[1]),
        "num_samples": int(psnr_sum[1]),
        "num_elements": int(total),
        "latent": "posterior mode" if autoencoder.arch["regularizer"]["name"] == "kl" else "z_q",
    }


def format_report(cal: dict) -> str:
    return (f"calibration: scale_factor={cal['scale_factor']:.5f}  raw std={cal['raw_std']:.4f} "
            f"mean={cal['raw_mean']:.4f} | scaled mean={cal['scaled_mean']:.4f} std={cal['scaled_std']:.4f} | "
            f"recon PSNR={cal['recon_psnr']:.2f} dB over {cal['num_samples']} images")
