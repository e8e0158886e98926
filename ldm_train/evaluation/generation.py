"""Generation metrics of one model on one fixed set: Fréchet distance, caption alignment, sampling throughput.

`generation_metrics` is the one loop that turns (a generator, real batches, a feature network) into numbers; the
stage-2 quality curves call it during training and it can serve `stage=evaluate` too. `over_seeds` turns repeats
with different sampling seeds into a mean and a spread.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch

from ldm_train.evaluation.features import FeatureNetwork
from ldm_train.evaluation.metrics import frechet, unit

# gen_fn(captions, batch_index) → images in [-1, 1], one per caption; it owns the sampling settings and seeds
GenerateFn = Callable[[list[str], int], torch.Tensor]
AlignmentFn = Callable[[torch.Tensor, list[str]], float]


@torch.no_grad()
def generation_metrics(gen_fn: GenerateFn, real_batches: Iterable[dict], features: FeatureNetwork | None,
                       alignment_fn: AlignmentFn | None = None) -> dict[str, float]:
    """Over every real batch ({"image", "caption"}): generate from its captions and compare.

    Keys: `features.fid_key` (fid | fd_<net>) when a feature network is given; `caption_alignment` (fraction of
    samples whose attributes match their caption) when `alignment_fn` is given; `samples`; `samples_per_second`
    = samples / seconds spent inside gen_fn (the sampler at its configured steps, decoder included).
    """
    fd = frechet(features) if features else None
    hits, n, seconds = 0.0, 0, 0.0
    for i, batch in enumerate(real_batches):
        captions = list(batch["caption"])
        start = time.perf_counter()
        images = gen_fn(captions, i)
        seconds += time.perf_counter() - start
        if fd is not None:
            fd.update(unit(batch["image"]), real=True)
            fd.update(unit(images), real=False)
        if alignment_fn is not None:
            hits += alignment_fn(images, captions) * len(images)
        n += len(images)
    out: dict[str, float] = {"samples": n, "samples_per_second": n / seconds if seconds > 0 else float("nan")}
    if fd is not None:
        out[features.fid_key] = float(fd.compute())
    if alignment_fn is not None:
        out["caption_alignment"] = hits / max(n, 1)
    return out


def over_seeds(runs: list[dict[str, float]]) -> dict[str, float]:
    """Mean of every number over repeats, plus `<key>_std` (sample standard deviation, n − 1) when there are at
    least two, and `seeds` = the number of repeats. One repeat comes back unchanged (with seeds = 1)."""
    out: dict[str, float] = {"seeds": len(runs)}
    for key in runs[0]:
        values = [float(r[key]) for r in runs if isinstance(r.get(key), (int, float))]
        if len(values) != len(runs):
            continue
        mean = sum(values) / len(values)
        out[key] = mean
        if len(values) > 1 and key not in ("samples",):
            out[f"{key}_std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return out
