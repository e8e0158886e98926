"""`python -m ldm_train stage=<autoencoder|calibrate|diffusion|sample|evaluate|pipeline> f=<f> regularizer=<kl|vq>`"""

from __future__ import annotations

import importlib
import logging

import hydra
from omegaconf import DictConfig, open_dict

from ldm_train.config import CONF_DIR, validate

log = logging.getLogger("ldm_train")


def run(cfg: DictConfig) -> dict:
    """Validate the config and run its stage; returns the stage's metrics (for sweepers)."""
    validate(cfg)  # before any heavy import: a bad config fails in a second
    if cfg.data.get("aspect_buckets"):
        from ldm_train.config import run_dir, size_multiple

        with open_dict(cfg):  # the bucket sides follow what the models of this stage need
            cfg.data.bucket_multiple = size_multiple(cfg)
            cfg.data.bucket_report = str(run_dir(cfg) / "buckets.json")
    from ldm_train.lit.checkpoints import resolve_checkpoint
    from ldm_train.lit.trainer import finish_logger, quiet_lightning  # lazy: `--help` and `--cfg` need no torch

    quiet_lightning()
    ckpt_path = resolve_checkpoint(cfg)  # `last` → a file; refuses unsafe or other-stage checkpoints now
    with open_dict(cfg):
        cfg.ckpt_path = ckpt_path
    stage = importlib.import_module(f"ldm_train.stages.{cfg.stage}")
    metrics = stage.run(cfg)
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if metrics and rank_zero_only.rank == 0:
        write_run_metrics(cfg, metrics)
    finish_logger(metrics)
    return metrics


def write_run_metrics(cfg: DictConfig, metrics: dict) -> None:
    """`<run dir>/metrics.json` (rank 0 only): the job folder keeps its results; sweeps and ablation reports read it."""
    from ldm_train.config import run_dir
    from ldm_train.utils.io import atomic_write_json

    atomic_write_json(run_dir(cfg) / "metrics.json", metrics)


def headline(stage: str, metrics: dict | None) -> float | None:
    """The stage's headline metric (its module's HEADLINE_METRIC), for a Hydra sweeper to optimise."""
    key = getattr(importlib.import_module(f"ldm_train.stages.{stage}"), "HEADLINE_METRIC", None)
    value = (metrics or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    return headline(cfg.stage, run(cfg))


if __name__ == "__main__":
    main()
