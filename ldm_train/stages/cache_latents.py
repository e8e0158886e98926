"""`stage=cache_latents`: encode a dataset once with the calibrated stage-1 artifact into latent shards.

Images are center-cropped and not flipped (augmentation would be frozen into the cache). The cache is written to
a temporary folder and renamed into place, with cache.json holding the autoencoder's content hash. With
`data.aspect_buckets: true` every training image is encoded at its bucket's size (items are grouped by bucket into
batches, the partial ones included: every sample is cached once) and cache.json lists the buckets.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch
import webdataset as wds
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import default_collate

from ldm_train.commands import suggest_command
from ldm_train.config import CONF_DIR, ConfigError, artifacts_root, autoencoder_dir
from ldm_train.data import build_datasets, config_buckets, make_loader
from ldm_train.data.buckets import stream_bucket_batches
from ldm_train.data.images import COUNT_KEYS, COUNTS_KEY, summarize
from ldm_train.data.latents import INFO_FILE, npy_bytes
from ldm_train.models.text import build_text_encoder
from ldm_train.pipeline.first_stage import FirstStage
from ldm_train.utils.io import atomic_write_dir, atomic_write_json

log = logging.getLogger(__name__)


def cache_dir(cfg: DictConfig) -> Path:
    out = cfg.cache.get("out")
    return Path(out).resolve() if out else artifacts_root(cfg) / "latents" / f"{cfg.name}_{cfg.data.name}"


def source_config(data: DictConfig) -> DictConfig:
    """The data config read once, in order, unaugmented: every sample exactly once."""
    data = data.copy()
    with open_dict(data):
        for key, value in (("random_crop", False), ("flip", False), ("shardshuffle", False), ("shuffle_buffer", 0)):
            if key in data:
                data[key] = value
    return data


def bucket_batches_once(dataset, batch_size: int, num_workers: int):
    """Every item of `dataset` once, in order, collated into batches of one size (one bucket) each: a batch is
    released when its bucket holds `batch_size` items, the partial ones at the end."""
    items = make_loader(dataset, None, False, num_workers)  # one item at a time
    for group in stream_bucket_batches(items, batch_size):
        yield default_collate(group)


@torch.no_grad()
def write_split(dataset, pattern: str, first_stage: FirstStage, text_encoder, cfg: DictConfig,
                device: torch.device) -> tuple[dict, Counter, bool]:
    """Encode one split into shards `pattern`; returns its counts (samples and bad inputs by reason), the
    number of samples per image size (h, w), and whether the samples carry their size conditioning."""
    c = cfg.cache
    dtype = "float16" if c.fp16 else "float32"
    latent_key = first_stage.regularizer.cache_key  # mean (+ std.npy), z or zq
    totals = torch.zeros(len(COUNT_KEYS), dtype=torch.long)
    sizes: Counter = Counter()
    index, has_size = 0, False
    with wds.ShardWriter(pattern, maxcount=c.shard_size, verbose=0) as sink:
        for batch in bucket_batches_once(dataset, c.batch_size, cfg.data.num_workers):
            latent, std = first_stage.raw_latents(batch["image"].to(device))  # (B, C, h, w) each
            sizes[tuple(batch["image"].shape[2:])] += len(latent)
            ctx = text_encoder.encode(list(batch["caption"])) if text_encoder is not None else None
            labels = batch.get("label", torch.zeros(len(latent), dtype=torch.long))
            for i in range(len(latent)):
                key = batch["key"][i] if "key" in batch else f"{index:09d}"
                sample = {"__key__": key, "txt": batch["caption"][i], "cls": str(int(labels[i]))}
                sample[f"{latent_key}.npy"] = npy_bytes(latent[i].cpu().numpy().astype(dtype))
                if std is not None:
                    sample["std.npy"] = npy_bytes(std[i].cpu().numpy().astype(dtype))
                if ctx is not None:
                    sample["ctx.npy"] = npy_bytes(ctx[i].cpu().numpy().astype(dtype))
                if "size_cond" in batch:  # pixel sizes: float32 keeps them exact
                    has_size = True
                    sample["size.npy"] = npy_bytes(batch["size_cond"][i].numpy().astype("float32"))
                sink.write(sample)
                index += 1
            if COUNTS_KEY in batch:
                totals += batch[COUNTS_KEY].sum(0)
            else:
                totals[0] += len(latent)
    return summarize(totals), sizes, has_size


def run(cfg: DictConfig) -> dict:
    if cfg.data.name == "latents":
        raise ConfigError("stage=cache_latents reads images: choose data=shapes, folder or webdataset")
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu")
    first_stage = FirstStage.from_artifact(autoencoder_dir(cfg), cfg.f, cfg.regularizer.name,
                                           cfg.diffusion.sample_posterior).to(device)
    first_stage.check_options(OmegaConf.to_container(cfg.regularizer, resolve=True))
    text_encoder, te_cfg = None, None
    if cfg.cache.text_embeddings:
        te_cfg = OmegaConf.to_container(cfg.text_encoder, resolve=True)
        text_encoder = build_text_encoder(te_cfg).to(device)
        if text_encoder.trainable:
            raise ConfigError(f"cache.text_embeddings=true needs a frozen text encoder; {cfg.text_encoder.name} "
                              "trains with the U-Net (use text_encoder=minilm or clip_l, or "
                              "cache.text_embeddings=false)")
    train_ds, val_ds = build_datasets(source_config(cfg.data))
    out = cache_dir(cfg)
    counts: dict[str, dict] = {}
    sizes: dict[str, Counter] = {}
    has_size: dict[str, bool] = {}
    buckets = config_buckets(cfg.data)

    def write(tmp: Path) -> None:
        for split, ds in (("train", train_ds), ("val", val_ds)):
            pattern = str(tmp / f"{split}-%06d.tar")
            counts[split], sizes[split], has_size[split] = write_split(ds, pattern, first_stage, text_encoder, cfg,
                                                                       device)
            log.info("cached %s: %s", split, counts[split])
        shards = {s: sorted(p.name for p in tmp.glob(f"{s}-*.tar")) for s in ("train", "val")}
        shape = list(first_stage.latent_shape(cfg.data.resolution))
        atomic_write_json(tmp / INFO_FILE, {
            "autoencoder_path": str(first_stage.path), "autoencoder_hash": first_stage.content_hash,
            "f": int(cfg.f), "regularizer": cfg.regularizer.name, "latent_shape": shape,
            "resolution": int(cfg.data.resolution), "dtype": "float16" if cfg.cache.fp16 else "float32",
            "stores": first_stage.regularizer.cache_stores, "scaled": False,
            "data": cfg.data.name, "counts": counts, "shards": shards, "text_encoder": te_cfg,
            "buckets": [list(b) for b in buckets] if buckets else None,
            "bucket_histogram": {f"{h}x{w}": n for (h, w), n in sorted(sizes["train"].items())},
            "size_cond": has_size["train"]})

    atomic_write_dir(out, write)
    n_train, n_val = (len(list(out.glob(f"{s}-*.tar"))) for s in ("train", "val"))
    urls = f"{out}/train-{{000000..{n_train - 1:06d}}}.tar"
    val_urls = f"{out}/val-{{000000..{n_val - 1:06d}}}.tar"
    # every loader worker needs a shard of its own (train and val loaders alike): a cache of fewer shards than the
    # default workers gets as many workers as its smaller split has shards
    workers = OmegaConf.load(CONF_DIR / "data" / "latents.yaml").num_workers
    fewer = [f"data.num_workers={min(n_train, n_val)}"] if min(n_train, n_val) < workers else []
    log.info("wrote latent cache %s; train stage 2 on it with:\n  %s", out,
             suggest_command("stage=diffusion", f"f={cfg.f}", f"regularizer={cfg.regularizer.name}", "data=latents",
                             f'data.urls="{urls}"', f'data.val_urls="{val_urls}"', *fewer))
    return {"out": str(out), "train": counts["train"], "val": counts["val"]}
