"""Exponential moving average of model weights."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn


def ema_decay(num_updates: int | torch.Tensor, max_decay: float = 0.9999) -> float | torch.Tensor:
    """Decay of the update that follows `num_updates` earlier ones: with k = num_updates + 1 (CompVis' LitEma
    counts the update before using it), decay = min(max_decay, (1 + k) / (10 + k)), i.e. 2/11, 3/12, 4/13, …

    The warm-up lets the early EMA track the fast-moving weights. `num_updates` may be a device tensor (the
    decay is then a device tensor too, with no host synchronisation).
    """
    k = num_updates + 1
    warm = (1 + k) / (10 + k)
    return torch.clamp(warm, max=max_decay) if isinstance(warm, torch.Tensor) else min(max_decay, warm)


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float | torch.Tensor) -> None:
    """ema ← decay·ema + (1 − decay)·param for every float parameter; buffers copied.

    `decay` may be a 0-d device tensor (no host synchronisation); decay 1 leaves the EMA as it is.
    """
    ema_params = dict(ema_model.named_parameters())
    params = dict(model.named_parameters())
    # every parameter by name, not just requires_grad ones: freezing a layer later
    # must not silently shift which EMA tensor is paired with which model tensor
    assert ema_params.keys() == params.keys(), (
        f"parameter names differ: {sorted(ema_params.keys() ^ params.keys())[:5]}"
    )
    dst, src = [], []
    for name, e in ema_params.items():
        if e is params[name]:  # shared with the model (a frozen LoRA base): already equal, nothing to average
            continue
        p = params[name].detach()
        if e.is_floating_point():
            dst.append(e)
            src.append(p.to(e.dtype))
        else:
            e.copy_(p)
    if dst and isinstance(decay, torch.Tensor):
        weight = (1.0 - decay).to(dst[0].device, torch.float32)
        torch._foreach_lerp_(dst, src, [weight.to(d.dtype).expand_as(d) for d in dst])
    elif dst:
        torch._foreach_lerp_(dst, src, 1.0 - decay)
    ema_buffers = dict(ema_model.named_buffers())
    buffers = dict(model.named_buffers())
    assert ema_buffers.keys() == buffers.keys(), (
        f"buffer names differ: {sorted(ema_buffers.keys() ^ buffers.keys())[:5]}"
    )
    for name, b in ema_buffers.items():
        b.copy_(buffers[name])


class EMA(nn.Module):
    """Frozen eval-mode copy `module`, updated with decay = ema_decay(num_updates); `num_updates` counts the updates
    made so far (the first update uses 2/11, as CompVis' LitEma). Parameters in `shared` (frozen ones only) are
    the model's own tensors in the copy too."""

    def __init__(self, model: nn.Module, max_decay: float = 0.9999, shared: Iterable[nn.Parameter] = ()) -> None:
        super().__init__()
        # `shared` parameters are not copied: the EMA module holds the model's own tensors. For a frozen LoRA base
        # the average of a constant is that constant, and a second copy would double the memory of an SD U-Net.
        memo = {id(p): p for p in shared}
        self.module = copy.deepcopy(model, memo).eval().requires_grad_(False)
        self.max_decay = max_decay
        # a buffer so the warm-up position survives checkpoint / resume
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # host copy of num_updates: reading the (GPU) buffer every step would stall the host on the device
        self._host_updates: int | None = 0

    def update(self, model: nn.Module, finite: torch.Tensor | None = None) -> float | torch.Tensor:
        """One EMA step from model's current weights; returns the decay used.

        `finite`: a 0-d device flag (1 = the optimizer stepped); then everything stays on the device: a 0 flag
        changes no EMA weight and does not count, and the returned decay is a device tensor.
        """
        if finite is not None:
            decay = ema_decay(self.num_updates.to(torch.float32), self.max_decay)
            update_ema(self.module, model, 1 - (1 - decay) * finite)
            self.num_updates += finite.to(self.num_updates.dtype)
            self._host_updates = None
            return decay
        if self._host_updates is None:  # once after a checkpoint load
            self._host_updates = int(self.num_updates)
        decay = ema_decay(self._host_updates, self.max_decay)
        update_ema(self.module, model, decay)
        self._host_updates += 1
        self.num_updates.fill_(self._host_updates)  # a host → device write: no synchronisation
        return decay

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._host_updates = None  # num_updates changed under us: re-read it on the next update

    def train(self, mode: bool = True) -> EMA:
        # a parent's .train() must not put the EMA copy in train mode (dropout, BN)
        self.training = mode
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
