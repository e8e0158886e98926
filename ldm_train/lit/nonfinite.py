"""Non-finite steps: a step with a non-finite loss or gradients changes nothing, is counted, and a run of them stops
training; a checkpoint with non-finite weights is never written.

The optimizer step changes nothing (Lightning still counts the step), the count is logged (`train/nonfinite_steps`),
and after `trainer.max_nonfinite_steps` in a row the run stops with NonFiniteError. With fused Adam/AdamW (the
default) this costs no host synchronisation: the fused step skips itself on the device (`found_inf`, as under a
grad scaler), the counters live on the device and are read at logging intervals and checkpoints, so a run of bad
steps is noticed at the next logging interval. Other optimizers decide on the host (one flag read per step) and
drop the gradients.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from ldm_train.errors import UserError
from ldm_train.utils.distributed import world_size

log = logging.getLogger(__name__)


class NonFiniteError(UserError, RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradients."""


def finite_flag(losses: list[torch.Tensor | None], params: list[torch.Tensor]) -> torch.Tensor | None:
    """A 0-d int32 device tensor, 1 when every loss and every gradient of `params` is finite, the same on every rank
    (None when there is nothing to check). No host synchronisation.

    Gradients are checked through their total norm (non-finite iff some element is; a norm that overflows fp32
    counts as non-finite too, which is no loss).
    """
    grads = [p.grad for p in params if p.grad is not None]
    terms = [loss.detach().float().reshape(()) for loss in losses if loss is not None]
    if grads:
        terms.append(torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False).float())
    if not terms:
        return None
    ok = torch.isfinite(torch.stack(terms)).all().to(torch.int32)
    if world_size() > 1:  # grads are already all-reduced, the losses are not: every rank must decide the same
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return ok


def step_is_finite(losses: list[torch.Tensor | None], params: list[torch.Tensor]) -> bool:
    """`finite_flag` read on the host (a synchronisation)."""
    ok = finite_flag(losses, params)
    return True if ok is None else bool(ok)


class NonFiniteGuard(Callback):
    """Counts non-finite steps (on the device when it can), logs them, stops after a run of them, and refuses to
    checkpoint non-finite weights."""

    def __init__(self, checkpoint_dir: str | Path, max_nonfinite_steps: int = 10):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self._device_counts: torch.Tensor | None = None  # [total, in a row, longest run since the last read]

    def record_step(self, finite: bool, step: int) -> None:
        """Count a step; raise NonFiniteError after `max_nonfinite_steps` non-finite steps in a row."""
        if finite:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_total += 1
        self.nonfinite_in_a_row += 1
        log.warning("step %d: non-finite loss or gradients, the update was skipped (%d in a row, %d in all)",
                    step, self.nonfinite_in_a_row, self.nonfinite_total)
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            self._stop(step, self.nonfinite_in_a_row)

    def record_step_on_device(self, ok: torch.Tensor) -> None:
        """Count a step whose finiteness stays on the device (`ok`: 0-d, 1 = finite); read in `read_counts`."""
        bad = (1 - ok).to(torch.int64)
        if self._device_counts is None:
            self._device_counts = torch.tensor([self.nonfinite_total, self.nonfinite_in_a_row, 0],
                                               dtype=torch.int64, device=ok.device)
        total, in_a_row, longest = self._device_counts.unbind()
        in_a_row = (in_a_row + 1) * bad
        self._device_counts = torch.stack([total + bad, in_a_row, torch.maximum(longest, in_a_row)])

    def read_counts(self, step: int) -> None:
        """Bring the device counters to the host (a synchronisation); raise NonFiniteError if a run of bad steps since
        the last read reached `max_nonfinite_steps`."""
        if self._device_counts is None:
            return
        total, in_a_row, longest = (int(v) for v in self._device_counts.tolist())
        self._device_counts = None
        new = total - self.nonfinite_total
        self.nonfinite_total, self.nonfinite_in_a_row = total, in_a_row
        if new:
            log.warning("step %d: %d step(s) with a non-finite loss or gradients since the last check were skipped "
                        "(%d in all, %d in a row now)", step, new, total, in_a_row)
        if longest >= self.max_nonfinite_steps:
            self._stop(step, longest)

    def _stop(self, step: int, in_a_row: int) -> None:
        last = self.checkpoint_dir / "last.ckpt"
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
        raise NonFiniteError(
            f"training stopped at step {step}: {in_a_row} optimizer steps in a row had a "
            f"non-finite loss or gradients (trainer.max_nonfinite_steps={self.max_nonfinite_steps}); they were "
            f"skipped, so the weights are those of the last finite step; {kept}. Fix: lower the learning rate, "
            "clip gradients (diffusion.grad_clip), train in 32-true or bf16-mixed rather than 16-mixed, check "
            "the data for NaN/inf; then resume with ckpt_path=last")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._device_counts is not None and trainer._logger_connector.should_update_logs:
            self.read_counts(trainer.global_step)
        total = self._device_counts[0].float() if self._device_counts is not None else float(self.nonfinite_total)
        pl_module.log("train/nonfinite_steps", total, on_step=True, on_epoch=False, batch_size=1)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        bad = [k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not v.isfinite().all()]
        if bad:
            raise NonFiniteError(f"refusing to save a checkpoint with non-finite weights ({', '.join(bad[:5])}); "
                                 f"the previous checkpoint in {self.checkpoint_dir} is kept")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.read_counts(trainer.global_step)

    def state_dict(self) -> dict:
        self.read_counts(-1)  # a checkpoint is being written: the counters it holds must be current
        return {"nonfinite_total": self.nonfinite_total, "nonfinite_in_a_row": self.nonfinite_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
        self._device_counts = None


def guard_of(module: L.LightningModule) -> NonFiniteGuard | None:
    trainer = module._trainer
    if trainer is None:
        return None
    return next((cb for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard)), None)


def guard_step(module: L.LightningModule, losses: list[torch.Tensor | None],
               optimizers: list) -> bool | torch.Tensor:
    """Check a step after backward, before the optimizer steps; a non-finite step must change nothing.

    Fused Adam/AdamW everywhere: each optimizer gets `found_inf` (the step skips itself on the device, Adam's step
    count included) and the returned 0-d device tensor (1 = finite) is for the caller's own updates (the EMA); no
    host synchronisation. Otherwise: one host read; a non-finite step drops every gradient; returns a bool.
    """
    optimizers = [getattr(opt, "optimizer", opt) for opt in optimizers]  # LightningOptimizer → torch optimizer
    params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    callback = guard_of(module)
    if all(opt.defaults.get("fused") for opt in optimizers):
        ok = finite_flag(losses, params)
        if ok is None:
            return True
        for opt in optimizers:
            opt.grad_scale, opt.found_inf = None, (1 - ok).float()
        if callback is not None:
            callback.record_step_on_device(ok)
        return ok
    finite = step_is_finite(losses, params)
    if not finite:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
    if callback is not None:
        callback.record_step(finite, module.global_step)
    elif not finite:
        log.warning("step %d: non-finite loss or gradients, the update was skipped", module.global_step)
    return finite
