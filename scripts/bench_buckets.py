"""Aspect buckets against square center crops on shapes rendered at three aspect ratios; prints the figures.

    python scripts/bench_buckets.py --out /tmp/bench_buckets --experiment quickstart --images 20000

1. Renders shapes (`ldm_train.data.shapes`, square, 48 px) and stretches them to 32×32, 32×48 and 48×32 (h×w), a
   third each, into an image folder with captions: positions stay relative to the frame.
2. Trains the autoencoder and stage 2 on it twice (`stage=autoencoder`, then `stage=diffusion`): with
   `data.aspect_buckets=true` and the three sizes as the buckets (`data.buckets`), and with the default square
   center crop (which cuts the wide and tall images' left/
   right or top/bottom objects off).
3. For each of the three sizes, samples the eval captions at that size with guidance 3, stretches the samples back
   to a square and scores caption alignment (colour, shape and position all right); does the same for the
   autoencoder's reconstructions of held-out images at that size (the ceiling of stage 2). Also prints the stage-2
   training throughput (samples/s over the fit loop's wall clock) and writes a sample grid per size.

It trains four models: at `experiment=quickstart` with 20 000 images (as many as the quickstart trains on) that
took 30 min on 2 idle cores (figures: docs/data.md).
`--data webdataset` reads the same images from shards written from the folder (buckets per stream: per-bucket
buffers, a fixed number of batches per reader, leftovers counted; docs/data.md), validation from shards of a
second, smaller folder.
`--stage1 crops` trains the bucketed run's autoencoder on square center crops (it is convolutional: it encodes
any bucket size afterwards) and buckets stage 2 only. `--stage1-seeds 0 1 2` trains that autoencoder alone, once
per seed, and prints its reconstructions' alignment per size and the colours it merges (stage 1 at this budget
varies with the seed; docs/training.md). Hydra overrides go before it: `bench_buckets.py 'autoencoder.lr=2e-3' --out
DIR --stage1 crops --stage1-seeds 0 1 2`.
`--score-only` trains nothing and scores the artifacts an earlier run left under --out again, e.g. with other
sampler settings (`--sampling ddim:20:1`); it writes results_<sampling>.json beside the first results.json.
Smallest check that it runs (a few minutes): `--experiment smoke --images 400 --eval 8 autoencoder.max_steps=2
diffusion.max_steps=2 diffusion.val_every=2 autoencoder.val_every=2`.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_samplers import parse_variant  # scripts/ is on the path of a script run as `python scripts/...`
from PIL import Image

from ldm_train.__main__ import run
from ldm_train.config import CONF_DIR

SIZES = ((32, 32), (32, 48), (48, 32))  # (h, w)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def stretched_items(n: int, sizes=SIZES, split: str = "train", seed: int = 0):
    """(caption, PIL image) of n shapes images rendered square at 48 px, image i stretched to sizes[i % len(sizes)]
    (h, w)."""
    from ldm_train.data.shapes import ShapesDataset

    ds = ShapesDataset(resolution=48, size=n, split=split, seed=seed)
    for i in range(n):
        item = ds[i]
        h, w = sizes[i % len(sizes)]
        arr = ((item["image"].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        yield item["caption"], Image.fromarray(arr).resize((w, h), Image.Resampling.BICUBIC)


def make_folder(root: Path, n: int, seed: int = 0) -> None:
    """n shapes images, stretched in turn to each of SIZES, with .txt captions."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (caption, image) in enumerate(stretched_items(n, seed=seed)):
        image.save(root / f"{i:05d}.png")
        (root / f"{i:05d}.txt").write_text(caption)


