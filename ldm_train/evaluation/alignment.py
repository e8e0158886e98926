"""Caption alignment on shapes: generate from dataset captions and read the attributes back from pixels."""

from __future__ import annotations

import torch

from ldm_train.data.shapes import ShapesDataset, caption_alignment


def eval_captions(n: int, seed: int = 1234) -> list[str]:
    """`n` captions drawn from the shapes distribution (a held-out split, deterministic)."""
    ds = ShapesDataset(resolution=8, size=n, split="test", seed=seed)
    return [ds[i]["caption"] for i in range(n)]


@torch.no_grad()
def sampled_alignment(pipeline, captions: list[str], guidance_scale: float, *, prompt: str | None = None,
                      batch_size: int = 64, **settings) -> float:
    """Caption alignment of one sample per caption, sampled from the caption (or from `prompt` for all, e.g. "" for
    the null prompt) at `guidance_scale`; batch i with seed `sampling.seed + i` and the pipeline's other sampling
    settings, overridden by `settings` (sampler, steps, eta, ...). NaN for no captions.

    A sample counts only when colour, shape and position all match its caption.
    """
    seed, hits = int(pipeline.sampling["seed"]), 0.0
    for i in range(0, len(captions), batch_size):
        targets = captions[i:i + batch_size]
        prompts = [prompt if prompt is not None else c for c in targets]
        images = pipeline.generate(prompts, guidance_scale=guidance_scale, seed=seed + i, **settings)
        hits += caption_alignment(images, targets) * len(targets)
    return hits / len(captions) if captions else float("nan")


def alignment_scores(pipeline, n: int, batch_size: int = 64, diagnostic_n: int | None = None) -> dict:
    """caption_alignment_cfg (the pipeline's guidance scale) on `n` held-out captions; _nocfg (guidance 1) and _null
    (empty prompt, chance level) on the first `diagnostic_n` of them (default: all `n`); all with the pipeline's
    sampling settings (`sampled_alignment`)."""
    guidance_scale = float(pipeline.sampling["guidance_scale"])
    captions = eval_captions(n)
    diagnostic_n = n if diagnostic_n is None else min(int(diagnostic_n), n)
    few = captions[:diagnostic_n]
    return {"caption_alignment_cfg": sampled_alignment(pipeline, captions, guidance_scale, batch_size=batch_size),
            "caption_alignment_nocfg": sampled_alignment(pipeline, few, 1.0, batch_size=batch_size),
            "caption_alignment_null": sampled_alignment(pipeline, few, 1.0, prompt="", batch_size=batch_size),
            "caption_alignment_guidance_scale": guidance_scale, "caption_alignment_samples": n,
            "caption_alignment_diagnostic_samples": diagnostic_n}
