"""Aspect buckets on streams: `data=webdataset` (per-bucket buffers, a fixed number of batches per reader, leftovers
counted) and the latent cache (latents stored at their bucket's size, read back batched by bucket)."""

from __future__ import annotations

import io
import itertools
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image
from test_data_cache import random_artifact

from ldm_train.__main__ import run
from ldm_train.config import CONF_DIR, ConfigError, validate
from ldm_train.data import build_datasets, make_loader
from ldm_train.data.buckets import make_buckets, nearest_bucket, stream_batches, stream_bucket_batches
from ldm_train.data.images import COUNT_KEYS, COUNTS_KEY
from ldm_train.data.latents import CacheError, check_cache_buckets
from ldm_train.data.webdataset import BucketBatchError
from tests.conftest import compose_cfg, smoke_overrides

LEFTOVER = COUNT_KEYS.index("bucket_leftover")
# (h, w) source sizes; at resolution 16 with sides multiple of 4 they land in 12x24, 16x16, 24x12 and 12x20
SIZES = ((16, 32), (16, 16), (32, 16), (20, 28))


def min_whole_batches(samples: int, batch: int, buckets: int) -> int:
    """Brute force: the fewest whole batches any split of `samples` over `buckets` buckets gives."""
    return min(sum(n // batch for n in split) for split in itertools.product(range(samples + 1), repeat=buckets)
               if sum(split) == samples)


@pytest.mark.parametrize("samples,batch,buckets", [(0, 2, 1), (5, 2, 3), (7, 3, 2), (12, 4, 3), (9, 1, 4),
                                                   (11, 3, 3), (3, 4, 2)])
def test_stream_batches_is_the_worst_case_over_all_mixes(samples, batch, buckets):
    assert stream_batches(samples, batch, buckets) == min_whole_batches(samples, batch, buckets)


def test_per_bucket_buffers_release_whole_batches_of_one_bucket():
    items = [{"image": torch.zeros(3, *s), "n": i} for i, s in enumerate([(1, 2), (2, 1), (1, 2), (2, 1), (1, 2),
                                                                          (3, 3), (2, 1)])]
    out = list(stream_bucket_batches(items, 2))
    assert [[x["n"] for x in b] for b in out] == [[0, 2], [1, 3], [4], [6], [5]]  # then the partial ones, all once
    assert [[x["n"] for x in b] for b in stream_bucket_batches(items, 2, limit=1)] == [[0, 2]]
    assert list(stream_bucket_batches(items, 2, limit=0)) == []


def write_mixed_shards(root: Path, n_shards: int, per_shard: int) -> str:
    """Shards of random images cycling through SIZES (sample n has SIZES[n % 4]); keys `s<n>`."""
    root.mkdir(parents=True, exist_ok=True)
    rng, n = np.random.default_rng(0), 0
    for s in range(n_shards):
        with wds.TarWriter(str(root / f"shard-{s:06d}.tar")) as sink:
            for _ in range(per_shard):
                h, w = SIZES[n % len(SIZES)]
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
                sink.write({"__key__": f"s{n:05d}", "png": buf.getvalue(), "txt": f"sample {n}"})
                n += 1
    return str(root / f"shard-{{000000..{n_shards - 1:06d}}}.tar")


def stream_cfg(urls: str, **kw):
    cfg = OmegaConf.load(CONF_DIR / "data" / "webdataset.yaml")
    cfg.merge_with({"urls": urls, "resolution": 16, "flip": False, "shuffle_buffer": 8, "aspect_buckets": True,
                    "bucket_multiple": 4, **kw})
    return cfg


def rank_epochs(stream, monkeypatch, rank: int, world: int, workers: int, batch: int, epochs: int) -> list[list]:
    """Per epoch, the batches one rank's loader yields (the rank as webdataset's splitter reads it)."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    loader = make_loader(stream, batch, True, workers, drop_last=True)
    out = [list(loader) for _ in range(epochs)]
    assert all(len(e) == len(loader) for e in out)
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_buckets_over_two_ranks(tmp_path, monkeypatch, workers):
    urls = write_mixed_shards(tmp_path / "shards", 4, 24)  # 96 samples, 24 of each size
    train, val = build_datasets(stream_cfg(urls))
    buckets = make_buckets(16, 4)
    batch, world = 3, 2
    readers = world * max(1, workers)
    per_reader = 96 // readers
    n = stream_batches(per_reader, batch, len(buckets))  # 5 buckets: 24 samples → ⌈(24 − 10)/3⌉ = 5 batches
    ranks = [rank_epochs(train, monkeypatch, r, world, workers, batch, epochs=2) for r in range(world)]
    for epoch in range(2):
        got = [ranks[r][epoch] for r in range(world)]
        assert [len(b) for b in got] == [n * max(1, workers)] * world  # the same number of batches on every rank
        keys, leftover = [], 0
        for b in (b for rank in got for b in rank):
            assert len(b["key"]) == batch
            for key, sc, img in zip(b["key"], b["size_cond"], b["image"]):
                source = SIZES[int(key[1:]) % len(SIZES)]
                assert tuple(sc[:2].int().tolist()) == source  # size conditioning: the original size ...
                assert tuple(img.shape[1:]) == buckets[nearest_bucket(*source, buckets)]  # ... in its nearest bucket
                assert tuple(sc[4:].int().tolist()) == tuple(img.shape[1:])  # ... and the target size
            keys += b["key"]
            leftover += int(b[COUNTS_KEY][:, LEFTOVER].sum())
        assert len(keys) == len(set(keys))  # no sample twice in an epoch
        assert len(keys) + leftover == 96  # the rest of every reader's share is counted as left over
        assert leftover == readers * (per_reader - n * batch)
    assert [b["key"] for b in ranks[0][0]] != [b["key"] for b in ranks[0][1]]  # reshuffled per epoch
    # validation stays square, unbatched by bucket
    assert {tuple(x["image"].shape) for x in val} == {(3, 16, 16)}


def test_stream_buckets_refuse_too_few_samples(tmp_path, monkeypatch):
    urls = write_mixed_shards(tmp_path / "shards", 2, 6)
    train, _ = build_datasets(stream_cfg(urls))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(BucketBatchError, match="too few to be sure of one whole batch of 4 over 5 buckets"):
        make_loader(train, 4, True, 0)  # one reader of 12 samples < 5 x 3 + 1: refused when the loader is made
    assert len(make_loader(train, 3, True, 0)) == 1  # 12 ≥ 5 x 2 + 1: ⌈(12 − 10) / 3⌉ = 1 batch


def test_bucket_configs(tmp_path):
    shard = write_mixed_shards(tmp_path / "shards", 1, 2).replace("{000000..000000}", "000000")
    stream = ["experiment=smoke", "stage=diffusion", "data=webdataset", f"data.urls={shard}", "data.num_workers=0",
              "data.aspect_buckets=true"]
    # smoke: 16 px, sides multiples of 8 (f=4 × the tiny U-Net's 2): the generated set is the square alone
    with pytest.raises(ConfigError, match=re.escape("data.buckets=[[16,16],[16,24],[24,16]]")):
        validate(compose_cfg(stream))
    validate(compose_cfg([*stream, "data.buckets=[[16,16],[16,24],[24,16]]"]))
    with pytest.raises(ConfigError, match="12x24 .* not multiples of 8"):
        validate(compose_cfg([*stream, "data.buckets=[[16,16],[12,24]]"]))
    validate(compose_cfg([*stream, "stage=autoencoder", "data.buckets=[[16,16],[12,24]]"]))  # stage 1: f=4
    with pytest.raises(ConfigError, match="12x24 .* not multiples of 8"):  # the report shows stage 2's set
        validate(compose_cfg([*stream, "stage=inspect", "data.aspect_buckets=false", "data.buckets=[[16,16],[12,24]]"]))
    validate(compose_cfg(["experiment=smoke", "stage=cache_latents", "data=folder",
                          f"data.root={mixed_folder(tmp_path / 'imgs', 3)}", "data.min_val_images=1",
                          "data.aspect_buckets=true", "data.resolution=32"]))
    validate(compose_cfg(["experiment=smoke", "stage=diffusion", "data=webdataset", f"data.urls={shard}",
                          "data.num_workers=0", "diffusion.size_conditioning=true"]))
    with pytest.raises(ConfigError, match="read by bucket anyway"):
        validate(compose_cfg(["experiment=smoke", "stage=diffusion", "data=latents", "data.urls=x.tar",
                              "+data.aspect_buckets=true"]))
    with pytest.raises(CacheError, match="not multiples of 16"):
        check_cache_buckets({"buckets": [[24, 40], [32, 32]], "size_cond": True}, 16, False)
    with pytest.raises(CacheError, match="holds no image sizes"):
        check_cache_buckets({"buckets": None, "size_cond": False, "data": "shapes"}, 8, True)


def mixed_folder(root: Path, n: int) -> Path:
    """n random images cycling through 32x64, 32x32 and 64x32 (h x w): buckets 24x48, 32x32, 48x24 at 32²."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        h, w = ((32, 64), (32, 32), (64, 32))[i % 3]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"image {i}")
    return root


def test_latent_cache_at_bucket_sizes_trains_stage2(tmp_path):
    folder = mixed_folder(tmp_path / "imgs", 60)
    ae = random_artifact(tmp_path, "kl")
    out = tmp_path / "cache"
    data = ["data=folder", f"data.root={folder}", "data.resolution=32", "data.val_fraction=0.1",
            "data.min_val_images=1", "data.num_workers=0"]
    metrics = run(compose_cfg([*smoke_overrides(tmp_path), "stage=cache_latents", f"autoencoder.path={ae}",
                               f"cache.out={out}", "cache.batch_size=8", "cache.shard_size=100",
                               "data.aspect_buckets=true", *data]))
    assert metrics["train"]["samples"] == 54 and metrics["val"]["samples"] == 6  # every image cached once
    info = json.loads((out / "cache.json").read_text())
    assert info["buckets"] == [[48, 24], [40, 24], [32, 32], [24, 40], [24, 48]] and info["size_cond"]
    assert sum(info["bucket_histogram"].values()) == 54 and set(info["bucket_histogram"]) == {"24x48", "32x32",
                                                                                               "48x24"}
    # each latent at its bucket's size / f (f = 4), its size conditioning kept
    buckets, stored = make_buckets(32, 8), Counter()  # sides: f = 4 times the tiny U-Net's 2
    for sample in wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False).decode():
        h, w = sample["size.npy"][:2].astype(int).tolist()
        bh, bw = buckets[nearest_bucket(h, w, buckets)]
        assert sample["mean.npy"].shape[1:] == sample["std.npy"].shape[1:] == (bh // 4, bw // 4)
        assert sample["size.npy"][4:].astype(int).tolist() == [bh, bw]
        stored[(bh // 4, bw // 4)] += 1
    val = list(wds.WebDataset(str(out / "val-000000.tar"), shardshuffle=False).decode())
    assert all(s["mean.npy"].shape[1:] == (8, 8) for s in val)  # validation stays square
    held_out = Counter(tuple(s["size.npy"][:2].astype(int).tolist()) for s in val)
    # 20 images of each source size, less those held out for validation
    assert stored == {(6, 12): 20 - held_out[(32, 64)], (8, 8): 20 - held_out[(32, 32)],
                      (12, 6): 20 - held_out[(64, 32)]}
    assert info["bucket_histogram"] == {f"{h * 4}x{w * 4}": n for (h, w), n in stored.items()}
    # data=latents reads them back batched by bucket (the cache decides), every latent at most once per epoch
    cfg = compose_cfg(["experiment=smoke", "stage=diffusion", "data=latents", f"data.urls={out}/train-000000.tar",
                       f"data.val_urls={out}/val-000000.tar", "data.num_workers=0", "data.shuffle_buffer=4"]).data
    train, _ = build_datasets(cfg)
    batches = list(make_loader(train, 4, True, 0, drop_last=True))
    assert len(batches) == stream_batches(54, 4, 5) == 10  # ⌈(54 − 5 buckets × 3) / 4⌉
    captions = [c for b in batches for c in b["caption"]]
    assert len(captions) == len(set(captions)) == 40
    assert all(b["latent"].shape[0] == 4 for b in batches) and len({b["latent"].shape for b in batches}) == 3
    assert sum(int(b[COUNTS_KEY][:, LEFTOVER].sum()) for b in batches) == 54 - 40
    # stage 2 trains 2 steps on it, size-conditioned
    result = run(compose_cfg([*smoke_overrides(tmp_path / "s2"), "stage=diffusion", "data=latents",
                              f"data.urls={out}/train-000000.tar", f"data.val_urls={out}/val-000000.tar",
                              "data.num_workers=0", f"autoencoder.path={ae}", "diffusion.batch_size=4",
                              "diffusion.max_steps=2", "diffusion.val_every=2", "diffusion.size_conditioning=true",
                              "diffusion.latent_std_range=[0.0,1000.0]", "diffusion.eval_samples=0"]))
    assert result["steps"] == 2 and torch.isfinite(torch.tensor(result["val/loss"]))


def test_stage1_trains_on_bucketed_shards(tmp_path, monkeypatch):
    from ldm_train.lit.autoencoder import AutoencoderModule

    shapes, step = [], AutoencoderModule.training_step

    def recording_step(self, batch, batch_idx):
        shapes.append(tuple(batch["image"].shape))
        return step(self, batch, batch_idx)

    monkeypatch.setattr(AutoencoderModule, "training_step", recording_step)
    urls = write_mixed_shards(tmp_path / "shards", 2, 40)
    val = write_mixed_shards(tmp_path / "val", 1, 8).replace("{000000..000000}", "000000")
    result = run(compose_cfg([*smoke_overrides(tmp_path), "stage=autoencoder", "data=webdataset",
                              f"data.urls='{urls}'", f"data.val_urls={val}", "data.val_size=8",
                              "data.resolution=16", "data.aspect_buckets=true", "data.num_workers=0",
                              "data.shuffle_buffer=0", "data.shardshuffle=false", "autoencoder.batch_size=4",
                              "autoencoder.max_steps=2", "autoencoder.val_every=2", "autoencoder.val_batches=1",
                              "autoencoder.calibration.num_samples=8", "autoencoder.calibration.batch_size=8"]))
    assert result["steps"] == 2 and np.isfinite(result["recon_l1"])
    # unshuffled, samples cycle through SIZES: the first whole batches are 12x24 then 16x16 (stage 1: multiple 4)
    assert shapes == [(4, 3, 12, 24), (4, 3, 16, 16)]
