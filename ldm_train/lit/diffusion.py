"""Stage-2 LightningModule: the parameterisation's loss on scaled latents with CFG dropout, EMA and sample grids."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from ldm_train.diffusion.ema import EMA
from ldm_train.diffusion.schedules import offset_noise
from ldm_train.lit.checkpoints import check_state_shapes
from ldm_train.lit.nonfinite import guard_step
from ldm_train.lit.optim import build_optimizer, build_scheduler
from ldm_train.lit.trainer import clip_gradients, use_fused_optimizer
from ldm_train.models.lora import frozen_parameters, has_lora
from ldm_train.pipeline.first_stage import FirstStage
from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline
from ldm_train.utils.distributed import mean_logs_over_ranks, seed_per_rank
from ldm_train.utils.images import save_grid


def cfg_drop_mask(batch_size: int, p: float, device: torch.device | str = "cpu",
                  force: torch.Tensor | None = None) -> torch.Tensor:
    """Bool (B,): True where a sample's conditioning is replaced by the null conditioning (prob. p), or `force`."""
    if force is not None:
        return force.to(device=device, dtype=torch.bool)
    return torch.rand(batch_size, device=device) < p


class DiffusionModule(L.LightningModule):
    """Trains the denoiser (and a jointly trained text encoder) of `pipeline`; `cfg` is the `diffusion` config."""

    def __init__(self, pipeline: LatentDiffusionPipeline, cfg: dict, out_dir: str | None = None, alignment_fn=None,
                 channels_last: bool = True):
        super().__init__()
        self.channels_last = channels_last
        unet, text_encoder, first_stage = pipeline.denoiser, pipeline.text_encoder, pipeline.first_stage
        if channels_last:  # before the EMA copy, so both share one layout
            unet.to(memory_format=torch.channels_last)
            first_stage.use_channels_last()  # encoding is a third of a small stage-2 step on a CPU
        self.unet, self.text_encoder, self.first_stage = unet, text_encoder, first_stage
        self._pipeline = [pipeline]  # in a list: its modules are registered above, not a second time
        self.parameterization = pipeline.parameterization
        self.cfg = cfg
        self.out_dir = out_dir
        self.alignment_fn = alignment_fn
        parts = {"unet": unet}
        if getattr(text_encoder, "trainable", False):
            parts["text_encoder"] = text_encoder
        self._trainable = [nn.ModuleDict(parts)]  # in a list: the same modules, not registered a second time
        # a LoRA'd U-Net: the EMA averages the adapters and shares the frozen base (no second copy of it)
        self.ema = EMA(self.trainable(), max_decay=cfg["ema_decay"],
                       shared=frozen_parameters(unet) if has_lora(unet) else ())
        self.force_drop: torch.Tensor | None = None  # tests set this to force CFG dropout
        # compiled lazily on first use; kept in a list so its parameters are not registered twice
        self._compiled: list[nn.Module] = [torch.compile(unet)] if cfg.get("compile") else []
        self.counting_flops = False  # set by MFUMonitor: count FLOPs on the eager network
        self._step_loss: torch.Tensor | None = None  # this step's loss, for the finiteness check
        self._step_finite = True

    def trainable(self) -> nn.ModuleDict:
        """What the optimizer and the EMA see: the U-Net, plus the text encoder when it trains jointly. Of a LoRA'd
        U-Net only the adapters require gradients: the optimizer takes those alone."""
        return self._trainable[0]

    def ema_pipeline(self) -> LatentDiffusionPipeline:
        """The pipeline with the EMA weights (the text encoder's EMA copy when it trains jointly, else the frozen
        one): what validation samples from and what the artifact stores."""
        ema, pipe = self.ema.module, self._pipeline[0]
        text = ema["text_encoder"] if "text_encoder" in ema else self.text_encoder
        return LatentDiffusionPipeline(self.first_stage, ema["unet"], text, self.parameterization, pipe.config)

    def diffusion_loss(self, z0: torch.Tensor, context: torch.Tensor,
                       generator: torch.Generator | None = None, size_cond: torch.Tensor | None = None) -> torch.Tensor:
        """MSE between the network output and the parameterisation's target at its training t, optionally min-SNR-γ
        weighted. t and the noise come from `generator` when given (validation), else from the global RNG."""
        c, param = self.cfg, self.parameterization
        t = param.sample_timesteps(z0.shape[0], z0.device, generator)
        if generator is None:
            noise = torch.randn_like(z0)
        else:
            noise = torch.randn(z0.shape, generator=generator, device=generator.device, dtype=z0.dtype).to(z0.device)
        if c["offset_noise"]:
            noise = offset_noise(noise, c["offset_noise"], generator)
        zt = param.noised(z0, t, noise)  # (B, C, h, w)
        if self.channels_last:
            zt = zt.contiguous(memory_format=torch.channels_last)
        net = self._compiled[0] if self._compiled and self.training and not self.counting_flops else self.unet
        out = net(zt, param.model_time(t), context) if size_cond is None else \
            net(zt, param.model_time(t), context, size_cond=size_cond)
        target = param.target(z0, t, noise)
        mse = F.mse_loss(out.float(), target.float(), reduction="none").flatten(1).mean(1)  # (B,)
        if c["min_snr_gamma"]:
            mse = mse * param.min_snr_weight(t, c["min_snr_gamma"]).to(mse)
        return mse.mean()

    @staticmethod
    def batch_latents(first_stage: FirstStage, batch: dict, sample: bool | None = None) -> torch.Tensor:
        """Scaled latents (B, C, h, w) of a batch of images, or of cached raw latents (data=latents)."""
        if "latent" in batch:
            return first_stage.from_cache(batch["latent"], batch.get("latent_std"), sample)
        return first_stage.encode(batch["image"], sample)

    def condition(self, batch: dict, drop: torch.Tensor | None) -> torch.Tensor:
        if "context" in batch:  # cached embeddings of the frozen text encoder; dropped rows get its null context
            ctx = batch["context"]  # (B, L, dim)
            return self.text_encoder.with_null(ctx, drop)
        return self.text_encoder(list(batch["caption"]), labels=batch.get("label"), drop=drop)

    def size_condition(self, batch: dict, drop: torch.Tensor | None) -> torch.Tensor | None:
        """The batch's (B, 6) size conditioning with the CFG-dropped rows zeroed; None without size conditioning."""
        if not self.cfg.get("size_conditioning"):
            return None
        sc = batch["size_cond"].float()
        return sc if drop is None else sc * (~drop.bool()).to(sc)[:, None]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        z0 = self.batch_latents(self.first_stage, batch)  # scaled latents (B, C, h, w)
        drop = cfg_drop_mask(len(z0), self.cfg["cfg_dropout"], z0.device, self.force_drop)
        loss = self.diffusion_loss(z0, self.condition(batch, drop), size_cond=self.size_condition(batch, drop))
        logs = mean_logs_over_ranks({"loss": loss, "cfg_drop_fraction": drop.float().mean()}, z0.device)
        self.log("train/loss", logs["loss"], batch_size=len(z0))  # over the global batch
        self.log("bar/loss", logs["loss"], prog_bar=True, logger=False, batch_size=len(z0))
        self.log("train/cfg_drop_fraction", logs["cfg_drop_fraction"], batch_size=len(z0))
        self._step_loss = loss.detach()
        return loss

    def on_train_start(self) -> None:
        if self.trainer.world_size > 1:  # own noise, t and CFG dropout per rank; init stays identical
            seed_per_rank(self.global_step)

    def on_before_optimizer_step(self, optimizer) -> None:
        # after backward (gradients all-reduced), before clipping and the step: a non-finite step drops its gradients
        self._step_finite = guard_step(self, [self._step_loss], [optimizer])

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        finite = self._step_finite  # True/False, or a device flag (fused optimizer: decided on the device)
        if finite is False:
            return  # a skipped step changed no weight; the EMA must not count it either
        # right after every optimizer step, identically on every rank; not in on_train_batch_end, which runs
        # after the callbacks' hook, so ModelCheckpoint would save the EMA one update behind the weights
        decay = self.ema.update(self.trainable(), None if finite is True else finite)
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.log("train/ema_decay", decay, batch_size=1)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        z0 = self.batch_latents(self.first_stage, batch, sample=False)
        # its own generator: validation never touches (or reseeds) a global CPU or CUDA generator
        gen = torch.Generator(device="cpu").manual_seed(batch_idx)
        loss = self.diffusion_loss(z0, self.condition(batch, None), generator=gen,
                                   size_cond=self.size_condition(batch, None))
        self.log("val/loss", loss, sync_dist=True, batch_size=len(z0))

    def on_validation_epoch_end(self) -> None:
        c = self.cfg
        prompts = [p for p in c["val_prompts"] for _ in range(c["val_n_per_prompt"])]
        images = self.ema_pipeline().generate(prompts)  # the run's `sampling` settings
        if self.alignment_fn is not None:
            self.log("val/caption_alignment", self.alignment_fn(images, prompts), sync_dist=True)
        if self.trainer.is_global_zero:
            out = Path(self.out_dir or self.trainer.default_root_dir) / "samples"
            path = save_grid(images, out / f"step_{self.global_step:07d}.png", nrow=c["val_n_per_prompt"],
                             captions=list(c["val_prompts"]), scale=2)
            if hasattr(self.logger, "log_image"):
                self.logger.log_image("val/samples", [str(path)], step=self.global_step)

    def frozen_prefixes(self) -> tuple[str, ...]:
        """Frozen parts come from their own artifacts/packages; checkpoints need not carry them."""
        return ("first_stage.",) + (() if getattr(self.text_encoder, "trainable", False) else ("text_encoder.",))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        sd = checkpoint["state_dict"]
        for key in [k for k in sd if k.startswith(self.frozen_prefixes())]:
            del sd[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # put the frozen weights back so the strict load still checks every trainable key
        own = self.state_dict()
        checkpoint["state_dict"].update({k: v for k, v in own.items() if k.startswith(self.frozen_prefixes())})
        check_state_shapes(own, checkpoint["state_dict"])  # one line, not Lightning's line per mismatched key

    def configure_optimizers(self):
        c = self.cfg
        params = [p for p in self.trainable().parameters() if p.requires_grad]
        # the fused kernel: one op for all parameters (CUDA, and CPU since torch 2.4), ~4x less optimizer time
        opt = build_optimizer(c["optimizer"], params, c["lr"], use_fused_optimizer(self))
        sched = build_scheduler(c["lr_scheduler"], opt)
        if sched is None:  # constant LR
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
