"""Caption alignment on shapes: generate from dataset captions and read the attributes back from pixels."""

from __future__ import annotations

import torch

from ldm_train.data.shapes import ShapesDataset, caption_alignment


def eval_captions(n: int, seed: int = 1234) -> list[str]:
    """`n` captions drawn from the shapes distribution (a held-out split, deterministic)."""
    ds = ShapesDataset(resolution=8, size=n, split="test", seed=seed)
    return [ds[i]["caption"] for i in range(n)]


@torch.no_grad()
def alignment_scores(pipeline, n: int, batch_size: int = 64) -> dict:
    """caption_alignment_cfg (the pipeline's guidance scale), _nocfg (guidance 1) and _null (empty prompt, chance
    level), with the pipeline's sampling settings; batch i is sampled with seed `sampling.seed + i`.

    A sample counts only when colour, shape and position all match its caption.
    """
    guidance_scale, seed = float(pipeline.sampling["guidance_scale"]), int(pipeline.sampling["seed"])
    captions = eval_captions(n)
    settings = {"caption_alignment_cfg": (None, guidance_scale), "caption_alignment_nocfg": (None, 1.0),
                "caption_alignment_null": ("", 1.0)}
    out = {}
    for key, (prompt_override, scale) in settings.items():
        hits = 0.0
        for i in range(0, n, batch_size):
            targets = captions[i:i + batch_size]
            prompts = [prompt_override if prompt_override is not None else c for c in targets]
            images = pipeline.generate(prompts, guidance_scale=scale, seed=seed + i)
            hits += caption_alignment(images, targets) * len(targets)
        out[key] = hits / n
    out["caption_alignment_guidance_scale"] = guidance_scale
    out["caption_alignment_samples"] = n
    return out
