"""What changes when a stage runs on several processes: ranks, means over ranks, per-rank randomness."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `t` over all ranks, on t's device (a copy; `t` itself when not distributed).

    NCCL reduces CUDA tensors only: a CPU tensor (after `trainer.fit`, Lightning's DDP teardown moves the module
    back to the CPU) goes through the current GPU and comes back.
    """
    if world_size() == 1:
        return t
    on = t.device
    if dist.get_backend() == "nccl" and on.type != "cuda":
        work = t.to(torch.device("cuda", torch.cuda.current_device()))
    else:
        work = t.clone()
    dist.all_reduce(work)  # SUM: gloo has no AVG
    return work.to(on)


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of `t` over all ranks (a copy; `t` itself when not distributed)."""
    if world_size() == 1:
        return t
    return sum_over_ranks(t) / world_size()


def mean_logs_over_ranks(logs: dict, device: torch.device) -> dict:
    """Every scalar of a step's log dict averaged over ranks in one all-reduce (not one per key, as sync_dist)."""
    if world_size() == 1:
        return logs
    keys = list(logs)
    values = torch.stack([torch.as_tensor(logs[k], dtype=torch.float32, device=device).detach() for k in keys])
    return dict(zip(keys, mean_over_ranks(values)))


def seed_per_rank(step: int) -> int:
    """Reseed torch with a seed of (run seed, rank, step) so every rank draws its own noise, t and dropout masks.

    Lightning's seed_everything gives every rank the same seed: right for the initial weights, but then every rank
    would draw the same noise for different images. Called at the start of training (after DDP has broadcast the
    weights), so the initial weights stay identical; `step` makes a resumed run draw fresh numbers.
    """
    base = int(os.environ.get("PL_GLOBAL_SEED", 0))
    seed = int(np.random.SeedSequence([base, rank(), step]).generate_state(1, dtype=np.uint64)[0] % 2**63)
    torch.manual_seed(seed)
    return seed
