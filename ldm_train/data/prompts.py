"""The prompts of stage 2's validation grids: the user's, the data's own (shapes), or captions drawn from the
validation split, so a model trained on one's own data is shown prompts it could have learned."""

from __future__ import annotations

import itertools
import logging

import torch
from torch.utils.data import Dataset, IterableDataset, Subset

log = logging.getLogger(__name__)
POOL = 64  # a streamed validation split: captions are drawn from its first POOL samples


def validation_prompts(data_cfg, diffusion_cfg, val_ds: Dataset) -> list[str]:
    """`diffusion.val_prompts` when set; else the first `diffusion.val_num_prompts` of the data's own
    `data.val_prompts` (shapes); else that many captions drawn from `val_ds` with `data.seed`."""
    explicit = diffusion_cfg.get("val_prompts")
    if explicit:
        return [str(p) for p in explicit]
    n = int(diffusion_cfg.get("val_num_prompts") or 4)
    own = data_cfg.get("val_prompts")
    if own:
        return [str(p) for p in own][:n]
    prompts = draw_captions(val_ds, n, int(data_cfg.get("seed", 0)))
    log.info("validation prompts (drawn from the validation split; set diffusion.val_prompts=[...] to choose): %s",
             prompts)
    return prompts


def draw_captions(dataset: Dataset, n: int, seed: int) -> list[str]:
    """n non-empty captions of `dataset` at seeded random positions (all of them when it has fewer); [""] when it
    has no caption at all (an unconditional model). A streamed dataset contributes its first POOL samples."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(dataset, IterableDataset):
        pool = [str(item.get("caption", "")) for item in itertools.islice(iter(dataset), POOL)]
        captions = (pool[i] for i in torch.randperm(len(pool), generator=gen).tolist())
    else:  # in a seeded order, reading only as many captions as it takes
        captions = (caption_of(dataset, i) for i in torch.randperm(len(dataset), generator=gen).tolist())
    drawn = list(itertools.islice((c for c in captions if c.strip()), n))
    return drawn or [""]


def caption_of(dataset: Dataset, index: int) -> str:
    """Caption of item `index`, read without decoding its image when the dataset can (image folders)."""
    if isinstance(dataset, Subset):
        return caption_of(dataset.dataset, dataset.indices[index])
    if hasattr(dataset, "caption"):
        return dataset.caption(index)
    return str(dataset[index].get("caption", ""))
