"""Optimizers and LR schedules from config: `_target_` + `_partial_` nodes finished with what only the run knows.

A stage's `optimizer:` node names the class and its settings (betas, weight decay); the module adds the
parameters, the learning rate (the stage's `lr`, scaled when `scale_lr`) and `fused` where the class takes it
(`use_fused_optimizer` decides). A `lr_scheduler:` node (null: constant LR) is finished with the optimizer.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable

import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, Timer


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


def projected_total(step: int, elapsed: float, remaining: float, max_steps: int) -> int:
    """Steps the run will reach: `step` plus what the time left allows at the rate so far (step/elapsed, which
    includes validation), never more than `max_steps`."""
    if step <= 0 or elapsed <= 0:
        return max_steps
    return int(min(max_steps, step + max(0.0, remaining) * step / elapsed))


def retarget(scheduler, total: int) -> bool:
    """Point every LambdaLR multiplier that takes a `total` (the schedule's length) at `total`; False if none."""
    lambdas = getattr(scheduler, "lr_lambdas", [])
    changed = False
    for i, fn in enumerate(lambdas):
        if isinstance(fn, functools.partial) and "total" in fn.keywords:
            lambdas[i] = functools.partial(fn.func, *fn.args, **{**fn.keywords, "total": total})
            changed = True
    return changed


class ScheduleToTime(Callback):
    """`<stage>.schedule_to_time: true` with a `max_time`: the LR schedule ends where the clock will stop the run.

    A run capped by `max_time` on a machine slower than its `max_steps` assumed would stop halfway through a
    cosine decay (LR still high). Every `every` steps, the schedules' `total` becomes the step the run will reach
    at its rate so far (capped by `max_steps`); a fast machine keeps `max_steps`. Off by default: a cluster job
    that uses `max_time` to stop before its wall time and resume later wants the full schedule.
    """

    def __init__(self, steps_per_batch: int = 1, every: int = 10, warm: int = 10):
        """`steps_per_batch`: optimizer steps Lightning counts per batch (2 in stage 1, whose schedules count
        batches)."""
        self.per_batch, self.every, self.warm = steps_per_batch, every * steps_per_batch, warm * steps_per_batch
        self.total: int | None = None
        self._t0: tuple[int, float] | None = None
        self._timer: Timer | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._timer is None:  # looked up once: this hook runs every batch
            self._timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        timer = self._timer
        remaining = timer.time_remaining("train") if timer is not None else None
        if remaining is None:
            return
        step, elapsed = trainer.global_step, timer.time_elapsed("train")
        if self._t0 is None:  # measure from here on: the first steps carry start-up costs
            if step >= self.warm:
                self._t0 = (step, elapsed)
            return
        if step % self.every:
            return
        s0, e0 = self._t0
        total = (projected_total(step - s0, elapsed - e0, remaining, trainer.max_steps - s0) + s0) // self.per_batch
        for config in trainer.lr_scheduler_configs:
            if retarget(config.scheduler, total):
                self.total = total
