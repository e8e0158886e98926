"""Stage-1 LightningModule: wires the Autoencoder, its loss and two Adam optimizers (manual optimisation)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldm_train.lit.checkpoints import check_state_shapes
from ldm_train.lit.nonfinite import guard_step
from ldm_train.lit.optim import build_optimizer, build_scheduler
from ldm_train.lit.trainer import use_fused_optimizer
from ldm_train.losses.autoencoder_loss import AutoencoderLoss
from ldm_train.models.autoencoder import Autoencoder
from ldm_train.utils.distributed import mean_logs_over_ranks, seed_per_rank
from ldm_train.utils.images import save_grid

log = logging.getLogger(__name__)


class AutoencoderModule(L.LightningModule):
    """Each batch: one generator step (reconstruction + regularizer [+ λ·g]) then one discriminator step.

    Lightning counts every optimizer.step() in global_step, and both optimizers step on every batch, so the
    batch index is global_step // 2 (the discriminator step is a no-op before disc_start).
    """

    def __init__(self, arch: dict, loss: dict, reg_weight: float, lr: float, optimizer: dict | Callable,
                 lr_scheduler: dict | Callable | None = None, out_dir: str | None = None, channels_last: bool = True,
                 compile: bool = False, train_encoder: bool = True, latent_noise: float = 0.0):
        """`optimizer` / `lr_scheduler`: `_target_` + `_partial_` config nodes (or built partials) for both the
        generator's and the discriminator's optimizer; `lr` and `fused` are added here (see lit/optim.py).
        `train_encoder=False` freezes the encoder and quant_conv (SD's ft-MSE recipe: only the decoder learns, so
        the latents, and with them a diffusion model trained on them, stay valid).
        `latent_noise` > 0: the training reconstructions decode noised latents (`Autoencoder.forward`); KL only (VQ
        logs that it trains without it)."""
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.autoencoder = Autoencoder(arch)
        if not train_encoder:
            self.autoencoder.encoder.requires_grad_(False)
            self.autoencoder.quant_conv.requires_grad_(False)
        self.channels_last = channels_last
        if channels_last:
            self.autoencoder.to(memory_format=torch.channels_last)
        # kept in a list so its parameters are not registered twice; MFUMonitor's counting batch runs eagerly
        self._compiled = [torch.compile(self.autoencoder)] if compile else []
        self.counting_flops = False
        reg = self.autoencoder.regularizer  # its loss is a sum (KL) or a mean (VQ): the reconstruction follows
        if latent_noise and not reg.stochastic:  # e.g. regularizer=vq in a sweep over the quickstart, which sets it
            log.warning("autoencoder.latent_noise=%g does not apply to a %s autoencoder (its decoder only ever sees "
                        "codebook vectors: generated latents are snapped to them): training without it",
                        latent_noise, reg.name)
            latent_noise = 0.0
        self.latent_noise = float(latent_noise)
        disc = dict(loss["disc"], in_channels=arch["in_channels"])
        self.loss = AutoencoderLoss(reduction=reg.reduction, reg_weight=reg_weight, reg_key=reg.loss_key,
                                    perceptual=loss["perceptual"], disc=disc, disc_start=loss["disc_start"],
                                    disc_weight=loss["disc_weight"],
                                    disc_loss=loss["disc_loss"], learn_logvar=loss["learn_logvar"],
                                    logvar_init=loss["logvar_init"], pixel_loss=loss["pixel_loss"])
        self.lr, self.optimizer_spec, self.lr_scheduler_spec = lr, optimizer, lr_scheduler
        self.out_dir = out_dir
        self.val_psnr = PeakSignalNoiseRatio(data_range=2.0, reduction="elementwise_mean", dim=(1, 2, 3))
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=2.0)
        self.perceptual_name = self.loss.perceptual_name

    @property
    def batch_step(self) -> int:
        return self.global_step // 2

    def training_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]  # (B, 3, H, W) in [-1, 1]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        opt_g, opt_d = self.optimizers()
        step = self.batch_step
        net = self._compiled[0] if self._compiled and not self.counting_flops else self.autoencoder
        xrec, reg_log = net(x, self.latent_noise)
        g_loss, logs = self.loss.generator_loss(x, xrec, reg_log, step, self.autoencoder.last_layer)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        # both backward passes before either step (D's loss uses detached x̂, and opt_g holds no D parameter, so
        # the numbers are those of "step G, then D"), so one finiteness check can skip both steps
        d_loss, d_logs = self.loss.discriminator_loss(x, xrec, step)
        opt_d.zero_grad(set_to_none=True)  # also drops the D gradients that the generator's g term left
        if d_loss is not None:
            self.manual_backward(d_loss)
        guard_step(self, [g_loss, d_loss], [opt_g, opt_d])  # non-finite: gradients dropped, both steps change nothing
        opt_g.step()
        opt_d.step()  # counted by Lightning either way, which keeps batch_step = global_step // 2
        logs["lr"] = opt_g.param_groups[0]["lr"]  # the LR this step used
        scheds = self.lr_schedulers()  # manual optimisation: we step them, once per batch
        for sched in scheds if isinstance(scheds, list) else [scheds] if scheds else []:
            sched.step()
        logs.update(d_logs)
        logs = mean_logs_over_ranks(logs, x.device)  # the global batch's values, not rank 0's share
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, on_epoch=False, batch_size=len(x))
        # the bar shows the reconstruction loss: the total holds the (negative when logvar is learned) NLL
        self.log("bar/rec", logs["rec"], prog_bar=True, logger=False, batch_size=len(x))

    def on_train_start(self) -> None:
        if self.trainer.world_size > 1:  # own posterior samples per rank; weights stay identical (DDP broadcast)
            seed_per_rank(self.global_step)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        xrec, _ = self.autoencoder(x)
        xrec = xrec.clamp(-1, 1)
        self.val_psnr.update(xrec, x)
        self.val_ssim.update(xrec, x)
        # recon_*: the names stage=evaluate and the ablation report use for the same measurements
        self.log(f"val/recon_{self.perceptual_name}", self.loss.perceptual(x, xrec).mean(), sync_dist=True,
                 batch_size=len(x))
        self.log("val/recon_l1", (x - xrec).abs().mean(), sync_dist=True, batch_size=len(x))
        if batch_idx == 0 and self.trainer.is_global_zero:
            n = min(8, len(x))
            grid = torch.cat([x[:n], xrec[:n]])
            path = save_grid(grid, run_dir_of(self) / "recon" / f"step_{self.batch_step:07d}.png", nrow=n, scale=2)
            if hasattr(self.logger, "log_image"):  # wandb shows the grid; every logger gets the PNG file
                self.logger.log_image("val/reconstructions", [str(path)], step=self.global_step)

    def on_validation_epoch_end(self) -> None:
        self.log("val/recon_psnr", self.val_psnr.compute(), prog_bar=True)
        self.log("val/recon_ssim", self.val_ssim.compute())
        self.val_psnr.reset()
        self.val_ssim.reset()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # checkpoints from before loss.logvar became shape (1,) (FSDP refuses scalars) hold a 0-d tensor and Adam state
        state_dict = checkpoint.get("state_dict", {})
        logvar = state_dict.get("loss.logvar")
        if logvar is not None and not logvar.ndim:
            self._upgrade_scalar_logvar(checkpoint)
        check_state_shapes(self.state_dict(), state_dict)  # one line, not Lightning's line per mismatched key

    @staticmethod
    def _upgrade_scalar_logvar(checkpoint: dict) -> None:
        state_dict = checkpoint["state_dict"]
        state_dict["loss.logvar"] = state_dict["loss.logvar"].reshape(1)
        for optimizer in checkpoint.get("optimizer_states", []):
            for state in optimizer.get("state", {}).values():  # logvar is the only 0-d parameter
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    if key in state and state[key].ndim == 0:
                        state[key] = state[key].reshape(1)

    def configure_optimizers(self):
        g_params = [p for p in self.autoencoder.parameters() if p.requires_grad]
        if self.loss.logvar.requires_grad:
            g_params.append(self.loss.logvar)
        fused = use_fused_optimizer(self)  # one kernel for all parameters
        opt_g = build_optimizer(self.optimizer_spec, g_params, self.lr, fused)
        opt_d = build_optimizer(self.optimizer_spec, self.loss.discriminator.parameters(), self.lr, fused)
        if self.lr_scheduler_spec is None:  # constant LR
            return [opt_g, opt_d]
        return [opt_g, opt_d], [build_scheduler(self.lr_scheduler_spec, o) for o in (opt_g, opt_d)]


def run_dir_of(module: L.LightningModule) -> Path:
    return Path(module.out_dir) if module.out_dir else Path(module.trainer.default_root_dir)
