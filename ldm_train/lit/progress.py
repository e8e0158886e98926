"""Progress a person can plan with: a bar over the steps the user asked for, and one projection of the stage's time.

Lightning's own bar counts optimizer steps (two per batch in stage 1, so it showed twice the configured
`max_steps`) and shows whatever the module puts in `prog_bar`; this one counts training steps as the user set them
(`autoencoder.max_steps`, `diffusion.max_steps`), shows the loss a person can read (`bar/…` metrics), its rate and
an ETA: `step 1234/50000 · 2.1 it/s · ETA 6:12:00 · rec=0.08`.
"""

from __future__ import annotations

import logging
import sys
import time

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)
LONG_CPU_RUN_S = 6 * 3600  # a projected CPU stage longer than this gets a warning with the alternatives
PROJECT_AFTER = 10  # steps after the first (which pays start-up costs) measured for the projected stage time


def format_duration(seconds: float) -> str:
    """`6h12m`, `4m05s`, `12s`."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def projected_seconds(elapsed: float, measured_steps: int, remaining_steps: int) -> float:
    """remaining = remaining_steps · elapsed / measured_steps (the rate after the first step, held constant)."""
    return remaining_steps * elapsed / max(1, measured_steps)


class StepProgress(Callback):
    """A tqdm bar over training steps (`bar=True`) and, either way, one log line with the projected stage time.

    `steps_per_batch`: optimizer steps Lightning counts per training step (2 in stage 1). The bar reads the
    metrics (a host synchronisation) only every `refresh_every` steps.
    """

    def __init__(self, stage: str, max_steps: int, steps_per_batch: int = 1, refresh_every: int = 10,
                 bar: bool = True):
        self.stage, self.max_steps, self.steps_per_batch = stage, int(max_steps), max(1, steps_per_batch)
        self.refresh_every, self.show_bar = max(1, refresh_every), bar
        self._bar = None
        self._t1: float | None = None  # clock at the end of the first step of this process
        self._step1 = 0
        self._projected = False

    def step(self, trainer: L.Trainer) -> int:
        return trainer.global_step // self.steps_per_batch

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.show_bar and trainer.is_global_zero:
            from tqdm import tqdm

            self._bar = tqdm(total=self.max_steps, initial=self.step(trainer), unit="it", dynamic_ncols=True,
                             file=sys.stderr, bar_format="step {n_fmt}/{total_fmt} · {rate_fmt} · ETA {remaining}"
                                                         "{postfix}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = self.step(trainer)
        now = time.perf_counter()
        if self._t1 is None:
            self._t1, self._step1 = now, step
        elif not self._projected and step - self._step1 >= PROJECT_AFTER and trainer.is_global_zero:
            self._projected = True
            elapsed, measured = now - self._t1, step - self._step1
            remaining = projected_seconds(elapsed, measured, self.max_steps - step)
            log.info("%s: %.2f s/step over steps %d–%d; projected %s for the remaining %d of %d steps", self.stage,
                     elapsed / measured, self._step1, step, format_duration(remaining), self.max_steps - step,
                     self.max_steps)
            device = getattr(getattr(trainer, "strategy", None), "root_device", None)
            if remaining > LONG_CPU_RUN_S and getattr(device, "type", None) == "cpu":
                log.warning("%s would train for %s on the CPU. On a CPU try experiment=quickstart (minutes) or "
                            "experiment=smoke (seconds), lower the stage's max_steps, or run on a GPU",
                            self.stage, format_duration(remaining))
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if step % self.refresh_every == 0:
                shown = {k.removeprefix("bar/"): float(v) for k, v in trainer.progress_bar_metrics.items()
                         if k.startswith("bar/")}
                self._bar.set_postfix_str(" · ".join(f"{k}={v:.4g}" for k, v in shown.items()), refresh=False)
                self._bar.refresh()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
