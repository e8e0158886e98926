"""Optimizers and LR schedules from config: `_target_` + `_partial_` nodes finished with what only the run knows.

A stage's `optimizer:` node names the class and its settings (betas, weight decay); the module adds the
parameters, the learning rate (the stage's `lr`, scaled when `scale_lr`) and `fused` where the class takes it
(`use_fused_optimizer` decides). A `lr_scheduler:` node (null: constant LR) is finished with the optimizer.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable

import torch
from hydra.utils import instantiate


def as_partial(spec: dict | Callable) -> Callable:
    """A `_target_`/`_partial_: true` config node → its functools.partial; an already-built callable as it is."""
    if callable(spec):
        return spec
    if not isinstance(spec, dict) or "_target_" not in spec:
        raise ValueError(f"expected a config node with _target_ (and _partial_: true), got {spec!r}")
    # "all": plain lists/dicts, not ListConfig, so optimizer states stay loadable with weights_only=True
    return instantiate(spec, _partial_=True, _convert_="all")


def build_optimizer(spec: dict | Callable, params: Iterable[torch.nn.Parameter], lr: float,
                    fused: bool | None) -> torch.optim.Optimizer:
    """spec(params, lr=lr[, fused=fused]); `fused` only where the class takes it and there is a choice to make."""
    make = as_partial(spec)
    kwargs = {"lr": lr}
    if fused is not None and "fused" in inspect.signature(make).parameters:
        kwargs["fused"] = fused
    return make(list(params), **kwargs)


def build_scheduler(spec: dict | Callable | None, optimizer: torch.optim.Optimizer):
    """spec(optimizer), or None for a constant LR."""
    return None if spec is None else as_partial(spec)(optimizer)


def cosine_decay(step: int, total: int) -> float:
    """LR multiplier ½(1 + cos(π·step/total)), 0 from `total` on."""
    return 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total))))


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up (step + 1)/warmup over `warmup` steps, then ½(1 + cos(π·p)) with
    p = (step − warmup)/(total − warmup), 0 from `total` on."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))
