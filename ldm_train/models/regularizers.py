"""Latent regularizers. Each is a module mapping encoder moments to `(z, log_dict)` so KL and VQ swap by config."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) = ½ Σ_{C,H,W} (μ² + σ² − 1 − log σ²), averaged over the batch."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)  # (B, C, H, W)
    return kl.flatten(1).sum(1).mean()


class DiagonalGaussianRegularizer(nn.Module):
    """KL-regularised latent: moments (B, 2C, h, w) = [mean, logvar] of a diagonal Gaussian posterior."""

    name = "kl"

    def __init__(self, sample: bool = True, logvar_clamp: tuple[float, float] = (-30.0, 20.0)):
        super().__init__()
        self.sample = sample
        self.logvar_clamp = logvar_clamp

    def posterior(self, moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*self.logvar_clamp)

    def latent(self, moments: torch.Tensor, sample: bool) -> torch.Tensor:
        mean, logvar = self.posterior(moments)
        return mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean

    def snap(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def forward(self, moments: torch.Tensor) -> tuple[torch.Tensor, dict]:
        mean, logvar = self.posterior(moments)
        z = self.latent(moments, sample=self.sample and self.training)
        return z, {"kl": kl_to_standard_normal(mean, logvar)}


def vq_loss(z: torch.Tensor, z_q: torch.Tensor, beta: float) -> torch.Tensor:
    """β·‖z − sg[z_q]‖² (commitment, trains the encoder) + ‖sg[z] − z_q‖² (codebook), both as means."""
    return beta * F.mse_loss(z, z_q.detach()) + F.mse_loss(z.detach(), z_q)


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantizer with a straight-through gradient and dead-code restart."""

    name = "vq"

    def __init__(self, n_embed: int, z_channels: int, beta: float = 0.25, restart_every: int = 200,
                 restart: bool = True):
        super().__init__()
        self.n_embed, self.beta = n_embed, beta
        self.restart, self.restart_every = restart, restart_every
        self.embedding = nn.Embedding(n_embed, z_channels)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)
        self.register_buffer("usage", torch.zeros(n_embed), persistent=True)  # hits since the last restart
        self.register_buffer("steps", torch.zeros((), dtype=torch.long), persistent=True)
        self.restarted = 0
        self._host_steps: int | None = 0  # host copy of `steps`: no device read (host sync) per training step

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Indices of the nearest codes for flat (N, C) vectors."""
        e = self.embedding.weight  # (K, C)
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]  # (N, K)
        return d.argmin(1)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # (BHW, C)
        idx = self.nearest(flat)
        z_q = self.embedding(idx).view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, h, w)
        return z_q, idx

    def latent(self, moments: torch.Tensor, sample: bool) -> torch.Tensor:
        return self.quantize(moments)[0]

    def snap(self, z: torch.Tensor) -> torch.Tensor:
        return self.quantize(z)[0]

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        z_q, idx = self.quantize(z)
        loss = vq_loss(z, z_q, self.beta)
        z_st = z + (z_q - z).detach()  # straight-through: forward is z_q, gradient flows to z
        counts = torch.bincount(idx, minlength=self.n_embed).float()
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        if self.training:
            self.usage += counts
            if self._host_steps is None:  # once after a checkpoint load
                self._host_steps = int(self.steps)
            self._host_steps += 1
            self.steps.fill_(self._host_steps)
            if self.restart and self._host_steps % self.restart_every == 0:
                self.restart_dead_codes(z.detach())
        log = {"vq_loss": loss, "perplexity": perplexity, "code_usage": (counts > 0).float().mean()}
        return z_st, log

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._host_steps = None  # `steps` was loaded: re-read it once

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor) -> None:
        """Re-seed codes unused since the last restart with random recent encoder outputs (same on every rank)."""
        usage = self.usage.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(usage)
        dead = (usage == 0).nonzero().flatten()
        if len(dead):
            flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            pick = torch.randint(0, flat.shape[0], (len(dead),), device=flat.device)
            new = flat[pick] + 1e-3 * torch.randn_like(flat[pick])
            if dist.is_available() and dist.is_initialized():
                dist.broadcast(new, src=0)
            self.embedding.weight.data[dead] = new
        self.restarted += len(dead)
        self.usage.zero_()


def build_regularizer(cfg: dict, z_channels: int) -> nn.Module:
    """Regularizer from its config (`name: kl|vq` plus its options)."""
    name = cfg["name"]
    if name == "kl":
        return DiagonalGaussianRegularizer(sample=cfg.get("sample", True))
    if name == "vq":
        return VectorQuantizer(cfg["n_embed"], z_channels, beta=cfg.get("beta", 0.25),
                               restart=cfg.get("restart", True), restart_every=cfg.get("restart_every", 200))
    raise ValueError(f"unknown regularizer {name!r}; valid: kl, vq (regularizer=kl or regularizer=vq)")
