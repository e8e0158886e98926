"""stage=cache_latents and data=latents: a cached batch equals on-the-fly encoding (fp16 tolerance), the scale
factor is applied once, a cache of another autoencoder is refused, and stage 2 trains on the cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ldm_train.__main__ import run
from ldm_train.config import ConfigError, resolved_arch
from ldm_train.data import build_datasets, make_loader
from ldm_train.data.health import SkipFractionError
from ldm_train.data.images import summarize
from ldm_train.data.latents import CacheError, InMemoryLatents, check_cache, read_info
from ldm_train.data.shapes import ShapesDataset
from ldm_train.lit.diffusion import DiffusionModule
from ldm_train.models.autoencoder import Autoencoder
from ldm_train.pipeline.artifacts import save_autoencoder
from ldm_train.pipeline.first_stage import FirstStage
from ldm_train.stages.diffusion import latents_in_memory
from tests.conftest import compose_cfg, smoke_overrides

SCALE = 2.5  # a made-up scale factor: what matters is that it is applied exactly once


def random_artifact(root: Path, regularizer: str, *extra: str) -> Path:
    """An untrained smoke-size autoencoder artifact with a known scale factor (no training needed)."""
    torch.manual_seed(0)
    arch = resolved_arch(compose_cfg([*smoke_overrides(root), f"regularizer={regularizer}", *extra]))
    path = root / f"{regularizer}_ae"
    save_autoencoder(path, Autoencoder(arch), arch, {"scale_factor": SCALE, "raw_std": 1 / SCALE}, {})
    return path


def cache(root: Path, ae: Path, regularizer: str, *extra: str) -> tuple[Path, dict]:
    out = root / "cache"
    metrics = run(compose_cfg([*smoke_overrides(root), "stage=cache_latents", f"regularizer={regularizer}",
                               f"autoencoder.path={ae}", f"cache.out={out}", "cache.shard_size=100",
                               "data.train_size=150", "data.val_size=20", *extra]))
    return out, metrics


def latents_cfg(out: Path, *extra: str):
    return compose_cfg(["experiment=smoke", "stage=diffusion", "data=latents",
                        f"data.urls='{out}/train-{{000000..000001}}.tar'", f"data.val_urls={out}/val-000000.tar",
                        "data.shardshuffle=false", "data.shuffle_buffer=0", "data.num_workers=0", "data.val_size=null",
                        *extra]).data


@pytest.mark.parametrize(("regularizer", "diffuse", "stores"),
                         [("kl", None, "mean+std"), ("vq", "pre_quant", "z"), ("vq", "quantized", "z_q")])
def test_cached_batch_equals_on_the_fly_encoding(tmp_path, regularizer, diffuse, stores):
    extra = (f"regularizer.diffuse={diffuse}",) if diffuse else ()
    ae = random_artifact(tmp_path, regularizer, *extra)
    out, metrics = cache(tmp_path, ae, regularizer, *extra)
    assert metrics["train"] == {"samples": 150} and metrics["val"] == {"samples": 20}
    info = json.loads((out / "cache.json").read_text())
    assert info["stores"] == stores and info["scaled"] is False
    assert info["shards"]["train"] == ["train-000000.tar", "train-000001.tar"]
    train, val = build_datasets(latents_cfg(out))
    batch = next(iter(make_loader(train, 32, False)))
    first_stage = FirstStage.from_artifact(ae)
    check_cache(read_info(latents_cfg(out)), first_stage)  # same autoencoder: accepted
    images = torch.stack([ShapesDataset(16, 150, "train", 0)[i]["image"] for i in range(32)])
    assert batch["caption"] == [ShapesDataset(16, 150, "train", 0)[i]["caption"] for i in range(32)]
    assert ("latent_std" in batch) == (regularizer == "kl")
    fresh = first_stage.encode(images, sample=False)  # (B, C, h, w), scaled once
    cached = DiffusionModule.batch_latents(first_stage, batch, sample=False)
    tol = 2e-3 * fresh.abs().max()  # float16 keeps ~3 significant digits
    assert cached.shape == fresh.shape and (cached - fresh).abs().max() <= tol
    ae_model = first_stage.autoencoder
    moments = ae_model.encode_moments(images)
    if regularizer == "kl":
        raw = moments[:, : ae_model.z_channels]  # the posterior mean
    else:  # the encoder output, or its nearest codes
        raw = moments if diffuse == "pre_quant" else ae_model.regularizer.quantize(moments)[0]
    assert torch.allclose(cached, raw * SCALE, atol=float(tol))  # the scale factor once, not zero or two times
    torch.manual_seed(1)
    fresh_sample = first_stage.encode(images, sample=True)
    torch.manual_seed(1)
    cached_sample = DiffusionModule.batch_latents(first_stage, batch, sample=True)
    assert (cached_sample - fresh_sample).abs().max() <= 2 * tol  # same noise: the same posterior sample
    if regularizer == "kl":
        assert (fresh_sample - fresh).abs().max() > 10 * tol  # ... and it is a sample, not the mean
    assert len(list(val)) == 20


def test_cache_of_another_autoencoder_is_refused(tmp_path):
    ae = random_artifact(tmp_path, "kl")
    out, _ = cache(tmp_path, ae, "kl")
    other = tmp_path / "other_ae"
    shutil.copytree(ae, other)
    weights = load_file(str(other / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01
    save_file(weights, str(other / "model.safetensors"))
    with pytest.raises(CacheError, match="stage=cache_latents f=4 regularizer=kl"):
        check_cache(read_info(latents_cfg(out)), FirstStage.from_artifact(other))
    cfg = compose_cfg(["experiment=smoke", "logger=none", "stage=diffusion", "data=latents", "data.num_workers=0",
                       f"data.urls={out}/train-000000.tar", f"autoencoder.path={other}",
                       f"paths.run_dir={tmp_path / 'run'}"])
    with pytest.raises(CacheError, match="content hash"):
        run(cfg)


def test_cache_refuses_bad_configs(tmp_path):
    ae = random_artifact(tmp_path, "kl")
    with pytest.raises(ConfigError, match="frozen text encoder"):
        cache(tmp_path, ae, "kl", "cache.text_embeddings=true")  # smoke's text encoder trains jointly
    with pytest.raises(ConfigError, match="only feeds stage=diffusion"):
        run(compose_cfg(["experiment=smoke", "stage=autoencoder", "data=latents", "data.urls=x.tar"]))
    assert not (tmp_path / "cache").exists()  # nothing half-written


def test_cached_text_embeddings_and_their_null_rows(tmp_path):
    ae = random_artifact(tmp_path, "kl")
    out, _ = cache(tmp_path, ae, "kl", "cache.text_embeddings=true", "text_encoder=minilm",
                   "data.train_size=8", "data.val_size=4", "cache.fp16=false")
    from ldm_train.models.text import MiniLMTextEncoder

    encoder = MiniLMTextEncoder(max_length=16)
    cfg = latents_cfg(out, "text_encoder=minilm", f"data.urls={out}/train-000000.tar")
    train, _ = build_datasets(cfg)
    batch = next(iter(make_loader(train, 8, False)))
    assert torch.allclose(batch["context"], encoder.encode(batch["caption"]), atol=1e-5)
    drop = torch.tensor([True, False] * 4)
    ctx = DiffusionModule.condition(SimpleNamespace(text_encoder=encoder), batch, drop)
    assert torch.allclose(ctx[0], encoder.null(1)[0], atol=1e-5) and torch.equal(ctx[1], batch["context"][1])
    with pytest.raises(CacheError, match="text encoder"):
        check_cache(read_info(cfg), FirstStage.from_artifact(ae), {"name": "clip_l"})


def test_stage2_trains_on_the_latent_cache(smoke_autoencoder, tmp_path):
    out, _ = cache(tmp_path, smoke_autoencoder["artifact"], "kl", "cache.fp16=true")
    artifacts = tmp_path / "artifacts2"
    metrics = run(compose_cfg(["experiment=smoke", "logger=none", "stage=diffusion", "data=latents",
                               f"data.urls='{out}/train-{{000000..000001}}.tar'", f"data.val_urls={out}/val-000000.tar",
                               "data.num_workers=0", "diffusion.max_steps=4", "diffusion.val_every=4",
                               f"autoencoder.path={smoke_autoencoder['artifact']}",
                               f"paths.artifacts={artifacts}", f"paths.run_dir={tmp_path / 'run'}"]))
    assert metrics["steps"] == 4 and torch.isfinite(torch.tensor(metrics["val/loss"]))
    config = OmegaConf.load(artifacts / "diffusion" / "kl_f4" / "config.yaml")
    assert config.data == "latents" and config.resolution == 16  # the resolution comes from cache.json


# ------------------------------------------------------------------------------- diffusion.latents_in_memory


@pytest.mark.parametrize(("regularizer", "diffuse"), [("kl", None), ("vq", "pre_quant")])
def test_in_memory_latents_equal_on_the_fly_encoding(tmp_path, regularizer, diffuse):
    """Every item once, in order, batch-size independent; the stored latent is the encoder's (the posterior mean for
    KL, with its std), the scale factor applied once on use, and the item's other fields kept."""
    extra = (f"regularizer.diffuse={diffuse}",) if diffuse else ()
    first_stage = FirstStage.from_artifact(random_artifact(tmp_path, regularizer, *extra))
    source = ShapesDataset(16, 10, "train", 0)
    cached, totals = InMemoryLatents.encode(source, first_stage, batch_size=4)  # batches of 4, 4, 2
    assert len(cached) == 10 and summarize(totals) == {"samples": 10}
    assert ("latent_std" in cached.columns) == (regularizer == "kl") and "image" not in cached.columns
    images = torch.stack([source[i]["image"] for i in range(10)])
    ae_model = first_stage.autoencoder
    with torch.no_grad():
        moments = ae_model.encode_moments(images)
    raw = moments[:, : ae_model.z_channels] if regularizer == "kl" else moments
    batch = next(iter(make_loader(cached, 10, False)))
    assert batch["caption"] == [source[i]["caption"] for i in range(10)]
    assert torch.equal(batch["label"], torch.tensor([source[i]["label"] for i in range(10)]))
    assert torch.allclose(batch["latent"], raw, atol=1e-5)
    mode = DiffusionModule.batch_latents(first_stage, batch, sample=False)
    assert torch.allclose(mode, raw * SCALE, atol=1e-4)  # the scale factor once
    assert torch.allclose(mode, first_stage.encode(images, sample=False), atol=1e-4)
    if regularizer == "kl":
        std = (0.5 * moments[:, ae_model.z_channels:].clamp(-30, 20)).exp()
        assert torch.allclose(batch["latent_std"], std, atol=1e-5)
        torch.manual_seed(1)
        sampled = DiffusionModule.batch_latents(first_stage, batch, sample=True)  # a posterior sample per use
        assert (sampled - mode).abs().max() > 1e-3


