"""Latent regularizers. Each is a module mapping encoder moments to `(z, log_dict)` so KL and VQ swap by config.

Each class also owns what the rest of the code needs to know about its kind (no `name == "kl"` elsewhere):
how many moments the encoder emits, the loss key and weight key, the reconstruction reduction that goes with it,
its architecture entries, which latent stage 2 diffuses and what the latent cache stores. `REGULARIZERS` maps
a config name to its class.
"""

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
    moments_per_channel = 2      # the encoder emits [mean, logvar]
    loss_key = "kl"              # the entry of the log dict that is the regularization loss
    weight_key = "kl_weight"     # the key of its weight in conf/regularizer/kl.yaml
    reduction = "sum"            # the KL is a sum over C,H,W, so the reconstruction term is too (CompVis)
    stochastic = True            # a posterior to sample: stage 2 may train on samples or on the mode
    diffusers_vae = True         # diffusers' AutoencoderKL holds this kind (export to diffusers / single file)
    cache_stores = "mean+std"    # the latent cache holds the posterior, and stage 2 samples from it per step
    cache_key = "mean"
    stage2_options: tuple[str, ...] = ()  # options that change what stage 2 sees (none: sampling is stage 2's)

    def __init__(self, sample: bool = True, logvar_clamp: tuple[float, float] = (-30.0, 20.0)):
        super().__init__()
        self.sample = sample
        self.logvar_clamp = logvar_clamp

    @classmethod
    def from_config(cls, cfg: dict, z_channels: int) -> DiagonalGaussianRegularizer:
        return cls(sample=cfg.get("sample", True))

    @staticmethod
    def arch_entries(cfg: dict, table: dict) -> dict:
        """What the artifact's architecture records of this regularizer (`cfg`: the regularizer config)."""
        return {"name": "kl", "sample": cfg["sample"]}

    def posterior(self, moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*self.logvar_clamp)

    def latent(self, moments: torch.Tensor, sample: bool, noise: torch.Tensor | None = None) -> torch.Tensor:
        """z = μ + σ·ε (sample; ε = `noise` if given, else drawn from the global generator) or μ (mode)."""
        mean, logvar = self.posterior(moments)
        if not sample:
            return mean
        return mean + (torch.randn_like(mean) if noise is None else noise.to(mean)) * (0.5 * logvar).exp()

    def describe_latent(self, sample: bool) -> str:
        return "posterior sample" if sample else "posterior mode"

    def cache_latents(self, moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the latent cache stores: (μ, σ), so that stage 2 can sample or take the mode from it."""
        mean, logvar = self.posterior(moments)
        return mean, (0.5 * logvar).exp()

    def snap(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def forward(self, moments: torch.Tensor) -> tuple[torch.Tensor, dict]:
        mean, logvar = self.posterior(moments)
        z = self.latent(moments, sample=self.sample and self.training)
        return z, {"kl": kl_to_standard_normal(mean, logvar)}


def vq_loss(z: torch.Tensor, z_q: torch.Tensor, beta: float) -> torch.Tensor:
    """β·‖z − sg[z_q]‖² (commitment, trains the encoder) + ‖sg[z] − z_q‖² (codebook), both as means."""
    return beta * F.mse_loss(z, z_q.detach()) + F.mse_loss(z.detach(), z_q)


VQ_DIFFUSE = ("pre_quant", "quantized")


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantizer with a straight-through gradient and dead-code restart.

    `diffuse` chooses the latent stage 2 works on: `pre_quant` (CompVis' LDM: the encoder output before the
    codebook; generated latents are quantized in decode) or `quantized` (z_q; decode snaps generated latents to the
    codebook too). Artifacts written before the option existed diffused z_q, so a missing entry means `quantized`.
    """

    name = "vq"
    moments_per_channel = 1
    loss_key = "vq_loss"
    weight_key = "codebook_weight"
    reduction = "mean"           # the VQ loss is a mean, so the reconstruction term is too (taming)
    stochastic = False
    diffusers_vae = False        # diffusers' VQModel is not part of the SD pipelines we export to
    stage2_options = ("diffuse",)

    def __init__(self, n_embed: int, z_channels: int, beta: float = 0.25, restart_every: int = 200,
                 restart: bool = True, diffuse: str = "pre_quant"):
        super().__init__()
        if diffuse not in VQ_DIFFUSE:
            raise ValueError(f"regularizer.diffuse={diffuse!r}; valid: {', '.join(VQ_DIFFUSE)}")
        self.n_embed, self.beta, self.diffuse = n_embed, beta, diffuse
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

    @classmethod
    def from_config(cls, cfg: dict, z_channels: int) -> VectorQuantizer:
        return cls(cfg["n_embed"], z_channels, beta=cfg.get("beta", 0.25), restart=cfg.get("restart", True),
                   restart_every=cfg.get("restart_every", 200), diffuse=cfg.get("diffuse", "quantized"))

    @staticmethod
    def arch_entries(cfg: dict, table: dict) -> dict:
        """The codebook size comes from the f<f>.yaml table, the rest from the regularizer config."""
        return {"name": "vq", "n_embed": table["n_embed"], "beta": cfg["beta"], "restart": cfg["restart"],
                "restart_every": cfg["restart_every"], "diffuse": cfg["diffuse"]}

    @property
    def pre_quant(self) -> bool:
        return self.diffuse == "pre_quant"

    @property
    def cache_stores(self) -> str:
        return "z" if self.pre_quant else "z_q"

    @property
    def cache_key(self) -> str:
        return "z" if self.pre_quant else "zq"

    def latent(self, moments: torch.Tensor, sample: bool, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The latent stage 2 diffuses: the encoder output z (pre_quant) or z_q (quantized); `sample` is moot."""
        return moments if self.pre_quant else self.quantize(moments)[0]

    def describe_latent(self, sample: bool) -> str:
        return "pre-quantisation z" if self.pre_quant else "z_q"

    def cache_latents(self, moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.latent(moments, sample=False), None

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


REGULARIZERS: dict[str, type[nn.Module]] = {"kl": DiagonalGaussianRegularizer, "vq": VectorQuantizer}


def regularizer_class(name: str) -> type[nn.Module]:
    """The class registered under a config name (`regularizer.name`)."""
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r}; valid: {', '.join(REGULARIZERS)} "
                         f"(regularizer={' or regularizer='.join(REGULARIZERS)})")
    return REGULARIZERS[name]


def build_regularizer(cfg: dict, z_channels: int) -> nn.Module:
    """Regularizer from its config (`name` plus its options)."""
    return regularizer_class(cfg["name"]).from_config(cfg, z_channels)
