"""Sample quality during stage 2: every `diffusion.eval_every` steps (and at the end) the EMA model generates from
a fixed set of held-out captions with fixed seeds, and `generation_metrics` scores it.

Each evaluation goes to every logger at the current step (`eval/<key>`, the names `stage=evaluate` uses) and to
`<run dir>/quality.jsonl` (one JSON record per evaluation, rewritten atomically), which the ablation report reads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from ldm_train.evaluation.generation import generation_metrics
from ldm_train.utils.io import atomic_write_text

log = logging.getLogger(__name__)
QUALITY_FILE = "quality.jsonl"

Evaluate = Callable[[object], dict]  # pipeline → metrics


class QualityMonitor(L.Callback):
    """Runs `evaluate(ema pipeline)` on rank 0 every `every` optimizer steps and once after the last step."""

    def __init__(self, every: int, evaluate: Evaluate, path: Path):
        self.every, self.evaluate, self.path = int(every), evaluate, Path(path)
        self.records: list[dict] = []
        self._last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every == 0 and step != self._last_step:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_step != self._last_step:  # the final weights, whatever stopped training
            self._run(trainer, pl_module)

    def _run(self, trainer: L.Trainer, pl_module) -> None:
        step = self._last_step = trainer.global_step
        if not trainer.is_global_zero:
            return
        pipe = pl_module.ema_pipeline()
        modes = [(m, m.training) for m in (pipe.denoiser, pipe.text_encoder)]
        for m, _ in modes:
            m.eval()
        try:
            metrics = self.evaluate(pipe)
        finally:
            for m, was_training in modes:
                m.train(was_training)
        for logger in trainer.loggers:
            logger.log_metrics({f"eval/{k}": float(v) for k, v in metrics.items()}, step=step)
        self.records.append({"step": step, **metrics})
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        log.info("step %d quality: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))


def read_quality(path: Path) -> tuple[list[dict], int]:
    """(records, unreadable line count) of a quality.jsonl; a missing file gives ([], 0)."""
    if not Path(path).exists():
        return [], 0
    records, bad = [], 0
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    return records, bad


def build_quality_monitor(cfg: DictConfig, run_dir: Path) -> QualityMonitor | None:
    """The monitor of `diffusion.eval_every` (> 0) over `diffusion.eval_num_samples` held-out captions, with the
    run's `sampling` settings; batch i is sampled with seed `sampling.seed + i`. None when eval_every is 0."""
    d = cfg.diffusion
    if not d.get("eval_every"):
        return None
    from ldm_train.stages.evaluate import feature_network, real_set

    features = feature_network(cfg)
    batches = real_set(cfg, cfg.data.resolution, int(d.eval_num_samples))
    alignment = labels_fn = None
    if cfg.data.name == "shapes":
        from ldm_train.data.shapes import caption_alignment as alignment
        from ldm_train.data.shapes import captions_to_labels as labels_fn
    seed = int(cfg.sampling.seed)

    def evaluate(pipe) -> dict:
        def gen(captions: list[str], i: int):
            labels = labels_fn(captions) if labels_fn and pipe.text_encoder.needs_labels else None
            return pipe.generate(captions, seed=seed + i, labels=labels)

        return generation_metrics(gen, batches, features, alignment)

    log.info("stage-2 quality every %d steps on %d held-out captions (%s)", d.eval_every,
             sum(len(b["caption"]) for b in batches), features.fid_key if features else "no feature network")
    return QualityMonitor(int(d.eval_every), evaluate, Path(run_dir) / QUALITY_FILE)
