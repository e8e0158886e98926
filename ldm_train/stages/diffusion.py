"""Stage 2: train the text-conditional U-Net on scaled latents of the frozen, calibrated autoencoder."""

from __future__ import annotations

import logging
import time

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from ldm_train.config import ConfigError, autoencoder_dir, diffusion_dir, run_dir
from ldm_train.data import build_datasets, make_loader
from ldm_train.data.distributed import trainer_loaders
from ldm_train.data.health import DataHealth
from ldm_train.data.images import caption_limit
from ldm_train.data.latents import check_cache, read_info
from ldm_train.lit.diffusion import DiffusionModule
from ldm_train.lit.trainer import build_trainer, global_batch, save_final_checkpoint
from ldm_train.models.text import build_text_encoder
from ldm_train.models.unet import UNet
from ldm_train.pipeline.artifacts import save_diffusion
from ldm_train.pipeline.first_stage import FirstStage
from ldm_train.sampling import generate

log = logging.getLogger(__name__)


def build_unet(unet_cfg: dict, latent_channels: int, context_dim: int) -> UNet:
    cfg = dict(unet_cfg)
    if cfg["context_dim"] != context_dim:
        raise ConfigError(f"unet.context_dim={cfg['context_dim']} but the text encoder's width is {context_dim}; "
                          "leave unet.context_dim=${text_encoder.dim} or set it to the encoder's width")
    in_channels = cfg.pop("in_channels", latent_channels)
    if in_channels != latent_channels:
        raise ConfigError(f"unet.in_channels={in_channels} but the autoencoder's latents have {latent_channels} "
                          "channels; remove the override (it follows the artifact)")
    return UNet(in_channels=latent_channels, **cfg)


def diffusion_config(cfg: DictConfig, first_stage: FirstStage) -> dict:
    """Everything needed to rebuild and sample the model, stored as the artifact's config.yaml."""
    return {"unet": OmegaConf.to_container(cfg.unet, resolve=True),
            "text_encoder": OmegaConf.to_container(cfg.text_encoder, resolve=True),
            "diffusion": OmegaConf.to_container(cfg.diffusion, resolve=True),
            "resolution": cfg.data.resolution, "latent_channels": first_stage.latent_channels,
            "f": int(cfg.f), "regularizer": cfg.regularizer.name, "data": cfg.data.name}


def run(cfg: DictConfig) -> dict:
    L.seed_everything(cfg.seed, workers=True)
    d = cfg.diffusion
    first_stage = FirstStage.from_artifact(autoencoder_dir(cfg), cfg.f, cfg.regularizer.name, d.sample_posterior)
    first_stage.check_options(OmegaConf.to_container(cfg.regularizer, resolve=True))
    text_encoder = build_text_encoder(OmegaConf.to_container(cfg.text_encoder, resolve=True))
    if cfg.data.name == "latents":  # the cache must come from this autoencoder; its resolution is the run's
        info = read_info(cfg.data)
        check_cache(info, first_stage, OmegaConf.to_container(cfg.text_encoder, resolve=True))
        with open_dict(cfg):
            cfg.data.resolution = info["resolution"]
    train_ds, val_ds = build_datasets(cfg.data, caption_limit(text_encoder))
    probe = next(iter(make_loader(train_ds, max(d.batch_size, 16), True)))
    latents = DiffusionModule.batch_latents(first_stage, probe) if "latent" in probe else None
    stats = first_stage.health_check(probe.get("image"), tuple(d.latent_std_range), latents)
    log.info("latent health check passed: scaled mean %.3f std %.3f (scale_factor %.5f)", stats["scaled_mean"],
             stats["scaled_std"], stats["scale_factor"])
    unet = build_unet(OmegaConf.to_container(cfg.unet, resolve=True), first_stage.latent_channels, text_encoder.dim)
    log.info("U-Net %.2fM parameters; text encoder %s (dim %d, %s)", sum(p.numel() for p in unet.parameters()) / 1e6,
             cfg.text_encoder.name, text_encoder.dim, "trained jointly" if text_encoder.trainable else "frozen")
    alignment = None
    if cfg.data.name == "shapes":
        from ldm_train.data.shapes import caption_alignment as alignment
    module = DiffusionModule(unet, text_encoder, first_stage, OmegaConf.to_container(d, resolve=True),
                             cfg.data.resolution, out_dir=str(run_dir(cfg)), alignment_fn=alignment,
                             channels_last=cfg.trainer.get("channels_last", True))
    trainer = build_trainer(cfg, job_type="diffusion", max_steps=d.max_steps, val_every=min(d.val_every, d.max_steps),
                            limit_val_batches=2, max_time=d.get("max_time"), gradient_clip_val=d.grad_clip or None,
                            callbacks=[DataHealth(cfg.data.get("max_skip_fraction", 0.05))])
    global_batch(trainer, d.batch_size, "stage 2")
    train_loader, val_loader = trainer_loaders(trainer, train_ds, val_ds, d.batch_size, cfg.seed, cfg.data.num_workers)
    start = time.time()
    trainer.fit(module, train_loader, val_loader, ckpt_path=cfg.ckpt_path, weights_only=True)
    train_seconds = time.time() - start
    save_final_checkpoint(trainer, cfg)
    metrics = {"train_seconds": train_seconds, "steps": trainer.global_step,
               **{k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}}

    ema_unet, ema_text = module.ema_models()
    if d.eval_samples and cfg.data.name == "shapes":
        from ldm_train.evaluation.alignment import alignment_scores

        def gen(prompts, scale, seed):
            return generate(ema_unet, ema_text, first_stage, module.schedule, prompts, resolution=cfg.data.resolution,
                            prediction_type=d.prediction_type, guidance_scale=scale, sampler=d.sampler,
                            steps=d.steps, seed=seed)

        metrics.update(alignment_scores(gen, d.eval_samples, d.guidance_scale))
        log.info("caption alignment: cfg %.3f, no cfg %.3f, null prompt %.3f", metrics["caption_alignment_cfg"],
                 metrics["caption_alignment_nocfg"], metrics["caption_alignment_null"])
    target = diffusion_dir(cfg)
    if trainer.is_global_zero:
        save_diffusion(target, ema_unet, ema_text if text_encoder.trainable else None,
                       diffusion_config(cfg, first_stage), first_stage.path, metrics)
        log.info("wrote diffusion artifact %s", target)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return metrics
