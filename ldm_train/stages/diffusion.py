"""Stage 2: train the text-conditional U-Net on scaled latents of the frozen, calibrated autoencoder."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from ldm_train.config import (
    ConfigError,
    artifacts_root,
    autoencoder_dir,
    check_against_artifact,
    diffusion_dir,
    run_dir,
    size_multiple,
)
from ldm_train.data import bucketed, build_datasets, make_loader
from ldm_train.data.distributed import trainer_loaders
from ldm_train.data.health import DataHealth, check_skip_fraction
from ldm_train.data.images import SKIP_REASONS, caption_limit, summarize
from ldm_train.data.latents import InMemoryLatents, check_cache, check_cache_buckets, read_info
from ldm_train.data.prompts import validation_prompts
from ldm_train.evaluation.quality import build_quality_monitor
from ldm_train.lit.diffusion import DiffusionModule
from ldm_train.lit.trainer import build_trainer, global_batch, save_final_checkpoint
from ldm_train.models.lora import add_lora, lora_enabled, parameter_counts
from ldm_train.pipeline.first_stage import FirstStage
from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline
from ldm_train.pipeline.provenance import provenance

log = logging.getLogger(__name__)
HEADLINE_METRIC = "val/loss"
SCHEDULE_KEYS = ("num_timesteps", "schedule", "beta_start", "beta_end", "prediction_type")


def pipeline_config(cfg: DictConfig, first_stage: FirstStage) -> dict:
    """The diffusion artifact's config.yaml for this run (see LatentDiffusionPipeline.artifact_config)."""
    def plain(node):
        return OmegaConf.to_container(node, resolve=True)

    return LatentDiffusionPipeline.artifact_config(
        unet=plain(cfg.unet), text_encoder=plain(cfg.text_encoder), diffusion=plain(cfg.diffusion),
        sampling=plain(cfg.sampling), resolution=cfg.data.resolution, first_stage=first_stage, data=cfg.data.name)


def init_pipeline(cfg: DictConfig) -> LatentDiffusionPipeline:
    """`diffusion.init_from=<name or path>`: the artifact's autoencoder, architectures and weights; this run's
    training settings, data and resolution."""
    from ldm_train.pipeline.artifacts import read_diffusion

    source = Path(str(cfg.diffusion.init_from)).expanduser()
    path = source if source.is_dir() else artifacts_root(cfg) / "diffusion" / str(cfg.diffusion.init_from)
    stored, _ = read_diffusion(path)
    check_against_artifact(cfg, path, {"f": stored["f"], "regularizer": stored["regularizer"]})
    diffusion = {**OmegaConf.to_container(cfg.diffusion, resolve=True),
                 **{k: stored["diffusion"][k] for k in SCHEDULE_KEYS}}  # the weights were trained on this schedule
    pipe = LatentDiffusionPipeline.init_from(path, {"diffusion": diffusion, "data": cfg.data.name,
                                                    "resolution": cfg.data.resolution})
    diffusion["latent_norm"] = pipe.first_stage.latent_norm  # and on these latents (from_artifact read them)
    if diffusion["latent_norm"] != cfg.diffusion.latent_norm:
        log.warning("diffusion.latent_norm=%s ignored: %s was trained on latent_norm=%s latents, which fine-tuning "
                    "keeps", cfg.diffusion.latent_norm, path, diffusion["latent_norm"])
    pipe.first_stage.sample_posterior = bool(cfg.diffusion.sample_posterior)
    if cfg.diffusion.get("train_text_encoder"):
        if not hasattr(pipe.text_encoder, "set_trainable"):
            raise ConfigError(f"diffusion.train_text_encoder=true needs a CLIP text tower; {path} has "
                              f"text_encoder={stored['text_encoder'].get('name')}")
        pipe.text_encoder.set_trainable(True)
    if cfg.diffusion.get("gradient_checkpointing") is not None:  # the artifact's U-Net config says false
        pipe.denoiser.gradient_checkpointing = bool(cfg.diffusion.gradient_checkpointing)
        pipe.config["unet"] = {**pipe.config["unet"], "gradient_checkpointing": pipe.denoiser.gradient_checkpointing}
    log.info("stage 2 starts from %s (f=%d, %s, U-Net %s)", path, stored["f"], stored["regularizer"],
             stored["unet"].get("model_channels"))
    return pipe


def latents_in_memory(cfg: DictConfig, train_ds, first_stage: FirstStage, device: torch.device | str = "cpu"):
    """`diffusion.latents_in_memory`: the training set encoded once on `device` (this rank's accelerator) into RAM
    (data.latents.InMemoryLatents)."""
    if cfg.data.name == "latents":
        raise ConfigError("diffusion.latents_in_memory=true with data=latents: that data is already a latent cache; "
                          "leave latents_in_memory false")
    if isinstance(train_ds, torch.utils.data.IterableDataset):
        raise ConfigError(f"diffusion.latents_in_memory=true needs an indexable training set (data=shapes or "
                          f"data=folder), not data={cfg.data.name}: set diffusion.latents_in_memory=false "
                          "(experiment=quickstart turns it on), or write the cache once with stage=cache_latents and "
                          "train with data=latents")
    start = time.time()
    # left on `device`: that is where Lightning moves the whole module at fit
    cached, totals = InMemoryLatents.encode(train_ds, first_stage.to(device), cfg.diffusion.batch_size, device)
    counts = summarize(totals)
    log.info("latents in memory: %d training images encoded in %.0f s (%.1f MiB; skipped %s)", len(cached),
             time.time() - start, cached.nbytes / 2**20, {k: v for k, v in counts.items() if k in SKIP_REASONS}
             or "none")
    check_skip_fraction(totals, cfg.data.get("max_skip_fraction", 0.05), "of the training set ")
    return cached


