"""Training data order that survives a restart: order = f(seed, epoch), per-sample randomness = f(seed, epoch, slot).

Lightning does not fast-forward a plain DataLoader mid-epoch on resume; it does save and restore the state of a
loader that has `state_dict`/`load_state_dict`. `ResumableLoader` is such a loader: its state is (epoch, batches
consumed this epoch), and after a restore its sampler skips the consumed part of that epoch's order.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ldm_train.data.buckets import batches_per_rank, bucket_batches, dataset_buckets, histogram


def item_seed(seed: int, epoch: int, slot: int) -> int:
    """A seed for the sample at position `slot` (over all ranks) of epoch `epoch`."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + slot) % 2**63


class SeededItems(Dataset):
    """Fetches `dataset[index]` with torch's RNG seeded by the sampler's per-sample seed.

    A dataset's random augmentations (crops, flips: drawn from torch's RNG) then depend on where the sample sits in
    the epoch, not on a DataLoader worker's RNG stream, which starts afresh on resume and with another worker count.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        if getattr(self.dataset, "deterministic_items", False):  # e.g. shapes: item = f(seed, index), no RNG drawn
            return self.dataset[index]
        # the generator's own methods: torch.manual_seed() also records a stack trace (~0.4 ms per item on a CPU)
        gen = torch.default_generator
        state = gen.get_state()
        gen.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            gen.set_state(state)

    def __getattr__(self, name: str):
        # "dataset" is missing while unpickling in a worker; dunders such as __getitems__ must not bypass seeding
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch, split over ranks) that can start part-way into an epoch.

    A DistributedSampler subclass so that Lightning keeps it under DDP instead of wrapping it; the world size and
    rank are read from torch.distributed when it is iterated, because the loader is built before DDP starts.
    Yields (index, item_seed) pairs for `SeededItems`. `len()` is always the whole epoch (Lightning counts the
    batches it already ran in the epoch).
    """

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.skip = 0  # samples of the current epoch (on this rank) to leave out of the next iteration

    def _follow_world(self) -> None:
        if dist.is_available() and dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
            if (world, rank) != (self.num_replicas, self.rank):
                epoch, skip = self.epoch, self.skip
                super().__init__(self.dataset, num_replicas=world, rank=rank, shuffle=self.shuffle, seed=self.seed,
                                 drop_last=self.drop_last)
                self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        self._follow_world()
        return self.num_samples

    def __iter__(self):
        self._follow_world()
        indices = list(super().__iter__())  # this rank's share: positions rank, rank + world, ...
        skip, self.skip = self.skip, 0
        slots = range(self.rank + skip * self.num_replicas, self.total_size, self.num_replicas)
        return iter([(i, item_seed(self.seed, self.epoch, s)) for i, s in zip(indices[skip:], slots)])


class BucketSampler(ResumableSampler):
    """ResumableSampler over aspect buckets: every run of `batch_size` consecutive keys is one batch of one bucket.

    The epoch's batches (`bucket_batches`: seeded by seed and epoch, the same on every rank) are dealt round-robin:
    global step k is batches k·W … k·W + W−1, rank r takes batch k·W + r. Every rank gets `batches_per_rank`
    batches, no item comes twice in an epoch, and `skip` (samples of this rank) resumes mid-epoch as before.
    """

    def __init__(self, dataset: Dataset, bucket_of: list[int], batch_size: int, seed: int = 0):
        super().__init__(dataset, shuffle=True, seed=seed, drop_last=True)
        self.bucket_of, self.batch_size = list(bucket_of), int(batch_size)

    def __len__(self) -> int:
        self._follow_world()
        return batches_per_rank(self.bucket_of, self.batch_size, self.num_replicas) * self.batch_size

    def __iter__(self):
        self._follow_world()
        world, rank, size = self.num_replicas, self.rank, self.batch_size
        batches = bucket_batches(self.bucket_of, size, self.seed, self.epoch)
        keys = []
        for k in range(batches_per_rank(self.bucket_of, size, world)):
            slot = (k * world + rank) * size
            keys += [(i, item_seed(self.seed, self.epoch, slot + j)) for j, i in enumerate(batches[k * world + rank])]
        skip, self.skip = self.skip, 0
        return iter(keys[skip:])


class ResumableLoader(DataLoader):
    """A shuffling training DataLoader whose position in the epoch is saved in Lightning checkpoints.

    `batches_done` is set by the training loop's callback (ldm_train.lit.resume) at every batch start: the
    loader itself cannot count, because Lightning fetches batches ahead of the one being trained on.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int | None = None, num_workers: int = 0,
                 drop_last: bool = False, **kwargs):
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed  # L.seed_everything sets it
        if not isinstance(dataset, SeededItems):
            dataset = SeededItems(dataset)
        if "sampler" not in kwargs and (found := dataset_buckets(dataset.dataset)) is not None:
            # aspect buckets: batches of one size; only whole batches exist, so drop_last holds anyway
            if batches_per_rank(found[0], batch_size, 1) == 0:
                raise ValueError(f"no aspect bucket holds a whole batch of {batch_size} images (images per bucket: "
                                 f"{histogram(*found)}): lower the batch size, add images, or set "
                                 "data.aspect_buckets=false")
            kwargs["sampler"], drop_last = BucketSampler(dataset, found[0], batch_size, seed=seed), True
        kwargs.setdefault("sampler", ResumableSampler(dataset, shuffle=True, seed=seed, drop_last=drop_last))
        # its own generator: creating an iterator must not draw from the global RNG (training noise comes from it)
        kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
        super().__init__(dataset, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last, **kwargs)
        self.seed = seed
        self.batches_done = 0

    def state_dict(self) -> dict:
        sampler = self.sampler
        return {"epoch": int(sampler.epoch), "batches_done": int(self.batches_done),
                "samples_done": int(self.batches_done) * self.batch_size * sampler.num_replicas}

    def load_state_dict(self, state: dict) -> None:
        sampler = self.sampler
        sampler._follow_world()
        if state["batches_done"] >= len(self):  # saved after the epoch's last batch: the next epoch comes next
            sampler.set_epoch(state["epoch"] + 1)
            sampler.skip, self.batches_done = 0, 0
            return
        sampler.set_epoch(state["epoch"])
        # all ranks together consumed samples_done samples; with the same world size this is batches_done batches
        sampler.skip = state["samples_done"] // sampler.num_replicas
        self.batches_done = state["batches_done"]
