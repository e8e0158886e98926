"""The latent cache: shards of raw (unscaled) stage-1 latents, written once by `stage=cache_latents`.

Layout of a cache folder:
    cache.json          autoencoder path + content hash, f, regularizer, latent shape, dtype, sample counts,
                        and the text encoder config when its embeddings are cached
    train-000000.tar …  per sample: mean.npy + std.npy (KL posterior), z.npy (VQ, pre-quantisation) or zq.npy
                        (VQ, quantized), txt, cls, [ctx.npy], [size.npy: the size conditioning, when the source has it]
    val-000000.tar …
With aspect buckets (`data.aspect_buckets: true` when caching) each training latent has its bucket's size
(bucket / f) and cache.json lists the buckets; `data=latents` then batches by bucket as a stream does
(ldm_train.data.webdataset: per-bucket buffers, a fixed number of batches per reader). Validation stays square.
Raw latents only: FirstStage.from_cache applies the scale factor (and samples z ~ N(mean, std²) for KL), so the
factor is applied exactly once whether stage 2 reads images or this cache.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from ldm_train.data.images import Counts, SkipSample, decode_caption
from ldm_train.data.webdataset import ShardStream, expand_urls
from ldm_train.errors import UserError

INFO_FILE = "cache.json"
LATENT_KEYS = ("mean.npy", "z.npy", "zq.npy")  # the regularizer's `cache_key`: the latent's entry in a sample


class CacheError(UserError, RuntimeError):
    """A latent cache that does not belong to this run's autoencoder (or text encoder)."""


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> torch.Tensor:
    """.npy bytes → float32 tensor; no pickles."""
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))


class LatentSampleDecoder:
    """A cache sample → {"latent" (C, h, w), ["latent_std"], ["context"], "caption", "label"}."""

    def __call__(self, sample: dict, counts: Counts) -> dict:
        try:
            key = next((k for k in LATENT_KEYS if k in sample), LATENT_KEYS[0])
            item = {"latent": load_npy(sample[key])}
            if key == "mean.npy":  # a posterior: its std is stored with it
                item["latent_std"] = load_npy(sample["std.npy"])
            if "ctx.npy" in sample:
                item["context"] = load_npy(sample["ctx.npy"])
            if "size.npy" in sample:
                item["size_cond"] = load_npy(sample["size.npy"])
        except (KeyError, ValueError, OSError) as err:
            raise SkipSample("unreadable_shard", f"latent sample {sample.get('__key__')}: {err}") from err
        label = sample.get("cls")
        item.update(caption=decode_caption(sample.get("txt"), counts),
                    label=int(label) if label is not None and label.strip().isdigit() else 0)
        return item


def info_path(cfg) -> Path:
    """cache.json: `data.info`, or next to the first training shard."""
    if cfg.get("info"):
        return Path(cfg.info)
    first = expand_urls(cfg.urls)[0]
    if first.startswith("pipe:"):
        raise CacheError(f"data.urls={cfg.urls!r} is a pipe: set data.info=/path/to/{INFO_FILE}")
    return Path(first.removeprefix("file:")).parent / INFO_FILE


def read_info(cfg) -> dict:
    path = info_path(cfg)
    if not path.is_file():
        raise CacheError(f"no latent cache description at {path}: build the cache with `python -m ldm_train "
                         "stage=cache_latents f=<f> regularizer=<kl|vq> data=<source>` (or set data.info=)")
    return json.loads(path.read_text())


def check_cache(info: dict, first_stage, text_encoder_cfg: dict | None = None) -> None:
    """Refuse a cache written with another autoencoder (content hash) or, for cached embeddings, text encoder."""
    ours = first_stage.content_hash
    if info["autoencoder_hash"] != ours:
        raise CacheError(
            f"the latent cache was written with the autoencoder {info['autoencoder_path']} (content hash "
            f"{info['autoencoder_hash'][:12]}…), but this run uses {first_stage.path} ({ours[:12]}…). "
            f"Rebuild it: python -m ldm_train stage=cache_latents f={info['f']} regularizer={info['regularizer']}")
    if info.get("text_encoder") and text_encoder_cfg is not None and info["text_encoder"] != text_encoder_cfg:
        raise CacheError(f"the cache holds embeddings of text encoder {info['text_encoder']}, but this run uses "
                         f"{text_encoder_cfg}: rebuild the cache with this text_encoder, or without "
                         "cache.text_embeddings")


