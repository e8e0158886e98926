"""`stage=calibrate`: measure scale_factor = 1/std(z) for an autoencoder artifact and store it with it."""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, IterableDataset, Subset

from ldm_train.config import autoencoder_dir
from ldm_train.data import build_datasets
from ldm_train.pipeline.artifacts import load_autoencoder
from ldm_train.pipeline.calibration import calibrate, calibration_sample, format_report
from ldm_train.utils.distributed import rank, world_size
from ldm_train.utils.io import atomic_write_json

log = logging.getLogger(__name__)


def calibrate_module(model: torch.nn.Module, dataset, cfg: DictConfig, trainer=None) -> dict:
    """Calibrate on the first `calibration.num_samples` images of `dataset`, dealt round-robin to the ranks.

    No padding (a DistributedSampler would repeat images to even out the ranks): the ranks' sums are all-reduced,
    so the result is the 1-process value on exactly the same images, on every rank. Posterior samples draw each
    image's noise from a generator seeded by (calibration.seed, the image's number): also rank-independent.
    """
    c = cfg.autoencoder.calibration
    if isinstance(dataset, IterableDataset):  # shard streams split themselves over ranks
        n = min(c.num_samples, len(dataset)) // world_size()
        indices = range(rank() * n, (rank() + 1) * n)  # the stream's order is its own: distinct numbers per rank
        loader = DataLoader(dataset, batch_size=c.batch_size)
    else:
        indices = range(rank(), min(c.num_samples, len(dataset)), world_size())
        n = len(indices)
        loader = DataLoader(Subset(dataset, indices), batch_size=c.batch_size, shuffle=False)
    home = next(model.parameters()).device
    # after trainer.fit, Lightning's DDP teardown has moved the module to the CPU: calibrate on the run's device
    device = trainer.strategy.root_device if trainer is not None else home
    was_training = model.training
    model.eval().to(device)
    cal = calibrate(model, loader, n, device, sample=calibration_sample(cfg), seed=int(c.get("seed", 0)),
                    indices=indices)
    model.train(was_training).to(home)
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
