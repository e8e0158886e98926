"""Throughput callback: FLOPs of one training batch (counted once), then TFLOP/s and MFU at each logging interval."""

from __future__ import annotations

import logging
import time

import lightning as L
import torch
from torch.utils.flop_counter import FlopCounterMode

from ldm_train.utils.flops import compute_dtype, mfu, resolve_peak_tflops

log = logging.getLogger(__name__)


class MFUMonitor(L.Callback):
    """Logs `perf/tflops` (achieved, per device), `perf/mfu` (when a peak is known) and `perf/batches_per_second`.

    The peak comes from Lightning (`get_available_flops`) or `trainer.peak_tflops`. Lightning's ThroughputMonitor is
    not used: it synchronises CUDA after every batch (here only at logging intervals, so no step waits on the host),
    it needs the module to supply `flops_per_batch` (Lightning's `measure_flops` counts a forward and a loss
    backward, not the optimizer, the EMA or stage 1's discriminator step), and it takes no configured peak.

    The first training batch runs under FlopCounterMode (forward, backward and optimizer, everything the step does,
    recomputation under gradient checkpointing included); it is left out of the timing, as is every batch before
    it. The clock is read (and CUDA synchronised) only at logging intervals, so no step waits on the host.
    While counting, `pl_module.counting_flops` is True: a module with a compiled network runs it eagerly then.
    The count is kept in checkpoints, so a resumed run does not count again: a batch run under FlopCounterMode can
    differ from a plain one in the last bit (another kernel path), which would break an exact resume.
    """

    def __init__(self, peak_tflops: float | str | None = "auto"):
        self.peak_setting = peak_tflops
        self.peak_tflops: float | None = None
        self.flops_per_batch: int | None = None
        self._counter: FlopCounterMode | None = None
        self._t0: float | None = None
        self._batches = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        self.peak_tflops = resolve_peak_tflops(self.peak_setting, device, trainer.precision)
        if self.peak_tflops is None and trainer.is_global_zero:
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
            why = "trainer.peak_tflops=null" if self.peak_setting in (None, "none") else \
                f"Lightning's get_available_flops knows no peak for {name!r} at {compute_dtype(trainer.precision)}"
            log.info("perf/tflops is logged, perf/mfu is not: %s; set trainer.peak_tflops=<the device's dense "
                     "peak TFLOP/s> for MFU", why)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.flops_per_batch is None and self._counter is None:
            pl_module.counting_flops = True
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops_per_batch = self._counter.get_total_flops()
            self._counter = None
            pl_module.counting_flops = False
            log.info("training batch: %.4g GFLOPs per device", self.flops_per_batch / 1e9)
            self._restart_clock(pl_module)
            return
        self._batches += 1
        if not _logging_now(trainer):
            return
        _sync(pl_module.device)
        seconds = time.perf_counter() - self._t0
        if self._batches and seconds > 0 and self.flops_per_batch:
            metrics = {"perf/tflops": self.flops_per_batch * self._batches / seconds / 1e12,
                       "perf/batches_per_second": self._batches / seconds}
            if self.peak_tflops:
                metrics["perf/mfu"] = mfu(self.flops_per_batch, self._batches, seconds, self.peak_tflops)
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        self._restart_clock(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._restart_clock(pl_module)  # validation time is not training throughput

    def state_dict(self) -> dict:
        return {"flops_per_batch": self.flops_per_batch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.flops_per_batch = state_dict.get("flops_per_batch")

    def on_train_start(self, trainer, pl_module) -> None:
        if self.flops_per_batch is not None:  # restored from a checkpoint: time from the first batch on
            self._restart_clock(pl_module)

    def _restart_clock(self, pl_module: L.LightningModule) -> None:
        _sync(pl_module.device)
        self._t0, self._batches = time.perf_counter(), 0


def _logging_now(trainer: L.Trainer) -> bool:
    # the same test Lightning uses to write the step's metrics, so these land in the same row
    return bool(trainer._logger_connector.should_update_logs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