def run(cfg: DictConfig) -> dict:
    L.seed_everything(cfg.seed, workers=True)
    d = cfg.diffusion
    init = init_pipeline(cfg) if d.get("init_from") else None
    first_stage = init.first_stage if init else FirstStage.from_artifact(autoencoder_dir(cfg), cfg.f,
                                                                         cfg.regularizer.name, d.sample_posterior,
                                                                         d.latent_norm)
    first_stage.check_options(OmegaConf.to_container(cfg.regularizer, resolve=True))
    if cfg.data.name == "latents":  # the cache must come from this autoencoder; its resolution is the run's
        info = read_info(cfg.data)
        check_cache(info, first_stage, OmegaConf.to_container(cfg.text_encoder, resolve=True))
        check_cache_buckets(info, size_multiple(cfg), bool(d.get("size_conditioning")))
        with open_dict(cfg):
            cfg.data.resolution = info["resolution"]
    pipeline = init or LatentDiffusionPipeline.build(first_stage, pipeline_config(cfg, first_stage))
    unet, text_encoder = pipeline.denoiser, pipeline.text_encoder
    if lora_enabled(d.get("lora")):
        add_lora(unet, OmegaConf.to_container(d.lora, resolve=True))
        trainable, total = parameter_counts(unet)
        log.info("LoRA rank %d (alpha %s) on %s: %.3fM trainable of %.2fM U-Net parameters%s", d.lora.rank,
                 d.lora.alpha, list(unet.peft_config["default"].target_modules), trainable / 1e6, total / 1e6,
                 "" if init else "; the base is a fresh random U-Net (set diffusion.init_from= to adapt a model)")
    train_ds, val_ds = build_datasets(cfg.data, caption_limit(text_encoder))
    probe_size = d.batch_size if bucketed(train_ds) else max(d.batch_size, 16)
    probe = next(iter(make_loader(train_ds, probe_size, True)))
    latents = DiffusionModule.batch_latents(first_stage, probe) if "latent" in probe else None
    stats = first_stage.health_check(probe.get("image"), tuple(d.latent_std_range), latents)
    log.info("latent health check passed: scaled mean %.3f std %.3f (scale_factor %.5f)", stats["scaled_mean"],
             stats["scaled_std"], stats["scale_factor"])
    log.info("denoiser (%s) %.2fM parameters; text encoder %s (dim %d, %s)", cfg.unet.get("kind", "unet"),
             sum(p.numel() for p in unet.parameters()) / 1e6,
             cfg.text_encoder.name, text_encoder.dim, "trained jointly" if text_encoder.trainable else "frozen")
    alignment = None
    if cfg.data.name == "shapes":
        from ldm_train.data.shapes import caption_alignment as alignment
    module_cfg = OmegaConf.to_container(d, resolve=True)
    module_cfg["val_prompts"] = validation_prompts(cfg.data, d, val_ds)
    module = DiffusionModule(pipeline, module_cfg, out_dir=str(run_dir(cfg)),
                             alignment_fn=alignment, channels_last=cfg.trainer.get("channels_last", True))
    callbacks = [DataHealth(cfg.data.get("max_skip_fraction", 0.05))]
    quality = build_quality_monitor(cfg, run_dir(cfg))  # sample quality against the step (diffusion.eval_every)
    trainer = build_trainer(cfg, job_type="diffusion", max_steps=d.max_steps, val_every=min(d.val_every, d.max_steps),
                            limit_val_batches=2, max_time=d.get("max_time"),
                            schedule_to_time=bool(d.get("schedule_to_time")), gradient_clip_val=d.grad_clip or None,
                            callbacks=callbacks + ([quality] if quality else []))
    global_batch(trainer, d.batch_size, "stage 2")
    if d.get("latents_in_memory"):
        train_ds = latents_in_memory(cfg, train_ds, first_stage, trainer.strategy.root_device)
    train_loader, val_loader = trainer_loaders(trainer, train_ds, val_ds, d.batch_size, cfg.seed, cfg.data.num_workers)
    start = time.time()
    trainer.fit(module, train_loader, val_loader, ckpt_path=cfg.ckpt_path, weights_only=True)
    train_seconds = time.time() - start
    save_final_checkpoint(trainer, cfg)
    metrics = {"train_seconds": train_seconds, "steps": trainer.global_step,
               **{k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}}

    trained = module.ema_pipeline()
    if d.eval_samples and cfg.data.name == "shapes":
        from ldm_train.evaluation.alignment import alignment_scores

        metrics.update(alignment_scores(trained, d.eval_samples, diagnostic_n=d.get("eval_diagnostic_samples")))
        log.info("caption alignment: cfg %.3f, no cfg %.3f, null prompt %.3f", metrics["caption_alignment_cfg"],
                 metrics["caption_alignment_nocfg"], metrics["caption_alignment_null"])
    target = diffusion_dir(cfg)
    if trainer.is_global_zero:
        trained.save(target, metrics, provenance(cfg, "diffusion", trainer.global_step, first_stage.path))
        log.info("wrote diffusion artifact %s", target)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return metrics
