"""Each rank's share of a map-style dataset: the same shuffled order whatever the number of processes.

Training: one permutation of the whole set per epoch (seeded by the run's seed and the epoch), dealt round-robin
to the ranks; the tail that does not fill a whole global batch is left out (a different tail each epoch), so no
sample is seen twice in an epoch. Validation: the first N − N mod W samples in order, each exactly once; the last
N mod W (< W) are left out rather than padded with repeats (which would bias the metrics), and the log says so.
Lightning keeps a loader whose sampler is already a DistributedSampler, so it does not substitute its own padding
sampler. One process (W = 1) walks the same permutation as W processes together, which lets a 1-process run and a
W-process run with the same global batch see the same images at every step.
"""

from __future__ import annotations

import logging

from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.distributed import DistributedSampler

log = logging.getLogger(__name__)


def rank_loader(dataset: Dataset, batch_size: int, *, train: bool, world_size: int, rank: int, seed: int,
                num_workers: int = 0) -> DataLoader:
    """This rank's DataLoader of `batch_size` (per device) images; see the module docstring for the split."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed,
                                 drop_last=True)
    left_out = len(dataset) % world_size
    if not train and left_out and rank == 0:
        log.warning("validation on %d processes uses %d of %d images (each once); the last %d are left out",
                    world_size, len(dataset) - left_out, len(dataset), left_out)
    from ldm_train.data import ignore_ctrl_c

    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=train,
                      worker_init_fn=ignore_ctrl_c,
                      persistent_workers=num_workers > 0, pin_memory=False)


def trainer_loaders(trainer, train_ds: Dataset, val_ds: Dataset, batch_size: int, seed: int,
                    num_workers: int = 0) -> tuple[DataLoader, DataLoader]:
    """(train, val) loaders for this process of `trainer` (its world size and global rank are known before fit)."""
    from ldm_train.data import make_loader

    if isinstance(train_ds, IterableDataset):  # shard streams split themselves by rank and worker
        return (make_loader(train_ds, batch_size, True, num_workers, drop_last=True),
                make_loader(val_ds, batch_size, False, num_workers))
    # training: the same split as rank_loader(train=True), plus an exact mid-epoch resume (data/resumable.py)
    train = make_loader(train_ds, batch_size, True, num_workers, drop_last=True, seed=seed)
    return train, rank_loader(val_ds, batch_size, train=False, world_size=trainer.world_size,
                              rank=trainer.global_rank, seed=seed, num_workers=num_workers)
