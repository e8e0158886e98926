"""Datasets behind the `data` config group; every item is a dict with `image` in [-1, 1] (or cached latents),
`caption`, and (folders, shards) a `data_counts` vector of bad-input events (see ldm_train.data.images)."""

from __future__ import annotations

import logging
import os
import signal
import warnings

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from ldm_train.data.images import CaptionLimit

DATA_NAMES = ("shapes", "folder", "webdataset", "latents")
log = logging.getLogger(__name__)


def build_datasets(cfg, caption_limit: CaptionLimit | None = None) -> tuple[Dataset, Dataset]:
    """(train, val) datasets for `cfg` = the `data` config section; `caption_limit` counts over-long captions."""
    if cfg.name == "shapes":
        from ldm_train.data.shapes import ShapesDataset

        return (ShapesDataset(cfg.resolution, cfg.train_size, "train", cfg.seed),
                ShapesDataset(cfg.resolution, cfg.val_size, "val", cfg.seed))
    if cfg.name == "folder":
        from ldm_train.data.folder import ImageFolderDataset

        common = dict(max_pixels=cfg.get("max_image_pixels", 50_000_000), caption_limit=caption_limit)
        train = ImageFolderDataset(cfg.root, cfg.resolution, random_crop=cfg.random_crop, flip=cfg.flip,
                                   buckets=config_buckets(cfg), **common)
        # no augmentation (validation must be repeatable) and square crops: validation batches mix aspects
        val = ImageFolderDataset(cfg.root, cfg.resolution, **common)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_val = folder_val_size(len(train), cfg.val_fraction)
        train_set = Subset(train, order[n_val:] or order)
        if train.buckets:
            report_buckets(train_set, cfg.get("bucket_report"))
        return train_set, Subset(val, order[:n_val] or order)
    if cfg.name == "webdataset":
        from ldm_train.data.webdataset import image_streams

        buckets = config_buckets(cfg)
        if buckets:  # a stream's histogram is only known once read: `stage=inspect data=webdataset` reports it
            log.info("aspect buckets (h x w), batched per bucket as the shards stream: %s",
                     ", ".join(f"{h}x{w}" for h, w in buckets))
        return image_streams(cfg, caption_limit, buckets)
    if cfg.name == "latents":
        from ldm_train.data.latents import latent_streams

        return latent_streams(cfg)
    raise ValueError(f"unknown data {cfg.name!r}; valid: {', '.join(DATA_NAMES)}")


def folder_val_size(n_images: int, val_fraction: float) -> int:
    """Images of a folder held out for validation: max(1, ⌊n · val_fraction⌋), none of a single image."""
    return max(1, int(n_images * val_fraction)) if n_images > 1 else 0


def autoencoder_data(cfg):
    """The `data` section stage 1 trains on: with `data.autoencoder_buckets: false` aspect buckets are off for it
    (square crops at data.resolution; the convolutional autoencoder encodes any bucket size afterwards)."""
    if cfg.get("aspect_buckets") and cfg.get("autoencoder_buckets") is False:
        from omegaconf import OmegaConf

        return OmegaConf.merge(cfg, {"aspect_buckets": False})
    return cfg


def config_buckets(cfg, multiple: int | None = None, force: bool = False) -> list | None:
    """The bucket sizes of `data.aspect_buckets` (None when off, unless `force`): `data.buckets` when listed, else
    generated from the resolution, the side multiple (`data.bucket_multiple`, set at start-up) and the aspect range."""
    if not (force or cfg.get("aspect_buckets")):
        return None
    from ldm_train.data.buckets import listed_buckets, make_buckets

    multiple = int(multiple or cfg.get("bucket_multiple") or 8)
    if cfg.get("buckets"):
        return listed_buckets(cfg.buckets, multiple)
    return make_buckets(int(cfg.resolution), multiple, cfg.get("bucket_aspect_range", (0.5, 2.0)))


def bucketed(dataset: Dataset) -> bool:
    """Does `dataset` batch by aspect bucket (a bucketed folder, or a stream with buckets)? Such a loader only
    makes whole batches of one bucket, so a batch larger than the training one may not exist."""
    from ldm_train.data.buckets import dataset_buckets

    return bool(getattr(dataset, "n_buckets", 0)) or dataset_buckets(dataset) is not None


def report_buckets(dataset: Dataset, path: str | None) -> dict[str, int]:
    """Log the training set's bucket histogram and write it (JSON) to `path` when given."""
    from ldm_train.data.buckets import dataset_buckets, histogram

    bucket_of, sizes = dataset_buckets(dataset)
    hist = histogram(bucket_of, sizes)
    log.info("aspect buckets (h x w: training images): %s", hist)
    if path:
        from pathlib import Path

        from ldm_train.utils.io import atomic_write_json

        atomic_write_json(Path(path), hist)
    return hist


class EpochLoader(DataLoader):
    """A DataLoader over a shard stream: each new pass (epoch) tells the stream its epoch number first."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch = -1

    def __iter__(self):
        self.epoch += 1
        self.dataset.set_epoch(self.epoch)
        share_rank_with_workers()
        return super().__iter__()


def share_rank_with_workers() -> None:
    """Export RANK/WORLD_SIZE when torch.distributed runs without them (e.g. Lightning's own launcher), so
    webdataset's split_by_node sees the rank inside DataLoader workers too, whatever their start method."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and not ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(dist.get_rank()), str(dist.get_world_size())


def ignore_ctrl_c(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: Ctrl-C reaches the whole process group, but only the main process decides (it
    saves a checkpoint at the end of the batch, ldm_train.lit.resume); a worker that died of it would fail that."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0,
                drop_last: bool = False, seed: int | None = None) -> DataLoader:
    """Shuffled (training) loaders resume mid-epoch exactly (data/resumable.py); `seed` defaults to the run's."""
    if isinstance(dataset, IterableDataset):  # shard streams shuffle and split themselves
        dataset.num_workers = num_workers
        dataset.batch_size = batch_size  # with aspect buckets the stream delivers runs of one bucket this long
        if getattr(dataset, "bucketed", False):
            len(dataset)  # refuses, now, a share of the epoch too small for one whole batch per reader
        # Lightning warns that an IterableDataset's __len__ may be wrong with workers; a stream's is exact per rank
        warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")
        return EpochLoader(dataset, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last,
                           persistent_workers=num_workers > 0, pin_memory=False, worker_init_fn=ignore_ctrl_c)
    if shuffle:
        from ldm_train.data.resumable import ResumableLoader

        return ResumableLoader(dataset, batch_size, seed=seed, num_workers=num_workers, drop_last=drop_last,
                               persistent_workers=num_workers > 0, pin_memory=False, worker_init_fn=ignore_ctrl_c)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      drop_last=drop_last, persistent_workers=num_workers > 0, pin_memory=False,
                      worker_init_fn=ignore_ctrl_c)
