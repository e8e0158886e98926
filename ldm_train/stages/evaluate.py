"""`stage=evaluate`: reconstruction metrics of an autoencoder artifact, generation metrics of a diffusion artifact.

Autoencoder (validation set): recon_psnr, recon_ssim, recon_<LPIPS variant>, rfid | rfd_<net>; on shapes also
recon_caption_alignment (reconstructions whose colour, shape and position still match the caption).
Diffusion (N generated vs N real, one sampler/steps/guidance): fid | fd_<net>, caption_alignment (shapes).
Each artifact's metrics.json gains an `evaluation` entry (other keys kept); the run folder gets metrics.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ldm_train.config import ConfigError, artifacts_root, autoencoder_dir, diffusion_dir, run_dir
from ldm_train.data import build_datasets, make_loader
from ldm_train.evaluation.features import FeatureNetwork, resolve_features
from ldm_train.evaluation.metrics import reconstruction_metrics
from ldm_train.pipeline.artifacts import ArtifactError, load_autoencoder, stage1_command
from ldm_train.utils.images import save_grid
from ldm_train.utils.io import atomic_write_json

log = logging.getLogger(__name__)

TARGETS = ("auto", "autoencoder", "diffusion", "both")
SEED_STRIDE = 1000  # eval.seeds repeat r samples batch i with seed sampling.seed + i + 1000·r


def shapes_features_path(cfg: DictConfig) -> Path:
    path = cfg.eval.get("features_path")
    return Path(path).resolve() if path else artifacts_root(cfg) / "features" / "shapes.safetensors"


def feature_network(cfg: DictConfig) -> FeatureNetwork | None:
    return resolve_features(cfg.eval.features, cfg.data.name, shapes_features_path(cfg), cfg.eval.inception_weights)


def targets(cfg: DictConfig) -> list[str]:
    """Which artifacts to evaluate: `auto` takes those of this f and regularizer that exist (at least one)."""
    target = cfg.eval.target
    if target not in TARGETS:
        raise ConfigError(f"unknown eval.target={target!r}; valid: {', '.join(TARGETS)}")
    if target != "auto":
        return ["autoencoder", "diffusion"] if target == "both" else [target]
    found = [name for name, path in (("autoencoder", autoencoder_dir(cfg)), ("diffusion", diffusion_dir(cfg)))
             if (path / "model.safetensors").exists()]
    if not found:
        raise ArtifactError(f"nothing to evaluate: no artifact at {autoencoder_dir(cfg)} or {diffusion_dir(cfg)}. "
                            f"Train one (`{stage1_command(cfg.regularizer.name, cfg.f)}`, then stage=diffusion) "
                            "or point autoencoder.path= / diffusion_path= at existing ones")
    return found


def update_artifact_metrics(artifact: Path, evaluation: dict) -> None:
    """Put `evaluation` into the artifact's metrics.json atomically, keeping every other key."""
    path = Path(artifact) / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    metrics["evaluation"] = evaluation
    atomic_write_json(path, metrics)


