"""Data benchmark: samples/s reading WebDataset shards, and stage-2 step time on cached latents vs on-the-fly encoding.

    python scripts/bench_data.py           # 64 and 256 px shard reading (2 workers); quickstart stage 2, batch 128
    python scripts/bench_data.py --quick    # tiny sizes, a few seconds: checks that the script works

Shards hold shapes images stored as JPEG (quality 95), so reading pays a real JPEG decode, the resize and the crop.
The stage-2 comparison uses the quickstart settings (KL f=4, 32 px, 0.68M-parameter autoencoder, 1.6M-parameter
U-Net, frozen MiniLM with its caption cache; Hydra overrides change them) with a randomly initialised, calibrated
autoencoder: training speed does not depend on the weights. A step = next batch from the loader + U-Net
forward/backward + AdamW, timed as a median; both paths read shards through the same loader code.
Importable: `shard_samples_per_second(...)` and `cached_vs_on_the_fly(...)` (scripts/bench.py may call them).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from ldm_train.data import build_datasets, make_loader
from ldm_train.data.shapes import ShapesDataset


def write_jpeg_shards(root: Path, n: int, resolution: int, shards: int = 4) -> str:
    """`n` shapes images (JPEG, captions, labels) in `shards` equal shards; returns their brace pattern."""
    root.mkdir(parents=True, exist_ok=True)
    ds = ShapesDataset(resolution, n, "train", 0)
    per = -(-n // shards)
    with wds.ShardWriter(str(root / "train-%06d.tar"), maxcount=per, verbose=0) as sink:
        for i in range(n):
            item = ds[i]
            arr = ((item["image"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG", quality=95)
            sink.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": item["caption"],
                        "cls": str(item["label"])})
    return str(root / f"train-{{000000..{shards - 1:06d}}}.tar")


def _data_cfg(urls: str, resolution: int, num_workers: int, shuffle_buffer: int = 256):
    from omegaconf import OmegaConf

    from ldm_train.config import CONF_DIR

    cfg = OmegaConf.load(CONF_DIR / "data" / "webdataset.yaml")
    cfg.merge_with({"urls": urls, "resolution": resolution, "num_workers": num_workers, "random_crop": True,
                    "shuffle_buffer": shuffle_buffer, "val_urls": urls, "val_size": 8})
    return cfg


def shard_samples_per_second(resolution: int, n: int = 512, num_workers: int = 2, batch_size: int = 32,
                             epochs: int = 2) -> dict:
    """Samples/s of `data=webdataset` (decode, resize, random crop, flip, collate) over `epochs` timed passes,
    after one untimed pass that starts the (persistent) workers."""
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_jpeg_shards(Path(tmp), n, resolution, shards=max(2, 2 * num_workers))
        train, _ = build_datasets(_data_cfg(urls, resolution, num_workers))
        loader = make_loader(train, batch_size, True, num_workers)
        seen = sum(len(b["image"]) for b in loader)  # warm-up pass
        start = time.perf_counter()
        for _ in range(epochs):
            seen = sum(len(b["image"]) for b in loader)
        seconds = time.perf_counter() - start
    return {"resolution": resolution, "num_workers": num_workers, "samples": seen * epochs,
            "samples_per_s": seen * epochs / seconds}


def _stage2_setup(tmp: Path, overrides: list[str]):
    """A calibrated random autoencoder artifact, image shards, and their latent cache (via stage=cache_latents)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from ldm_train.config import CONF_DIR, resolved_arch
    from ldm_train.models.autoencoder import Autoencoder
    from ldm_train.pipeline.artifacts import save_autoencoder
    from ldm_train.pipeline.calibration import calibrate

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=quickstart", "logger=none", f"paths.artifacts={tmp}",
                                           f"paths.run_dir={tmp}/run", "stage=cache_latents",
                                           f"cache.out={tmp / 'cache'}", *overrides])
    torch.manual_seed(0)
    arch = resolved_arch(cfg)
    model = Autoencoder(arch).eval()
    calib = ShapesDataset(cfg.data.resolution, 64, "val", 0)
    cal = calibrate(model, [{"image": torch.stack([calib[i]["image"] for i in range(64)])}], 64)
    ae = tmp / "ae"
    save_autoencoder(ae, model, arch, cal, {})
    with open_dict(cfg):
        cfg.autoencoder.path = str(ae)
    return cfg, ae


