"""`stage=calibrate`: measure scale_factor = 1/std(z) for an autoencoder artifact and store it with it."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.distributed import DistributedSampler

from ldm_train.artifacts import atomic_write_json, load_autoencoder
from ldm_train.calibration import calibrate, format_report
from ldm_train.config import autoencoder_dir
from ldm_train.data import build_datasets

log = logging.getLogger(__name__)


def calibrate_module(model: torch.nn.Module, dataset, cfg: DictConfig, trainer=None) -> dict:
    """Calibrate on up to `calibration.num_samples` images of `dataset`, split across ranks when distributed."""
    c = cfg.autoencoder.calibration
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    # shard streams split themselves over ranks; map-style datasets need a sampler for that
    split = world > 1 and not isinstance(dataset, IterableDataset)
    sampler = DistributedSampler(dataset, shuffle=False) if split else None
    loader = DataLoader(dataset, batch_size=c.batch_size, sampler=sampler, shuffle=False)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    cal = calibrate(model, loader, max(1, c.num_samples // world), device)
    model.train(was_training)
    log.info(format_report(cal))
    return cal


def run(cfg: DictConfig) -> dict:
    path = autoencoder_dir(cfg)
    model, _ = load_autoencoder(path, cfg.f, cfg.regularizer.name, require_calibration=False)
    _, val_ds = build_datasets(cfg.data)
    cal = calibrate_module(model, val_ds, cfg)
    atomic_write_json(path / "calibration.json", cal)
    log.info("wrote %s", path / "calibration.json")
    return cal