def make_shards(folder: Path, out: Path, shards: int) -> str:
    """`folder` written as `shards` shards (make_shards); returns their brace pattern."""
    from ldm_train.data.make_shards import main as write_shards

    n = len(list(folder.glob("*.png")))
    write_shards(["--folder", str(folder), "--out", str(out), "--shard-size", str(-(-n // shards))])
    return f"{out.resolve()}/train-{{000000..{len(list(out.glob('train-*.tar'))) - 1:06d}}}.tar"


def data_overrides(args: argparse.Namespace) -> list[str]:
    """The `data` overrides of both runs: the folder, or shards written from it (training and validation)."""
    if args.data == "folder":
        return ["data=folder", f"data.root={args.out / 'data'}"]
    n_val = max(8, args.images // 10)
    make_folder(args.out / "val_data", n_val, seed=1)
    urls = make_shards(args.out / "data", args.out / "shards", 4)
    val_urls = make_shards(args.out / "val_data", args.out / "val_shards", 1)
    return ["data=webdataset", f"data.urls='{urls}'", f"data.val_urls='{val_urls}'", f"data.val_size={n_val}",
            "data.num_workers=0"]


def common_overrides(out: Path, data: list[str], experiment: str, buckets: bool, stage1_buckets: bool,
                     extra: list[str]) -> list[str]:
    """Both stages' overrides of one run: buckets (the three sizes) or the square center crop; `stage1_buckets`
    false trains the autoencoder on square center crops (`data.autoencoder_buckets=false`) even when stage 2
    buckets: it is convolutional and encodes any bucket size afterwards."""
    return [f"experiment={experiment}", *data, "data.resolution=32", f"data.aspect_buckets={buckets}",
            f"data.autoencoder_buckets={stage1_buckets}", "data.flip=false", "diffusion.eval_samples=0", "logger=none",
            # the three sizes as the buckets: at 32 px with sides multiples of 16 (f=4 × the U-Net's 4) the
            # generated set would be 32×32 alone
            "data.buckets=[" + ",".join(f"[{h},{w}]" for h, w in SIZES) + "]",
            "diffusion.latents_in_memory=true",  # as the quickstart: the training set encoded once, at its buckets
            f"paths.artifacts={out / 'artifacts'}", *extra]


def train(out: Path, data: list[str], experiment: str, buckets: bool, extra: list[str],
          stage1_buckets: bool | None = None) -> tuple[Path, float]:
    """Both stages; returns (diffusion artifact, stage-2 training samples per second). `stage1_buckets` defaults
    to `buckets`."""
    common = common_overrides(out, data, experiment, buckets, buckets if stage1_buckets is None else stage1_buckets,
                              extra)
    run(compose([*common, "stage=autoencoder", f"paths.run_dir={out / 'run_ae'}"]))
    cfg = compose([*common, "stage=diffusion", f"paths.run_dir={out / 'run_diffusion'}"])
    metrics = run(cfg)  # train_seconds: the fit loop's wall clock
    return (out / "artifacts" / "diffusion" / cfg.name,
            metrics["steps"] * cfg.diffusion.batch_size / metrics["train_seconds"])


def held_out(n: int, size: tuple[int, int]) -> tuple[list[str], torch.Tensor]:
    """n held-out (test split) images stretched to `size` (h, w): their captions and (n, 3, h, w) in [-1, 1]."""
    items = list(stretched_items(n, [size], split="test"))
    images = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1 for _, im in items])
    return [c for c, _ in items], images


def square(x: torch.Tensor) -> torch.Tensor:
    """Images of any bucket size stretched back to 48², where the shapes were rendered, before they are read."""
    return F.interpolate(x, size=(48, 48), mode="bicubic", align_corners=False).clamp(-1, 1)


@torch.no_grad()
def reconstruction_scores(first_stage, n: int) -> tuple[dict[str, float], Counter]:
    """Per size: caption alignment of the autoencoder's reconstructions of n held-out images (stage 2's ceiling);
    and over all sizes, how often a caption's colour was read as another ((true, read) → count)."""
    from ldm_train.data.shapes import caption_alignment, parse_caption, read_attributes

    alignment, confusions = {}, Counter()
    for h, w in SIZES:
        captions, real = held_out(n, (h, w))
        recon = square(torch.cat([first_stage.decode(first_stage.encode(real[i:i + 64], sample=False))
                                  for i in range(0, n, 64)]))
        alignment[f"{h}x{w}"] = caption_alignment(recon, captions)
        for caption, image in zip(captions, recon):
            true, read = parse_caption(caption)[0], read_attributes(image)[0]
            confusions[(true, read)] += true != read
    return alignment, +confusions


@torch.no_grad()
def score(artifact: Path, n: int, out: Path, sampling: dict | None = None) -> dict[str, dict[str, float]]:
    """Per size: caption alignment at guidance 3 of generated samples, and of the autoencoder's reconstructions of
    n held-out images (stage 2's ceiling); both stretched back to 48² before reading the attributes.
    `sampling` (sampler, steps, eta) overrides the artifact's own sampling settings."""
    from ldm_train.data.shapes import caption_alignment
    from ldm_train.evaluation.alignment import eval_captions
    from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline
    from ldm_train.utils.images import save_grid

    pipe = LatentDiffusionPipeline.from_artifact(artifact)
    captions = eval_captions(n)
    result: dict[str, dict[str, float]] = {"alignment": {}}
    for h, w in SIZES:
        images = torch.cat([pipe.generate(captions[i:i + 64], guidance_scale=3.0, height=h, width=w, seed=i,
                                          **(sampling or {}))
                            for i in range(0, n, 64)])
        result["alignment"][f"{h}x{w}"] = caption_alignment(square(images), captions)
        save_grid(images[:16], out / f"samples_{h}x{w}.png", nrow=4)
    result["recon_alignment"] = reconstruction_scores(pipe.first_stage, n)[0]
    return result


def stage1_seeds(args: argparse.Namespace, data: list[str]) -> None:
    """Only the bucketed run's autoencoder, once per seed in args.seeds; prints its reconstructions' alignment per
    size and the colours it merges (held-out images, `--eval` per size)."""
    from ldm_train.pipeline.first_stage import FirstStage

    print(f"{'seed':5s} {'steps':6s} {'PSNR':8s} " + " ".join(f"{h}x{w:<8d}" for h, w in SIZES) + " colours read wrong")
    for seed in args.seeds:
        cfg = compose([*common_overrides(args.out / f"stage1_seed{seed}", data, args.experiment, True,
                                         args.stage1 == "buckets", args.overrides), "stage=autoencoder",
                       f"seed={seed}", f"paths.run_dir={args.out / f'stage1_seed{seed}' / 'run_ae'}"])
        metrics = run(cfg)
        fs = FirstStage.from_artifact(Path(cfg.paths.artifacts) / "autoencoder" / cfg.name)
        alignment, confusions = reconstruction_scores(fs, args.eval)
        print(f"{seed:<5d} {metrics['steps']:<6d} {metrics['recon_psnr']:<8.2f} "
              + " ".join(f"{alignment[f'{h}x{w}']:<11.3f}" for h, w in SIZES)
              + " " + ", ".join(f"{t}→{r} {k}" for (t, r), k in confusions.most_common(3)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--experiment", default="quickstart")
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--eval", type=int, default=128, help="samples per size")
    ap.add_argument("--data", choices=("folder", "webdataset"), default="folder",
                    help="read the images from the folder, or from shards written from it")
    ap.add_argument("--runs", nargs="+", choices=("buckets", "center_crop"), default=["buckets", "center_crop"],
                    help="which of the two trainings to run (e.g. one per process)")
    ap.add_argument("--stage1", choices=("buckets", "crops"), default="buckets",
                    help="the bucketed run's autoencoder: trained on the buckets, or on square center crops")
    ap.add_argument("--score-only", action="store_true",
                    help="train nothing: score the artifacts an earlier run left under --out (e.g. with --sampling)")
    ap.add_argument("--stage1-seeds", type=int, nargs="+", metavar="SEED", dest="seeds",
                    help="train only the bucketed run's autoencoder (as --stage1 says), once per seed, and print its "
                         "reconstructions' alignment per size and the colours it merges")
    ap.add_argument("--sampling", default=None, metavar="SAMPLER:STEPS:ETA",
                    help="score with these sampler settings instead of the artifact's own (e.g. ddim:20:1)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs (e.g. diffusion.max_steps=50)")
    args = ap.parse_args()
    torch.manual_seed(0)
    np.random.seed(0)
    sampling = dict(zip(("sampler", "steps", "eta"), parse_variant(args.sampling))) if args.sampling else None
    earlier = json.loads((args.out / "results.json").read_text()) if args.score_only else {}
    if not args.score_only:
        make_folder(args.out / "data", args.images)
    data = data_overrides(args)
    if args.seeds:
        return stage1_seeds(args, data)
    rows = {}
    for name, buckets in (("buckets", True), ("center_crop", False)):
        if name not in args.runs:
            continue
        if args.score_only:  # the artifact the same run's stage 2 wrote
            cfg = compose([*common_overrides(args.out / name, data, args.experiment, buckets, False, args.overrides),
                           "stage=diffusion"])
            artifact = args.out / name / "artifacts" / "diffusion" / cfg.name
            throughput = earlier[name]["samples_per_s"]
        else:
            artifact, throughput = train(args.out / name, data, args.experiment, buckets, args.overrides,
                                         stage1_buckets=buckets and args.stage1 == "buckets")
        rows[name] = {**score(artifact, args.eval, args.out / name, sampling), "samples_per_s": throughput,
                      "sampling": sampling or "the artifact's"}
    print(f"{'run':12s} " + " ".join(f"{h}x{w:<8d}" for h, w in SIZES) + " train samples/s   recon ceiling")
    for name, row in rows.items():
        print(f"{name:12s} " + " ".join(f"{row['alignment'][f'{h}x{w}']:<11.3f}" for h, w in SIZES)
              + f" {row['samples_per_s']:<17.1f} "
              + " / ".join(f"{row['recon_alignment'][f'{h}x{w}']:.3f}" for h, w in SIZES))
    name = "results.json" if not args.score_only else f"results_{(args.sampling or 'own').replace(':', '_')}.json"
    (args.out / name).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