def test_in_memory_latents_count_and_refuse_unreadable_images(tmp_path):
    """data=folder: unreadable files are counted as training counts them, and too many stop the run."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"<html>not a png</html>")
    cfg = compose_cfg([*smoke_overrides(tmp_path), "stage=diffusion", "data=folder", f"data.root={folder}",
                       "data.resolution=16", "data.val_fraction=0", "diffusion.latents_in_memory=true"])
    first_stage = FirstStage.from_artifact(random_artifact(tmp_path, "kl"))
    train, _ = build_datasets(cfg.data)
    with pytest.raises(SkipFractionError, match="of the training set"):
        latents_in_memory(cfg, train, first_stage)  # 1 in 7 unreadable: above data.max_skip_fraction 0.05
    cfg.data.max_skip_fraction = 0.5
    cached = latents_in_memory(cfg, train, first_stage)
    assert len(cached) == len(train)


def test_in_memory_latents_keep_each_bucket_size(tmp_path):
    """A bucketed folder: each latent is the encoder's of that item alone, at its bucket's size / f; the buckets and
    each item's bucket are kept, so training batches come from one bucket, as on the images."""
    from PIL import Image

    from ldm_train.data.buckets import batches_per_rank, dataset_buckets

    folder = tmp_path / "images"
    folder.mkdir()
    for i, (h, w) in enumerate([(16, 32), (16, 16), (32, 16)] * 4 + [(16, 16)]):
        Image.new("RGB", (w, h), (20 * i, 200 - 10 * i, 90)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"image {i}")
    cfg = compose_cfg([*smoke_overrides(tmp_path), "stage=diffusion", "data=folder", f"data.root={folder}",
                       "data.resolution=16", "data.val_fraction=0", "data.min_val_images=0", "data.flip=false",
                       "data.aspect_buckets=true", "data.buckets=[[16,16],[8,24],[24,8]]"])
    first_stage = FirstStage.from_artifact(random_artifact(tmp_path, "kl"))
    train, _ = build_datasets(cfg.data)
    bucket_of, buckets = dataset_buckets(train)
    cached = latents_in_memory(cfg, train, first_stage)
    assert cached.buckets == buckets and cached.bucket_of == bucket_of and len(cached) == len(train) == 12
    assert sorted(set(bucket_of)) == [0, 1, 2]  # all three sizes used
    with torch.no_grad():
        for i in range(len(train)):
            item = train[i]
            h, w = buckets[bucket_of[i]]
            latent = cached[i]["latent"]
            assert latent.shape[-2:] == (h // 4, w // 4) and cached[i]["caption"] == item["caption"]
            assert torch.equal(cached[i]["size_cond"], item["size_cond"])  # what size conditioning reads
            raw, std = first_stage.raw_latents(item["image"][None])
            assert torch.allclose(latent, raw[0], atol=1e-5) and torch.allclose(cached[i]["latent_std"], std[0],
                                                                                  atol=1e-5)
    loader = make_loader(cached, 2, True, seed=0)
    shapes = [tuple(b["latent"].shape) for b in loader]
    assert len(shapes) == batches_per_rank(bucket_of, 2, 1) and all(s[0] == 2 for s in shapes)
    assert {s[2:] for s in shapes} == {(4, 4), (2, 6), (6, 2)}


def test_in_memory_latents_refuse_streams_and_caches(tmp_path):
    first_stage = FirstStage.from_artifact(random_artifact(tmp_path, "kl"))
    with pytest.raises(ConfigError, match="already a latent cache"):
        latents_in_memory(compose_cfg(["data=latents", "data.urls=x.tar"]), [], first_stage)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(())

    with pytest.raises(ConfigError, match="latents_in_memory=false.*stage=cache_latents"):
        latents_in_memory(compose_cfg(["data=webdataset", "data.urls=x.tar"]), Stream(), first_stage)


def test_stage2_trains_on_latents_in_memory(smoke_autoencoder, tmp_path):
    metrics = run(compose_cfg(["experiment=smoke", "logger=none", "stage=diffusion", "diffusion.max_steps=3",
                               "diffusion.val_every=3", "diffusion.latents_in_memory=true", "data.train_size=40",
                               f"autoencoder.path={smoke_autoencoder['artifact']}",
                               f"paths.artifacts={tmp_path / 'artifacts'}", f"paths.run_dir={tmp_path / 'run'}"]))
    assert metrics["steps"] == 3 and torch.isfinite(torch.tensor(metrics["val/loss"]))
