"""Stage 1: train the autoencoder, calibrate its latent scale, write the artifact."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from ldm_train.config import artifacts_root, autoencoder_artifact, check_against_artifact, resolved_arch, run_dir
from ldm_train.data import autoencoder_data, build_datasets
from ldm_train.data.distributed import trainer_loaders
from ldm_train.data.health import DataHealth
from ldm_train.lit.autoencoder import AutoencoderModule
from ldm_train.lit.trainer import build_trainer, global_batch, save_final_checkpoint
from ldm_train.models.regularizers import regularizer_class
from ldm_train.pipeline.artifacts import load_weights, read_arch, save_autoencoder
from ldm_train.pipeline.provenance import provenance
from ldm_train.stages.calibrate import calibrate_module
from ldm_train.utils.io import atomic_write_text

log = logging.getLogger(__name__)
HEADLINE_METRIC = "recon_psnr"  # what `main()` returns to a Hydra sweeper


def init_source(cfg: DictConfig) -> tuple[Path, dict] | None:
    """`autoencoder.init_from=<name or path>`: (artifact, its architecture); f=/regularizer= must agree."""
    name = cfg.autoencoder.get("init_from")
    if not name:
        return None
    source = Path(str(name)).expanduser()
    path = source if source.is_dir() else artifacts_root(cfg) / "autoencoder" / str(name)
    arch = read_arch(path)
    check_against_artifact(cfg, path, {"f": arch["f"], "regularizer": arch["regularizer"]["name"]})
    return path, arch


def kept_calibration(source: Path, measured: dict) -> dict:
    """With the encoder frozen the latents are the source artifact's: its scale factor stays the one used (a
    diffusion model trained on them expects it); the factor measured on this run's data is recorded beside it."""
    stored = json.loads((source / "calibration.json").read_text())
    log.info("encoder frozen: keeping %s's scale factor %.5f (measured here: %.5f)", source, stored["scale_factor"],
             measured["scale_factor"])
    return {**stored, "measured": {k: v for k, v in measured.items() if k != "measured"}}


def run(cfg: DictConfig) -> dict:
    L.seed_everything(cfg.seed, workers=True)
    ae = cfg.autoencoder
    init = init_source(cfg)
    arch = init[1] if init else resolved_arch(cfg)
    train_ds, val_ds = build_datasets(autoencoder_data(cfg.data))
    val_every = min(ae.val_every, ae.max_steps)
    # DDP must look for unused parameters: the generator and the discriminator backward passes each use only
    # their own part of the module; SyncBatchNorm only where the discriminator has BatchNorm to convert
    trainer = build_trainer(cfg, job_type="autoencoder", max_steps=2 * ae.max_steps, val_every=val_every,
                            limit_val_batches=ae.val_batches, max_time=ae.get("max_time"), steps_per_batch=2,
                            schedule_to_time=bool(ae.get("schedule_to_time")),
                            callbacks=[DataHealth(cfg.data.get("max_skip_fraction", 0.05))],
                            find_unused_parameters=True,
                            sync_batchnorm=bool(ae.loss.disc.get("sync_batchnorm")) and ae.loss.disc.norm == "batch")
    gb = global_batch(trainer, ae.batch_size, "stage 1")
    lr = ae.lr * gb if ae.scale_lr else ae.lr
    log.info("stage 1: %s f=%d, %d train / %d val images, global batch %d, lr %.3g%s", arch["regularizer"]["name"],
             arch["f"], len(train_ds), len(val_ds), gb, lr, f" (= {ae.lr:g} × {gb})" if ae.scale_lr else "")
    reg_weight = cfg.regularizer[regularizer_class(cfg.regularizer.name).weight_key]
    module = AutoencoderModule(arch, OmegaConf.to_container(ae.loss, resolve=True), reg_weight, lr,
                               OmegaConf.to_container(ae.optimizer, resolve=True),
                               OmegaConf.to_container(ae.lr_scheduler, resolve=True) if ae.lr_scheduler else None,
                               out_dir=str(run_dir(cfg)), channels_last=cfg.trainer.get("channels_last", True),
                               compile=ae.get("compile", False), train_encoder=ae.get("train_encoder", True),
                               latent_noise=ae.get("latent_noise", 0.0))
    if init:  # start from the artifact's weights (imported or ours); strict: its config.yaml built this module
        module.autoencoder.load_state_dict(load_weights(init[0] / "model.safetensors"), strict=True)
        log.info("stage 1 starts from %s (f=%d, %s)", init[0], arch["f"], arch["regularizer"]["name"])
    perceptual = {"net": ae.loss.perceptual.net, "weights": module.loss.perceptual.resolved,
                  "metric_name": module.perceptual_name}
    log.info("perceptual loss: %s backbone with %s weights → logged as %s", perceptual["net"],
             perceptual["weights"], perceptual["metric_name"])
    n_params = sum(p.numel() for p in module.autoencoder.parameters())
    log.info("autoencoder: %.3fM parameters, latent %d×%d×%d", n_params / 1e6, arch["z_channels"],
             arch["resolution"] // arch["f"], arch["resolution"] // arch["f"])

    if trainer.logger:
        trainer.logger.log_hyperparams({"perceptual": perceptual, "lr_used": lr, "global_batch": gb})
    if trainer.is_global_zero:  # the run's config with what `auto` turned into, next to Hydra's .hydra/config.yaml
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved["autoencoder"]["loss"]["perceptual"]["resolved_weights"] = perceptual["weights"]
        resolved["autoencoder"].update(lr_used=lr, global_batch=gb)
        atomic_write_text(run_dir(cfg) / "resolved_config.yaml", OmegaConf.to_yaml(OmegaConf.create(resolved)))
    train_loader, val_loader = trainer_loaders(trainer, train_ds, val_ds, ae.batch_size, cfg.seed,
                                               cfg.data.num_workers)
    start = time.time()
    trainer.fit(module, train_loader, val_loader, ckpt_path=cfg.ckpt_path, weights_only=True)
    train_seconds = time.time() - start
    save_final_checkpoint(trainer, cfg)
    val = trainer.validate(module, val_loader, verbose=False)[0]

    calibration = calibrate_module(module.autoencoder, val_ds, cfg, trainer)
    if init and not ae.get("train_encoder", True):  # the encoder is unchanged, so are the latents: keep their scale
        calibration = kept_calibration(init[0], calibration)
    metrics = {k.removeprefix("val/"): float(v) for k, v in val.items()}
    metrics.update(train_seconds=train_seconds, steps=module.batch_step, parameters=n_params,
                   perceptual=perceptual, scale_factor=calibration["scale_factor"])
    target = autoencoder_artifact(cfg, arch["regularizer"]["name"], arch["f"])  # init_from: the source's f
    if trainer.is_global_zero:
        save_autoencoder(target, module.autoencoder, arch, calibration, metrics,
                         provenance(cfg, "autoencoder", steps=module.batch_step))
        log.info("wrote autoencoder artifact %s\n%s", target, json.dumps(metrics, indent=1))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return metrics
