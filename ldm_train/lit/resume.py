"""Runs that survive interruption: exact resume and checkpoints on preemption signals and Ctrl-C.

- Exact resume: the RNG state after every training step is kept and put back before the next one (so validation,
  loader start-up and anything else between steps never shifts the training noise), saved per rank in each
  checkpoint and restored on resume; the training loader's position in its epoch is saved (data/resumable.py).
- Interruption: SIGTERM and SIGUSR1 (SLURM's warning signal) and SIGINT (Ctrl-C) save `checkpoints/last.ckpt` at
  the end of the current batch (under DDP: of the next logging interval, where the ranks agree), print the command
  that resumes (the user's own overrides + `ckpt_path=`), and exit: status 0 after a preemption signal (a
  scheduler requeues the job), 130 after Ctrl-C (so a shell chain `stage=autoencoder && stage=diffusion` stops).
  A second Ctrl-C stops at once, without a checkpoint. Lightning 2.6 alone, outside SLURM auto-requeue, stops on
  SIGTERM and Ctrl-C without saving, and dies on SIGUSR1 (the default action).
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
from ldm_train.errors import CTRL_C_EXIT
from ldm_train.utils.distributed import world_size

log = logging.getLogger(__name__)
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
INTERRUPT_SIGNALS = (*PREEMPTION_SIGNALS, signal.SIGINT)


class Preempted(SystemExit):
    """An interruption signal arrived and a checkpoint was saved: exits with 0 (preemption) or 130 (Ctrl-C)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(CTRL_C_EXIT if signum == signal.SIGINT else 0)
        self.signum = signum


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class ResumeCallback(Callback):
    """Exact resume (RNG and data position, the stage tag in each checkpoint) and checkpoints on interruption.

    `steps_per_batch`: optimizer steps per training step (2 in stage 1); the message counts training steps.
    `run_stage`: the `stage=` the user ran (e.g. `pipeline`), when it is not the training stage `stage`; the resume
    command then names the checkpoint file, since `ckpt_path=last` only searches runs of the same stage.
    """

    def __init__(self, stage: str, checkpoint_dir: str | Path, run_stage: str | None = None, steps_per_batch: int = 1):
        self.stage = stage
        self.steps_per_batch = max(1, steps_per_batch)  # optimizer steps Lightning counts per training step
        self.run_stage = run_stage or stage
        self.checkpoint_dir = Path(checkpoint_dir)
        self._rng: dict | None = None  # RNG state after the last training step (or restored from a checkpoint)
        self._signal: int | None = None
        self._previous_handlers: dict = {}

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
        if self._interrupted(trainer):
            self._save_and_exit(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        state = self._rng if self._rng is not None else _rng_state()
        if world_size() > 1:  # every rank has its own RNG stream; the file is written by rank 0
            states: list = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint["rng_states"] = states
        checkpoint["ldm_train"] = {"stage": self.stage}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        if states:
            self._rng = states[trainer.global_rank] if trainer.global_rank < len(states) else states[0]

    # ------------------------------------------------------------------ interruption signals

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning registered its own handlers (which only stop on SIGTERM, without a checkpoint)
        self._signal = None
        if threading.current_thread() is threading.main_thread():
            for sig in INTERRUPT_SIGNALS:
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self._signal == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now (Lightning shuts down without a checkpoint)
        if signum == signal.SIGINT:
            log.warning("Ctrl-C: saving a checkpoint at the end of this batch (Ctrl-C again stops at once, "
                        "without one)")
        self._signal = signum  # acted on at the end of the current batch, where the state is consistent

    def _interrupted(self, trainer: L.Trainer) -> bool:
        flag = self._signal is not None
        if world_size() > 1:  # the signal may reach one rank only; all must save and stop together
            # a collective read on the host: only at logging intervals (the same steps on every rank), where the
            # host waits for the device anyway, so other steps never synchronise for it
            if not trainer._logger_connector.should_update_logs:
                return False
            t = torch.tensor(int(flag), device=trainer.strategy.root_device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t)
        return flag

    def _save_and_exit(self, trainer: L.Trainer) -> None:
        from ldm_train.commands import resume_command

        signum = self._signal or signal.SIGTERM
        path = self.checkpoint_dir / "last.ckpt"
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            log.warning("interrupted at step %d by %s: saved %s; resume with %s",
                        trainer.global_step // self.steps_per_batch,
                        signal.Signals(signum).name, path, resume_command(self.stage, self.run_stage, path))
        raise Preempted(signum)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for sig, handler in self._previous_handlers.items():
            if threading.current_thread() is threading.main_thread() and handler is not None:
                signal.signal(sig, handler)
        self._previous_handlers = {}
