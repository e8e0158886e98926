"""Datasets behind the `data` config group; every item is a dict with `image` in [-1, 1] and `caption`."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset


def build_datasets(cfg) -> tuple[Dataset, Dataset]:
    """(train, val) datasets for `cfg` = the `data` config section."""
    if cfg.name == "shapes":
        from ldm_train.data.shapes import ShapesDataset

        return (ShapesDataset(cfg.resolution, cfg.train_size, "train", cfg.seed),
                ShapesDataset(cfg.resolution, cfg.val_size, "val", cfg.seed))
    if cfg.name == "folder":
        from ldm_train.data.folder import ImageFolderDataset

        train = ImageFolderDataset(cfg.root, cfg.resolution, random_crop=cfg.random_crop, flip=cfg.flip)
        val = ImageFolderDataset(cfg.root, cfg.resolution)  # no augmentation: validation must be repeatable
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_val = max(1, int(len(train) * cfg.val_fraction)) if len(train) > 1 else 0
        return Subset(train, order[n_val:] or order), Subset(val, order[:n_val] or order)
    raise ValueError(f"unknown data {cfg.name!r}; valid: shapes, folder")


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0,
                drop_last: bool = False, seed: int | None = None) -> DataLoader:
    """Shuffled (training) loaders resume mid-epoch exactly (data/resumable.py); `seed` defaults to the run's."""
    if shuffle and not isinstance(dataset, IterableDataset):  # streams (webdataset) shuffle themselves
        from ldm_train.data.resumable import ResumableLoader

        return ResumableLoader(dataset, batch_size, seed=seed, num_workers=num_workers, drop_last=drop_last,
                               persistent_workers=num_workers > 0, pin_memory=False)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      drop_last=drop_last, persistent_workers=num_workers > 0, pin_memory=False)
