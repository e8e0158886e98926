"""Stage-1 loss: L1 + perceptual over a log-variance (fixed or learned), the KL or VQ term, an adaptive GAN term."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ldm_train.losses.perceptual import build_perceptual
from ldm_train.models.discriminator import PatchDiscriminator
from ldm_train.utils.distributed import mean_over_ranks

log = logging.getLogger(__name__)


def adaptive_disc_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                         disc_weight: float) -> torch.Tensor:
    """λ = clamp(‖∇_L nll‖ / (‖∇_L g‖ + 1e-4), 0, 1e4).detach() · disc_weight, L = the decoder's last weight.

    Under DDP both gradients are averaged over ranks first: λ is then the same on every rank and equals the
    1-process λ of the global batch (whose losses are the mean of the ranks' losses).
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    nll_grad, g_grad = mean_over_ranks(torch.stack([nll_grad, g_grad])).unbind(0)
    lam = torch.clamp(nll_grad.norm() / (g_grad.norm() + 1e-4), 0.0, 1e4).detach()
    return lam * disc_weight


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½ (mean relu(1 − D(x)) + mean relu(1 + D(x̂)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½ (mean softplus(−D(x)) + mean softplus(D(x̂)))."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


# the per-pixel term of rec: CompVis' L1, or the squared error of SD's ft-MSE VAE recipe (MSE + 0.1·LPIPS)
PIXEL_LOSSES = {"l1": torch.abs, "l2": torch.square}


class AutoencoderLoss(nn.Module):
    """rec = |x − x̂| (or (x − x̂)², `pixel_loss="l2"`) + w_p·P(x, x̂); nll = rec/exp(logvar) + logvar;
    + reg_weight·reg + λ·g after disc_start.

    `reduction="sum"` (KL) sums nll over C,H,W and averages over the batch, as CompVis does, so kl_weight 1e-6
    keeps the paper's meaning; `reduction="mean"` (VQ) uses plain means, as taming does. Both come from the
    regularizer (`reduction`, and `reg_key`: the entry of its log dict that is its loss). That meaning holds with
    the fixed logvar (`learn_logvar=False`, CompVis' behaviour). A learned logvar settles at exp(logvar) ≈ mean(rec),
    which divides the reconstruction gradient by mean(rec): the regularizer then weighs reg_weight·mean(rec)
    relative to the reconstruction, not reg_weight.
    """

    def __init__(self, *, reduction: str, reg_weight: float, reg_key: str, perceptual: dict, disc: dict,
                 disc_start: int | None, disc_weight: float = 0.5, disc_loss: str = "hinge",
                 learn_logvar: bool = False, logvar_init: float = 0.0, pixel_loss: str = "l1"):
        super().__init__()
        if pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"unknown loss.pixel_loss {pixel_loss!r}; valid: {', '.join(PIXEL_LOSSES)}")
        self.pixel_loss = PIXEL_LOSSES[pixel_loss]
        if reduction not in ("sum", "mean"):
            raise ValueError(f"loss.reduction must be sum or mean, got {reduction!r}")
        if disc_loss not in D_LOSSES:
            raise ValueError(f"unknown loss.disc_loss {disc_loss!r}; valid: {', '.join(D_LOSSES)}")
        self.reduction, self.reg_weight, self.reg_key = reduction, reg_weight, reg_key
        self.perceptual_weight = perceptual["weight"]
        self.perceptual, self.perceptual_name = build_perceptual(perceptual)
        # sync_batchnorm is applied by the Trainer (SyncBatchNorm conversion), not a layer option
        self.discriminator = PatchDiscriminator(**{k: v for k, v in disc.items() if k != "sync_batchnorm"})
        self.disc_start, self.disc_weight, self.disc_loss_name = disc_start, disc_weight, disc_loss
        # shape (1,), not a scalar: FSDP refuses 0-d parameters
        self.logvar = nn.Parameter(torch.full((1,), float(logvar_init)), requires_grad=learn_logvar)

    def disc_factor(self, step: int) -> float:
        """1 from `disc_start` on, 0 before: nothing adversarial happens before it (never with disc_start None)."""
        return 1.0 if self.disc_start is not None and step >= self.disc_start else 0.0

    def reconstruction(self, x: torch.Tensor, xrec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel rec (B, C, H, W) and the perceptual distance (B, 1, 1, 1) used in it."""
        rec = self.pixel_loss(x - xrec)
        p = torch.zeros((), device=x.device)
        if self.perceptual_weight > 0:
            p = self.perceptual(x.contiguous(), xrec.contiguous())  # (B, 1, 1, 1)
            rec = rec + self.perceptual_weight * p
        return rec, p

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1).sum(1).mean() if self.reduction == "sum" else t.mean()

    def generator_loss(self, x: torch.Tensor, xrec: torch.Tensor, reg_log: dict, step: int,
                       last_layer: torch.Tensor) -> tuple[torch.Tensor, dict]:
        rec, p = self.reconstruction(x, xrec)
        nll = self.reduce(rec / self.logvar.exp() + self.logvar)
        loss = nll + self.reg_weight * reg_log[self.reg_key]
        factor = self.disc_factor(step)
        logs = {"rec": rec.detach().mean(), "l1": (x - xrec).detach().abs().mean(),
                self.perceptual_name: p.detach().mean(), "nll": nll.detach(), "logvar": self.logvar.detach()[0],
                "disc_factor": factor}  # a float: a new CPU tensor per step would be a host→device copy
        logs.update({k: v.detach() for k, v in reg_log.items()})
        if factor > 0:
            g = -self.discriminator(xrec.contiguous()).mean()
            lam = adaptive_disc_weight(nll, g, last_layer, self.disc_weight) if self.training else \
                torch.tensor(0.0, device=x.device)
            loss = loss + lam * factor * g
            logs.update(g=g.detach(), disc_lambda=lam)
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, xrec: torch.Tensor, step: int) -> tuple[torch.Tensor | None, dict]:
        """Discriminator loss on detached inputs; None before disc_start (no D step happens)."""
        if self.disc_factor(step) == 0:
            return None, {}
        real = self.discriminator(x.detach().contiguous())
        fake = self.discriminator(xrec.detach().contiguous())
        d = D_LOSSES[self.disc_loss_name](real, fake)
        return d, {"d_loss": d.detach(), "logits_real": real.detach().mean(), "logits_fake": fake.detach().mean()}
