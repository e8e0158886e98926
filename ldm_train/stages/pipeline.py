"""`stage=pipeline`: stage 1 (+ calibration) → stage 2 → samples → evaluate, in one job (one row of the f ablation)."""

from __future__ import annotations

import json
import logging
import time

from omegaconf import DictConfig

from ldm_train.config import autoencoder_dir, resolved_arch, run_dir
from ldm_train.evaluation.metric_info import with_current_names
from ldm_train.lit.trainer import finish_logger
from ldm_train.pipeline.artifacts import ArtifactError, load_autoencoder
from ldm_train.pipeline.provenance import compare, provenance, read_provenance
from ldm_train.stages import autoencoder as stage1
from ldm_train.stages import diffusion as stage2
from ldm_train.stages import evaluate as evaluate_stage
from ldm_train.stages import sample as sample_stage
from ldm_train.utils.distributed import rank

log = logging.getLogger(__name__)
HEADLINE_METRIC = "caption_alignment_cfg"  # what `main()` returns to a Hydra sweeper (shapes data)


def reusable_autoencoder(cfg: DictConfig) -> dict | None:
    """The existing artifact's metrics when it was trained exactly as this run would train it (same provenance:
    data, architecture, training config, seed), else None; one log line says which and why.

    An artifact given explicitly by `autoencoder.path` is used as given (stage 2 reads it whatever stage 1 does);
    a provenance that differs is then a warning.
    """
    path = autoencoder_dir(cfg)
    explicit = bool(cfg.autoencoder.get("path"))
    try:
        model, _ = load_autoencoder(path, cfg.f, cfg.regularizer.name)
    except ArtifactError as exc:
        log.info("training stage 1: %s", exc if (path / "model.safetensors").exists() else f"no artifact at {path}")
        return None
    same, why = compare(read_provenance(path), provenance(cfg, "autoencoder"), "the existing artifact")
    if same and model.arch != resolved_arch(cfg):  # its config.yaml was edited after training
        same, why = False, "the existing artifact's config.yaml holds another architecture than this run's"
    if same:
        log.info("reusing stage 1 %s: %s", path, why)
    elif explicit:
        log.warning("reusing stage 1 %s as given by autoencoder.path, although %s", path, why)
    if same or explicit:
        return with_current_names(json.loads((path / "metrics.json").read_text()))  # an artifact of any age
    log.info("retraining stage 1 (%s): %s", path, why)
    return None


def ms_per_step(metrics: dict) -> float | None:
    steps, seconds = metrics.get("steps"), metrics.get("train_seconds")
    return 1000 * seconds / steps if steps and seconds is not None else None


def run(cfg: DictConfig) -> dict:
    start = time.time()
    evaluate_stage.feature_network(cfg)  # fails now, not after training, when the FID network is unavailable
    ae_metrics = reusable_autoencoder(cfg) if cfg.pipeline.reuse_autoencoder else None
    reused = ae_metrics is not None
    if ae_metrics is None:
        log.info("== stage 1: autoencoder %s_f%s ==", cfg.regularizer.name, cfg.f)
        ae_metrics = stage1.run(cfg)
        finish_logger(ae_metrics)  # each stage is its own wandb run in the sweep's group
    else:
        log.info("== stage 1: reusing %s ==", autoencoder_dir(cfg))
    log.info("== stage 2: latent diffusion ==")
    d_metrics = stage2.run(cfg)
    finish_logger(d_metrics)
    if rank() != 0:  # under DDP the other ranks stop here: samples, grid and metrics.json are written once
        return d_metrics
    log.info("== samples ==")
    samples = sample_stage.run(cfg, out_dir=run_dir(cfg) / "samples")
    log.info("== evaluate ==")
    e_metrics = evaluate_stage.run(cfg, only=["autoencoder", "diffusion"])
    metrics = {"recon_psnr": ae_metrics.get("recon_psnr"), "scale_factor": ae_metrics.get("scale_factor"),
               **{k: v for k, v in d_metrics.items() if k.startswith("caption_alignment")},
               **e_metrics,  # recon_psnr over the whole validation set replaces stage 1's few-batch value
               "autoencoder_reused": reused,
               "autoencoder_train_seconds": ae_metrics.get("train_seconds"),
               "autoencoder_ms_per_step": ms_per_step(ae_metrics),
               "diffusion_train_seconds": d_metrics.get("train_seconds"),
               "diffusion_ms_per_step": ms_per_step(d_metrics),
               "grid": samples["grid"], "wall_seconds": time.time() - start}
    log.info("pipeline done in %.0f s\n  samples: %s\n  metrics: %s\n%s", metrics["wall_seconds"], samples["grid"],
             run_dir(cfg) / "metrics.json", json.dumps(metrics, indent=1))
    return metrics
