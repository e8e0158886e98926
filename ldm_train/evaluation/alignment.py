"""Caption alignment on shapes: generate from dataset captions and read the attributes back from pixels."""

from __future__ import annotations

import torch

from ldm_train.data.shapes import ShapesDataset, caption_alignment


def eval_captions(n: int, seed: int = 1234) -> list[str]:
    """`n` captions drawn from the shapes distribution (a held-out split, deterministic)."""
    ds = ShapesDataset(resolution=8, size=n, split="test", seed=seed)
    return [ds[i]["caption"] for i in range(n)]


@torch.no_grad()
def alignment_scores(pipeline, n: int, batch_size: int = 64, diagnostic_n: int | None = None) -> dict:
    """caption_alignment_cfg (the pipeline's guidance scale) on `n` samples; _nocfg (guidance 1) and _null (empty
    prompt, chance level) on the first `diagnostic_n` of the same captions (default: all `n`); all with the
    pipeline's sampling settings, batch i sampled with seed `sampling.seed + i`.

    A sample counts only when colour, shape and position all match its caption.
    """
    guidance_scale, seed = float(pipeline.sampling["guidance_scale"]), int(pipeline.sampling["seed"])
    captions = eval_captions(n)
    diagnostic_n = n if diagnostic_n is None else min(int(diagnostic_n), n)
    settings = {"caption_alignment_cfg": (None, guidance_scale, n),
                "caption_alignment_nocfg": (None, 1.0, diagnostic_n),
                "caption_alignment_null": ("", 1.0, diagnostic_n)}
    out = {}
    for key, (prompt_override, scale, count) in settings.items():
        hits = 0.0
        for i in range(0, count, batch_size):
            targets = captions[i:min(i + batch_size, count)]
            prompts = [prompt_override if prompt_override is not None else c for c in targets]
            images = pipeline.generate(prompts, guidance_scale=scale, seed=seed + i)
            hits += caption_alignment(images, targets) * len(targets)
        out[key] = hits / count if count else float("nan")
    out["caption_alignment_guidance_scale"] = guidance_scale
    out["caption_alignment_samples"] = n
    out["caption_alignment_diagnostic_samples"] = diagnostic_n
    return out
