"""Caption alignment of shapes-trained diffusion artifacts under several sampler settings, on the same captions.

    python scripts/bench_samplers.py ARTIFACT [ARTIFACT ...] [--variants ddim:25:0,ddim:25:1,dpmpp_2m:25:0] \
        [--samples 256] [--guidance 3]

Each variant is `sampler:steps:eta` (eta matters for ddim only). Every variant samples the same held-out captions
with the same seeds through stage 2's own scoring (`ldm_train.evaluation.alignment.sampled_alignment`; batches of
--batch-size, batch i with the artifact's sampling seed + i), so a column compares samplers on one model; prints
one row per artifact and variant with the alignment and the seconds.
"""

from __future__ import annotations

import argparse
import time

from ldm_train.evaluation.alignment import eval_captions, sampled_alignment
from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline


def parse_variant(text: str) -> tuple[str, int, float]:
    sampler, steps, eta = text.split(":")
    return sampler, int(steps), float(eta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", help="diffusion artifact folders trained on shapes")
    parser.add_argument("--variants", default="ddim:25:0,ddim:25:1,ddpm:25:0,dpmpp_2m:25:0,ddim:50:0",
                        help="comma-separated sampler:steps:eta")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--guidance", type=float, default=3.0)
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variants.split(",")]
    captions = eval_captions(args.samples)
    print("| artifact | sampler | steps | eta | caption alignment | seconds |")
    print("|---|---|---|---|---|---|")
    for path in args.artifacts:
        pipe = LatentDiffusionPipeline.from_artifact(path)
        for sampler, steps, eta in variants:
            start = time.perf_counter()
            score = sampled_alignment(pipe, captions, args.guidance, batch_size=args.batch_size, sampler=sampler,
                                      steps=steps, eta=eta)
            print(f"| {path} | {sampler} | {steps} | {eta:g} | {score:.3f} | {time.perf_counter() - start:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