def check_cache_buckets(info: dict, multiple: int, size_conditioning: bool) -> None:
    """Refuse a bucketed cache whose sizes the denoiser cannot take (each side a multiple of `multiple` = f ×
    what the denoiser needs), and size conditioning on a cache written without the sizes."""
    bad = [f"{h}x{w}" for h, w in info.get("buckets") or () if h % multiple or w % multiple]
    if bad:
        raise CacheError(f"the latent cache holds buckets {bad} (h x w) whose sides are not multiples of {multiple}, "
                         "as this run's denoiser needs: rebuild the cache with this unet config (stage=cache_latents "
                         "data.aspect_buckets=true), or use the denoiser it was written for")
    if size_conditioning and not info.get("size_cond"):
        raise CacheError("diffusion.size_conditioning=true, but the latent cache holds no image sizes (written from "
                         f"data={info.get('data')}, or before they were cached): rebuild it from data=folder or "
                         "webdataset, or set diffusion.size_conditioning=false")


def latent_streams(cfg) -> tuple[ShardStream, ShardStream]:
    """(train, val) streams for `data=latents` (val: `data.val_urls`, else the training shards unshuffled); the
    training stream is batched by bucket when cache.json lists buckets."""
    decode = LatentSampleDecoder()
    n_buckets = len(read_info(cfg).get("buckets") or ())
    train = ShardStream(cfg.urls, decode, epoch_size=cfg.get("epoch_size"), shardshuffle=cfg.shardshuffle,
                        shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, n_buckets=n_buckets)
    val = ShardStream(cfg.val_urls or cfg.urls, decode, epoch_size=cfg.val_size, shardshuffle=False,
                      shuffle_buffer=0, seed=cfg.seed)
    return train, val


class InMemoryLatents(torch.utils.data.Dataset):
    """A map-style dataset encoded once into RAM (`diffusion.latents_in_memory`, kohya's `--cache_latents`): item i
    is {"latent", ["latent_std"], caption, label, ...}, the raw latents of the source's item i and its other fields.

    Stage 2 then neither decodes nor encodes an image per step; `FirstStage.from_cache` draws the posterior sample
    (KL) and applies the scale factor, as for the on-disk cache. What the source draws at random per access (a
    random crop, a flip) is drawn once and frozen. A bucketed source (`data.aspect_buckets`) is encoded a bucket at
    a time; each latent keeps its bucket's size (the latent columns are then lists of tensors), and `buckets` /
    `bucket_of` are the source's, so training batches by bucket as it would on the images.
    """

    def __init__(self, columns: dict[str, torch.Tensor | list], buckets: list | None = None,
                 bucket_of: list[int] | None = None):
        self.columns = columns
        self.size = len(columns["latent"])
        self.buckets, self.bucket_of = buckets, bucket_of

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        return {key: column[index] for key, column in self.columns.items()}

    @property
    def nbytes(self) -> int:
        tensors = [t for c in self.columns.values() for t in (c if isinstance(c, list) else [c])
                   if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    @classmethod
    @torch.no_grad()
    def encode(cls, dataset: torch.utils.data.Dataset, first_stage, batch_size: int,
               device: torch.device | str = "cpu") -> tuple[InMemoryLatents, torch.Tensor]:
        """Encode every item of `dataset` in order on `device` (the latents are kept on the CPU); returns the dataset
        and the summed count vector (samples, and bad inputs by reason, as training counts them:
        `data.images.summarize`)."""
        from torch.utils.data import DataLoader

        from ldm_train.data.buckets import dataset_buckets
        from ldm_train.data.images import COUNT_KEYS, COUNTS_KEY, NAMES_KEY

        n, bucketed = len(dataset), dataset_buckets(dataset)
        # batches of item indices: in order, or a bucket at a time (one size per batch); results go back by index
        groups = ([[i for i, b in enumerate(bucketed[0]) if b == k] for k in range(len(bucketed[1]))] if bucketed
                  else [list(range(n))])
        batches = [g[j:j + batch_size] for g in groups for j in range(0, len(g), batch_size)]
        columns: dict[str, list] = {}
        totals = torch.zeros(len(COUNT_KEYS), dtype=torch.long)
        for indices, batch in zip(batches, DataLoader(dataset, batch_sampler=batches)):
            if COUNTS_KEY in batch:
                totals += batch[COUNTS_KEY].sum(0)
            latent, std = first_stage.raw_latents(batch["image"].to(device))
            fields = {"latent": latent.cpu(), **({"latent_std": std.cpu()} if std is not None else {}),
                      **{k: v for k, v in batch.items() if k not in ("image", COUNTS_KEY, NAMES_KEY)}}
            for key, values in fields.items():
                column = columns.setdefault(key, [None] * n)
                for i, value in zip(indices, values):
                    column[i] = value
        if not columns:
            raise ValueError("diffusion.latents_in_memory: the training set is empty")
        for key, values in columns.items():  # one size (no buckets, or per-item vectors): one tensor per column
            if isinstance(values[0], torch.Tensor) and len({v.shape for v in values}) == 1:
                columns[key] = torch.stack(values)
        if not totals.any():  # a source without bad-input accounting (shapes): every item is a sample
            totals[COUNT_KEYS.index("samples")] = n
        bucket_of, buckets = bucketed or (None, None)
        return cls(columns, buckets, bucket_of), totals