def cached_vs_on_the_fly(batch_size: int = 128, steps: int = 20, n: int = 1024, overrides: list[str] | None = None,
                         num_workers: int = 2) -> dict:
    """Median stage-2 step time (ms) reading images and encoding them vs reading the latent cache; and the ratio."""
    from omegaconf import OmegaConf, open_dict

    from ldm_train.__main__ import run
    from ldm_train.config import CONF_DIR
    from ldm_train.lit.diffusion import DiffusionModule, cfg_drop_mask
    from ldm_train.pipeline.first_stage import FirstStage
    from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline
    from ldm_train.stages.diffusion import pipeline_config

    overrides = list(overrides or [])
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cfg, ae = _stage2_setup(tmp, overrides)
        res = cfg.data.resolution
        urls = write_jpeg_shards(tmp / "images", n, res, shards=max(2, 2 * num_workers))
        cache_cfg = cfg.copy()
        with open_dict(cache_cfg):
            cache_cfg.data = _data_cfg(urls, res, 0, 0)
            cache_cfg.cache.shard_size = -(-n // 4)
        run(cache_cfg)
        d = OmegaConf.to_container(cfg.diffusion, resolve=True)
        first_stage = FirstStage.from_artifact(ae, sample_posterior=True)
        module = DiffusionModule(LatentDiffusionPipeline.build(first_stage, pipeline_config(cfg, first_stage)), d)
        opt = torch.optim.AdamW(module.trainable().parameters(), lr=1e-4)
        image_data = _data_cfg(urls, res, num_workers)
        latent_data = OmegaConf.merge(OmegaConf.load(CONF_DIR / "data" / "latents.yaml"),
                                      {"urls": sorted(str(p) for p in (tmp / "cache").glob("train-*.tar")),
                                       "num_workers": num_workers, "val_size": 8, "shuffle_buffer": 256,
                                       "val_urls": str(next((tmp / "cache").glob("val-*.tar")))})
        times = {}
        for name, data in (("on_the_fly", image_data), ("cached", latent_data)):
            train, _ = build_datasets(data)
            loader = make_loader(train, batch_size, True, num_workers, drop_last=True)
            step_ms, it = [], iter(loader)
            for step in range(steps + 2):  # the first two steps warm up workers and allocators
                start = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    it = iter(loader)
                    batch = next(it)
                z0 = DiffusionModule.batch_latents(first_stage, batch)
                loss = module.diffusion_loss(z0, module.condition(batch, cfg_drop_mask(len(z0), 0.1)))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if step >= 2:
                    step_ms.append(1000 * (time.perf_counter() - start))
            times[name] = statistics.median(step_ms)
            del it, loader
    return {"batch_size": batch_size, "resolution": res, "steps": steps, "on_the_fly_ms": times["on_the_fly"],
            "cached_ms": times["cached"], "speedup": times["on_the_fly"] / times["cached"], "goal": 1.4}


# Stage-2 cases (Hydra overrides on experiment=quickstart, batch): the quickstart itself, and a wider autoencoder
# at 64 px, where encoding is a larger share of the step (as with the paper's autoencoders).
STAGE2_CASES = {
    "quickstart_32px": ([], 128),
    "ae_ch64_64px": (["data.resolution=64", "autoencoder.ch=64", "autoencoder.num_res_blocks=2"], 32),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, figures mean little")
    ap.add_argument("--case", choices=list(STAGE2_CASES), action="append", help="stage-2 case(s); default: all")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for the stage-2 cases")
    args = ap.parse_args()
    if args.quick:
        reads = [shard_samples_per_second(64, n=64, batch_size=16, epochs=1),
                 shard_samples_per_second(256, n=16, batch_size=8, epochs=1)]
        stage2 = [cached_vs_on_the_fly(batch_size=8, steps=3, n=64, overrides=args.overrides)]
    else:
        reads = [shard_samples_per_second(64, n=1024), shard_samples_per_second(256, n=256)]
        stage2 = [cached_vs_on_the_fly(batch_size=b, steps=args.steps, n=max(512, 4 * b), overrides=o + args.overrides)
                  for o, b in (STAGE2_CASES[c] for c in (args.case or list(STAGE2_CASES)))]
    print(f"\n{'shard reading (2 workers)':<30}{'samples/s':>12}")
    for r in reads:
        print(f"{r['resolution']:>4} px{'':<23}{r['samples_per_s']:>12.1f}")
    for s2 in stage2:
        print(f"stage 2 at batch {s2['batch_size']}, {s2['resolution']} px: on-the-fly encoding "
              f"{s2['on_the_fly_ms']:.1f} ms/step, cached latents {s2['cached_ms']:.1f} ms/step → "
              f"{s2['speedup']:.2f}× (goal ≥ {s2['goal']}×)")
    if args.json:
        Path(args.json).write_text(json.dumps({"reads": reads, "stage2": stage2}, indent=2))


if __name__ == "__main__":
    main()
