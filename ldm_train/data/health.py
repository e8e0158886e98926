"""Bad-input counts during training: summed over batches and ranks, logged per epoch, and a skip-fraction stop."""

from __future__ import annotations

import logging

import lightning as L
import torch

from ldm_train.data.images import (
    CONVERT_REASONS,
    COUNT_KEYS,
    COUNTS_KEY,
    NAMED_PER_REASON,
    NAMES_KEY,
    SKIP_REASONS,
    UNUSED_REASONS,
    parse_names,
    skip_fraction,
    summarize,
)
from ldm_train.errors import UserError

log = logging.getLogger(__name__)


class SkipFractionError(UserError, RuntimeError):
    """Too much of the data was unreadable: the run stops instead of training on what is left."""


def check_skip_fraction(total: torch.Tensor, max_fraction: float, where: str = "",
                        named: dict[str, list[str]] | None = None) -> None:
    """Raise SkipFractionError when skipped / seen of a summed count vector exceeds `max_fraction`; `named`: the
    first skipped inputs per reason, quoted in the message."""
    frac = skip_fraction(total)
    if frac > max_fraction:
        counts = summarize(total)
        skipped = {k: v for k, v in counts.items() if k in SKIP_REASONS}
        first = "; ".join(f"{reason}: {', '.join(names)}" for reason, names in (named or {}).items())
        raise SkipFractionError(
            f"{frac:.1%} of the inputs {where}were skipped as unreadable (limit data.max_skip_fraction="
            f"{max_fraction}): {skipped} out of {counts['samples']} delivered"
            f"{f' (first: {first})' if first else ''}. Fix or remove the broken files "
            "(`python -m ldm_train.data.make_shards` checks every image and reports them), or raise "
            "data.max_skip_fraction")


class DataHealth(L.Callback):
    """Sums the `data_counts` of training batches; every epoch logs them (`data/<reason>`) and checks the skips.

    The check also runs every `check_every` batches once `min_samples` were seen, so a long epoch of broken
    data stops early. Counts are summed over ranks at the same batch index on every rank (no hang).
    """

    def __init__(self, max_skip_fraction: float = 0.05, check_every: int = 100, min_samples: int = 1000):
        self.max_skip_fraction, self.check_every, self.min_samples = max_skip_fraction, check_every, min_samples
        self.epoch_counts = torch.zeros(len(COUNT_KEYS), dtype=torch.long)
        self.seen_batches = 0
        self.named: dict[str, list[str]] = {}  # reason → the first NAMED_PER_REASON skipped inputs (this rank)

    def note_names(self, lines: list[str]) -> None:
        """Log each newly seen skipped input, up to NAMED_PER_REASON per reason (the rest are counted only)."""
        for reason, name in (pair for text in lines for pair in parse_names(text)):
            names = self.named.setdefault(reason, [])
            if name not in names and len(names) < NAMED_PER_REASON:
                names.append(name)
                log.warning("skipped an unreadable input (%s): %s%s", reason, name,
                            " (further ones of this reason are only counted)" if len(names) == NAMED_PER_REASON
                            else "")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_counts.zero_()
        self.seen_batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        counts = batch.get(COUNTS_KEY) if isinstance(batch, dict) else None
        if counts is None:
            return
        self.epoch_counts += counts.detach().sum(0).cpu()
        self.note_names(batch.get(NAMES_KEY) or [])
        self.seen_batches += 1
        if self.seen_batches % self.check_every == 0:
            total = self._reduce(trainer)
            if total[0] >= self.min_samples:
                check_skip_fraction(total, self.max_skip_fraction, f"of epoch {trainer.current_epoch} so far ",
                                    self.named)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.seen_batches:
            return
        total = self._reduce(trainer)
        counts = summarize(total)
        log.info("epoch %d data: %d samples; skipped %s; converted %s%s", trainer.current_epoch, counts["samples"],
                 {k: v for k, v in counts.items() if k in SKIP_REASONS} or "none",
                 {k: v for k, v in counts.items() if k in CONVERT_REASONS} or "none",
                 "".join(f"; {k} {v} (read, in no whole batch this epoch)" for k, v in counts.items()
                         if k in UNUSED_REASONS))
        if trainer.logger:
            trainer.logger.log_metrics({f"data/{k}": float(v) for k, v in counts.items()}, step=trainer.global_step)
        check_skip_fraction(total, self.max_skip_fraction, f"of epoch {trainer.current_epoch} ", self.named)

    def _reduce(self, trainer: L.Trainer) -> torch.Tensor:
        total = self.epoch_counts.to(trainer.strategy.root_device)
        return trainer.strategy.reduce(total, reduce_op="sum").cpu() if trainer.world_size > 1 else total.cpu()