def evaluate_autoencoder(cfg: DictConfig, features: FeatureNetwork | None) -> tuple[dict, Path]:
    from ldm_train.losses.perceptual import build_perceptual

    path = autoencoder_dir(cfg)
    model, _ = load_autoencoder(path, cfg.f, cfg.regularizer.name, require_calibration=False)
    if model.arch["resolution"] != cfg.data.resolution:
        raise ConfigError(f"autoencoder {path} was trained at {model.arch['resolution']} px but data.resolution="
                          f"{cfg.data.resolution}; evaluate with data.resolution={model.arch['resolution']}")
    _, val_ds = build_datasets(cfg.data)
    n = min(len(val_ds), cfg.eval.recon_samples or len(val_ds))
    if n < len(val_ds):
        val_ds = torch.utils.data.Subset(val_ds, range(n))
    perceptual, perceptual_name = build_perceptual(OmegaConf.to_container(cfg.eval.lpips, resolve=True))
    loaded = list(make_loader(val_ds, cfg.eval.batch_size, False))
    batches = [b["image"] for b in loaded]

    read_back = cfg.data.name == "shapes"  # what survives the round trip: the ceiling of stage 2's caption alignment
    reconstructions: list[torch.Tensor] = []  # kept for that read-back only: each batch is decoded once

    def reconstruct(x: torch.Tensor) -> torch.Tensor:  # the deterministic path: posterior mode (KL) or z_q (VQ)
        out = model.decode_latent(model.latent(x, sample=False))
        if read_back:
            reconstructions.append(out)
        return out

    metrics = reconstruction_metrics(reconstruct, batches, perceptual, perceptual_name, features)
    if read_back:
        from ldm_train.data.shapes import caption_alignment

        hits = sum(caption_alignment(r.clamp(-1, 1), b["caption"]) * len(b["caption"])
                   for r, b in zip(reconstructions, loaded))
        metrics["recon_caption_alignment"] = hits / n
    x = batches[0][:8]
    grid = save_grid(torch.cat([x, reconstruct(x).clamp(-1, 1)]), run_dir(cfg) / "evaluate" / "reconstructions.png",
                     nrow=len(x), scale=max(1, 64 // cfg.data.resolution))
    return metrics, grid


def real_set(cfg: DictConfig, resolution: int, n: int) -> list[dict]:
    """N real images with their captions: held-out shapes (the test split), or the validation set (≤ N)."""
    if cfg.data.name == "shapes":
        from ldm_train.data.shapes import ShapesDataset

        ds = ShapesDataset(resolution, n, "test", cfg.data.seed)
    else:
        _, ds = build_datasets(cfg.data)
        if len(ds) < n:
            log.warning("only %d validation images: the generation metrics use %d real and %d generated, not %d",
                        len(ds), len(ds), len(ds), n)
    return list(make_loader(torch.utils.data.Subset(ds, range(min(n, len(ds)))), cfg.eval.batch_size, False))


@torch.no_grad()
def evaluate_diffusion(cfg: DictConfig, features: FeatureNetwork | None) -> tuple[dict, Path | None]:
    from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_artifact(diffusion_dir(cfg))
    config = pipe.config
    shapes = config.get("data") == "shapes"
    from ldm_train.data.shapes import caption_alignment, captions_to_labels
    from ldm_train.evaluation.generation import generation_metrics, over_seeds

    real = real_set(cfg, config["resolution"], cfg.eval.num_samples)
    grid: list[Path] = []

    def generate(captions: list[str], i: int, repeat: int) -> torch.Tensor:
        labels = captions_to_labels(captions) if pipe.text_encoder.needs_labels else None
        seed = cfg.sampling.seed + i + SEED_STRIDE * repeat  # repeat 0: the seeds of a single evaluation
        images = pipe.generate(captions, **{**cfg.sampling, "seed": seed}, labels=labels)
        if not grid:
            k = min(8, len(images))
            grid.append(save_grid(images[:k], run_dir(cfg) / "evaluate" / "samples.png", nrow=1,
                                  captions=captions[:k], scale=max(1, 64 // config["resolution"])))
        return images

    runs = [generation_metrics(lambda c, i, r=r: generate(c, i, r), real, features,
                               caption_alignment if shapes else None) for r in range(int(cfg.eval.get("seeds", 1)))]
    gen = over_seeds(runs)  # mean, and <key>_std over the repeats when eval.seeds > 1
    metrics = {"eval_samples": int(gen.pop("samples")), "eval_seeds": int(gen.pop("seeds")),
               "eval_sampler": pipe.parameterization.sampler_name(cfg.sampling.sampler),
               "eval_steps": cfg.sampling.steps,
               "eval_guidance_scale": float(cfg.sampling.guidance_scale),
               **{f"eval_{k}" if k.startswith("samples_per_second") else k: v for k, v in gen.items()}}
    return metrics, grid[0]


def run(cfg: DictConfig, only: list[str] | None = None) -> dict:
    """Evaluate the artifacts `only` names ("autoencoder", "diffusion"), else those `eval.target` chooses."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank != 0:  # after a multi-device pipeline: one process evaluates, on the full sets
        return {}
    todo = only or targets(cfg)
    features = feature_network(cfg)
    info = {"features": features.name if features else "none"}
    if features and features.weights_sha256:
        info["features_sha256"] = features.weights_sha256
    metrics, images = dict(info), {}
    if "autoencoder" in todo:
        ae, images["eval/reconstructions"] = evaluate_autoencoder(cfg, features)
        update_artifact_metrics(autoencoder_dir(cfg), {**ae, **info})
        metrics.update(ae)
    if "diffusion" in todo:
        gen, images["eval/samples"] = evaluate_diffusion(cfg, features)
        update_artifact_metrics(diffusion_dir(cfg), {**gen, **info})
        metrics.update(gen)
    log_evaluation(cfg, metrics, images)
    log.info("evaluation of %s (%s):\n%s", cfg.name, ", ".join(todo), json.dumps(metrics, indent=1))
    return metrics


def log_evaluation(cfg: DictConfig, metrics: dict, images: dict[str, Path]) -> None:
    """Metrics to the configured logger (wandb also gets the grids and the run summary); grids stay as PNGs."""
    from ldm_train.lit.trainer import build_logger

    logger = build_logger(cfg, "evaluate")
    if not logger:
        return
    numbers = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    logger.log_metrics(numbers, step=0)
    if hasattr(logger, "log_image"):  # wandb
        for key, path in images.items():
            logger.log_image(key, [str(path)], step=0)
        logger.experiment.summary.update(numbers)
    logger.save()
    logger.finalize("success")
