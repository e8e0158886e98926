"""Runs that survive interruption and bad numbers: exact resume, preemption signals, non-finite steps.

- Exact resume: the RNG state after every training step is kept and put back before the next one (so validation,
  loader start-up and anything else between steps never shifts the training noise), saved per rank in each
  checkpoint and restored on resume; the training loader's position in its epoch is saved (data/resumable.py).
- Preemption: SIGTERM and SIGUSR1 (SLURM's warning signal) save `checkpoints/last.ckpt` at the end of the current
  batch (under DDP: of the next logging interval, where the ranks agree) and exit with status 0. Lightning 2.6
  alone, outside SLURM auto-requeue, only stops on SIGTERM without saving, and dies on SIGUSR1 (the default action).
- Non-finite loss or gradients: the optimizer step changes nothing (Lightning still counts the step), the count is
  logged (`train/nonfinite_steps`), and after `trainer.max_nonfinite_steps` in a row the run stops with
  NonFiniteError; a checkpoint with non-finite weights is never written. With fused Adam/AdamW (the default) this
  costs no host synchronisation: the fused step skips itself on the device (`found_inf`, as under a grad scaler),
  the counters live on the device and are read at logging intervals and checkpoints, so a run of bad steps is
  noticed at the next logging interval. Other optimizers decide on the host (one flag read per step) and drop
  the gradients.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from ldm_train.data.resumable import ResumableLoader
from ldm_train.errors import UserError

log = logging.getLogger(__name__)
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteError(UserError, RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradients."""


class Preempted(SystemExit):
    """A preemption signal arrived; a checkpoint was saved. Exits the process with status 0."""

    def __init__(self):
        super().__init__(0)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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
    if _distributed():  # grads are already all-reduced, the losses are not: every rank must decide the same
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return ok


def step_is_finite(losses: list[torch.Tensor | None], params: list[torch.Tensor]) -> bool:
    """`finite_flag` read on the host (a synchronisation)."""
    ok = finite_flag(losses, params)
    return True if ok is None else bool(ok)


class ReliabilityCallback(Callback):
    """Exact resume (RNG and data position), preemption checkpoints, and the non-finite step budget."""

    def __init__(self, stage: str, checkpoint_dir: str | Path, max_nonfinite_steps: int = 10):
        self.stage = stage
        self.checkpoint_dir = Path(checkpoint_dir)
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self._device_counts: torch.Tensor | None = None  # [total, in a row, longest run since the last read]
        self._rng: dict | None = None  # RNG state after the last training step (or restored from a checkpoint)
        self._signal: int | None = None
        self._previous_handlers: dict = {}

    # ------------------------------------------------------------------ non-finite steps

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

    # ------------------------------------------------------------------ RNG and data position

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._rng is not None:  # whatever ran since the last step (validation, a new loader) drew from the RNG
            _set_rng_state(self._rng)
        loader = trainer.train_dataloader
        if isinstance(loader, ResumableLoader):
            loader.batches_done = batch_idx + 1  # batch_idx counts from the epoch start, also across a resume

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        # runs before ModelCheckpoint's hook (Lightning puts checkpoint callbacks last), so its save sees this state
        self._rng = _rng_state()
        if self._device_counts is not None and trainer._logger_connector.should_update_logs:
            self.read_counts(trainer.global_step)
        total = self._device_counts[0].float() if self._device_counts is not None else float(self.nonfinite_total)
        pl_module.log("train/nonfinite_steps", total, on_step=True, on_epoch=False, batch_size=1)
        if self._preempted(trainer):
            path = self.checkpoint_dir / "last.ckpt"
            trainer.save_checkpoint(path)
            log.warning("received %s: saved %s at step %d; resume with ckpt_path=%s (or ckpt_path=last)",
                        signal.Signals(self._signal or signal.SIGTERM).name, path, trainer.global_step, path)
            raise Preempted()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        state = self._rng if self._rng is not None else _rng_state()
        if _distributed():  # every rank has its own RNG stream; the file is written by rank 0
            states: list = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint["rng_states"] = states
        checkpoint["ldm_train"] = {"stage": self.stage}
        bad = [k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not v.isfinite().all()]
        if bad:
            raise NonFiniteError(f"refusing to save a checkpoint with non-finite weights ({', '.join(bad[:5])}); "
                                 f"the previous checkpoint in {self.checkpoint_dir} is kept")

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        if states:
            self._rng = states[trainer.global_rank] if trainer.global_rank < len(states) else states[0]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.read_counts(trainer.global_step)

    def state_dict(self) -> dict:
        self.read_counts(-1)  # a checkpoint is being written: the counters it holds must be current
        return {"nonfinite_total": self.nonfinite_total, "nonfinite_in_a_row": self.nonfinite_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
        self._device_counts = None

    # ------------------------------------------------------------------ preemption signals

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning registered its own handlers (which only stop on SIGTERM, without a checkpoint)
        self._signal = None
        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPTION_SIGNALS:
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        self._signal = signum  # acted on at the end of the current batch, where the state is consistent

    def _preempted(self, trainer: L.Trainer) -> bool:
        flag = self._signal is not None
        if _distributed():  # the signal may reach one rank only; all must save and stop together
            # a collective read on the host: only at logging intervals (the same steps on every rank), where the
            # host waits for the device anyway, so other steps never synchronise for it
            if not trainer._logger_connector.should_update_logs:
                return False
            t = torch.tensor(int(flag), device=trainer.strategy.root_device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t)
        return flag

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for sig, handler in self._previous_handlers.items():
            if threading.current_thread() is threading.main_thread() and handler is not None:
                signal.signal(sig, handler)
        self._previous_handlers = {}


def reliability_of(module: L.LightningModule) -> ReliabilityCallback | None:
    trainer = module._trainer
    if trainer is None:
        return None
    return next((cb for cb in trainer.callbacks if isinstance(cb, ReliabilityCallback)), None)


def guard_step(module: L.LightningModule, losses: list[torch.Tensor | None],
               optimizers: list) -> bool | torch.Tensor:
    """Check a step after backward, before the optimizer steps; a non-finite step must change nothing.

    Fused Adam/AdamW everywhere: each optimizer gets `found_inf` (the step skips itself on the device, Adam's step
    count included) and the returned 0-d device tensor (1 = finite) is for the caller's own updates (the EMA); no
    host synchronisation. Otherwise: one host read; a non-finite step drops every gradient; returns a bool.
    """
    optimizers = [getattr(opt, "optimizer", opt) for opt in optimizers]  # LightningOptimizer → torch optimizer
    params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    callback = reliability_of(module)
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
