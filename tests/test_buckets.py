"""Aspect-ratio buckets: the bucket set, the assignment, the folder items and the per-rank batches.

The exact resume with buckets on is tests/test_resume.py::test_autoencoder_resume_is_exact[True].
"""

from __future__ import annotations

import io
import math
from collections import Counter

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm_train.config import ConfigError, validate
from ldm_train.data import build_datasets, config_buckets, make_loader
from ldm_train.data.buckets import (
    batches_per_rank,
    bucket_batches,
    dataset_buckets,
    kept_fraction,
    make_buckets,
    nearest_bucket,
)
from ldm_train.data.folder import ImageFolderDataset
from ldm_train.data.images import to_tensor
from ldm_train.data.resumable import BucketSampler, SeededItems


@pytest.mark.parametrize("res,m,rng", [(256, 64, (0.5, 2.0)), (512, 64, (0.33, 3.0)), (32, 8, (0.5, 2.0))])
def test_bucket_set(res, m, rng):
    buckets = make_buckets(res, m, rng)
    assert (res, res) in buckets and len(buckets) == len(set(buckets)) >= 3
    for h, w in buckets:
        assert h % m == 0 and w % m == 0
        assert rng[0] - 1e-9 <= w / h <= rng[1] + 1e-9
        assert abs(h * w / res**2 - 1) < 0.2  # about equal area
        assert (w, h) in buckets  # portrait and landscape alike
    aspects = [w / h for h, w in buckets]
    assert aspects == sorted(aspects)


def test_bucket_set_hand_and_errors():
    # 32², multiples of 8: w=40 → h=1024/40=25.6 → 24; w=48 → 21.3 → 24 (aspect 2); w=56 → 18.3 → 16 (3.5: out)
    assert make_buckets(32, 8) == [(48, 24), (40, 24), (32, 32), (24, 40), (24, 48)]
    with pytest.raises(ValueError, match="bucket_aspect_range"):
        make_buckets(32, 8, (1.5, 2.0))
    with pytest.raises(ValueError, match="not a multiple"):
        make_buckets(30, 8)


def test_nearest_bucket_keeps_most_of_the_image():
    buckets = make_buckets(32, 8)
    # a 300x500 (h x w) image, aspect 5/3: 24x40 keeps 1 (same aspect), 24x48 keeps (5/3)/2 = 0.833
    assert kept_fraction(300, 500, (24, 40)) == pytest.approx(1.0)
    assert kept_fraction(300, 500, (24, 48)) == pytest.approx(5 / 6)
    assert buckets[nearest_bucket(300, 500, buckets)] == (24, 40)
    assert buckets[nearest_bucket(500, 300, buckets)] == (40, 24)
    assert buckets[nearest_bucket(100, 1000, buckets)] == (24, 48)  # beyond the range: the widest
    assert buckets[nearest_bucket(50, 50, buckets)] == (32, 32)
    for h, w in [(10, 37), (64, 17), (33, 31)]:  # brute force over all buckets
        best = max(kept_fraction(h, w, b) for b in buckets)
        assert kept_fraction(h, w, buckets[nearest_bucket(h, w, buckets)]) == pytest.approx(best)


def test_to_tensor_covers_the_bucket_then_crops_the_center():
    arr = np.random.default_rng(0).integers(0, 256, (40, 100, 3), dtype=np.uint8)  # h=40, w=100
    img = Image.fromarray(arr)
    out = to_tensor(img, 32, size=(24, 48))
    # scale = max(24/40, 48/100) = 0.6 → 60x24 (w x h), center crop 48 wide from left 6
    ref = np.asarray(img.resize((60, 24), Image.Resampling.BICUBIC).crop((6, 0, 54, 24)), dtype=np.float32)
    assert out.shape == (3, 24, 48)
    torch.testing.assert_close(out, torch.from_numpy(ref).permute(2, 0, 1) / 127.5 - 1)
    # the square case is today's: shorter side to the resolution
    assert torch.equal(to_tensor(img, 32), to_tensor(img, 32, size=(32, 32)))


def _folder(root, sizes):
    root.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    return root


def test_folder_items_take_their_bucket_size(tmp_path):
    root = _folder(tmp_path / "imgs", [(40, 80), (80, 40), (50, 50), (40, 64)])
    # EXIF orientation 6 (rotate 90°): stored 80 wide x 40 high, shown 40 wide x 80 high
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (80, 40), (10, 20, 30)).save(buf, format="JPEG", exif=exif)
    (root / "rot.jpg").write_bytes(buf.getvalue())
    (root / "zbad.png").write_bytes(b"not an image")
    ds = ImageFolderDataset(root, 32, buckets=make_buckets(32, 8))
    shapes = [tuple(ds[i]["image"].shape[1:]) for i in range(len(ds))]
    assert shapes == [(24, 48), (48, 24), (32, 32), (24, 40), (48, 24), (32, 32)]
    assert ds[5]["data_counts"][2] == 1  # zbad: not_an_image, counted; served from the next file at its size


def _bucketed(tmp_path, n_per_bucket=(9, 7, 5)):
    sizes = [(40, 80)] * n_per_bucket[0] + [(50, 50)] * n_per_bucket[1] + [(80, 40)] * n_per_bucket[2]
    root = _folder(tmp_path / "imgs", sizes)
    return ImageFolderDataset(root, 32, buckets=make_buckets(32, 8))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_bucket_sampler_deals_equal_whole_batches_once(tmp_path, world):
    ds, batch = _bucketed(tmp_path), 2
    bucket_of = ds.bucket_of
    n = batches_per_rank(bucket_of, batch, world)
    assert n == (4 + 3 + 2) // world  # ⌊9/2⌋ + ⌊7/2⌋ + ⌊5/2⌋ batches, dealt to `world` ranks
    seen = []
    for rank in range(world):
        s = BucketSampler(SeededItems(ds), bucket_of, batch, seed=3)
        s.num_replicas, s.rank = world, rank  # as _follow_world sets them under DDP
        keys = [i for i, _ in s]
        assert len(keys) == n * batch == len(s)  # every rank the same number of batches: no hang
        for k in range(0, len(keys), batch):
            assert len({bucket_of[i] for i in keys[k:k + batch]}) == 1  # each batch from one bucket
        seen += keys
    assert len(seen) == len(set(seen))  # no image twice in an epoch
    one = bucket_batches(bucket_of, batch, 3, 0)
    assert one != bucket_batches(bucket_of, batch, 3, 1)  # a new order every epoch
    assert sorted(i for b in one for i in b) == sorted(set(i for b in one for i in b))


def test_bucket_sampler_resumes_mid_epoch(tmp_path):
    ds = _bucketed(tmp_path)
    whole = list(BucketSampler(SeededItems(ds), ds.bucket_of, 2, seed=3))
    s = BucketSampler(SeededItems(ds), ds.bucket_of, 2, seed=3)
    s.skip = 6  # three batches done
    assert list(s) == whole[6:]  # the same items with the same per-item seeds


def test_loader_batches_and_histogram(tmp_path, caplog):
    ds = _bucketed(tmp_path)
    cfg = OmegaConf.create({"name": "folder", "root": str(ds.root), "resolution": 32, "random_crop": True,
                            "flip": True, "seed": 0, "val_fraction": 0.2, "aspect_buckets": True,
                            "bucket_aspect_range": [0.5, 2.0], "bucket_multiple": 8,
                            "bucket_report": str(tmp_path / "buckets.json")})
    with caplog.at_level("INFO"):
        train, val = build_datasets(cfg)
    bucket_of, sizes = dataset_buckets(train)
    assert len(bucket_of) == len(train) == 17
    assert "aspect buckets" in caplog.text
    hist = OmegaConf.to_container(OmegaConf.load(tmp_path / "buckets.json"))
    assert hist == {f"{h}x{w}": c for (h, w), c in zip(sizes, [Counter(bucket_of)[i] for i in range(len(sizes))])}
    loader = make_loader(train, 3, True, seed=0)
    got = [tuple(b["image"].shape) for b in loader]
    assert len(got) == len(loader) == batches_per_rank(bucket_of, 3, 1)
    assert all(s[0] == 3 for s in got) and len({s[2:] for s in got}) == 3
    assert {tuple(x["image"].shape[1:]) for x in val} == {(32, 32)}  # validation stays square
    with pytest.raises(ValueError, match="no aspect bucket holds a whole batch of 10"):
        make_loader(train, 10, True, seed=0)  # at most 9 images per bucket


def test_bucket_config_checks(compose_cfg):
    # webdataset and the latent cache: tests/test_buckets_stream.py
    with pytest.raises(ConfigError, match="applies to images"):
        validate(compose_cfg(["experiment=smoke", "+data.aspect_buckets=true"]))  # data=shapes: square renders


def test_log_aspect_is_symmetric():
    b = make_buckets(64, 8, (0.25, 4.0))
    assert sorted(round(math.log(w / h), 6) for h, w in b) == sorted(round(-math.log(w / h), 6) for h, w in b)


def test_listed_buckets_replace_the_generated_set(tmp_path):
    ds = _bucketed(tmp_path)
    cfg = OmegaConf.create({"name": "folder", "root": str(ds.root), "resolution": 32, "random_crop": False,
                            "flip": False, "seed": 0, "val_fraction": 0.2, "aspect_buckets": True,
                            "bucket_aspect_range": [0.5, 2.0], "bucket_multiple": 16,
                            "buckets": [[48, 32], [32, 32], [32, 48]]})
    assert config_buckets(cfg) == [(48, 32), (32, 32), (32, 48)]  # sorted by aspect w/h, as generated ones
    assert make_buckets(32, 16) == [(32, 32)]  # what the list stands in for at multiple 16
    train, _ = build_datasets(cfg)
    _, sizes = dataset_buckets(train)
    assert sizes == [(48, 32), (32, 32), (32, 48)]
    assert {tuple(train[i]["image"].shape[1:]) for i in range(len(train))} == {(48, 32), (32, 32), (32, 48)}
    with pytest.raises(ValueError, match="24x40 .* not multiples of 16"):
        config_buckets(OmegaConf.merge(cfg, {"buckets": [[32, 32], [24, 40]]}))


def test_autoencoder_can_train_on_square_crops_while_stage2_buckets(tmp_path, compose_cfg, monkeypatch):
    """`data.autoencoder_buckets=false`: stage 1 builds square crops, stage 2 (the data section as given) buckets."""
    import ldm_train.stages.autoencoder as stage1
    from ldm_train.data import autoencoder_data

    ds = _bucketed(tmp_path)
    cfg = compose_cfg(["experiment=smoke", "stage=autoencoder", "data=folder", f"data.root={ds.root}",
                       "data.resolution=32", "data.val_fraction=0.2", "data.min_val_images=1",
                       "data.aspect_buckets=true", "data.autoencoder_buckets=false", "+data.bucket_multiple=8"])
    train, _ = build_datasets(cfg.data)
    assert len(set(dataset_buckets(train)[0])) == 3  # stage 2 sees the images in three buckets
    square, _ = build_datasets(autoencoder_data(cfg.data))
    assert dataset_buckets(square) is None and {tuple(x["image"].shape[1:]) for x in square} == {(32, 32)}
    cfg.data.autoencoder_buckets = True
    assert autoencoder_data(cfg.data) is cfg.data

    seen = []

    def stop(data_cfg, *args, **kwargs):  # the stage's data section, then stop before any training
        seen.append(data_cfg)
        raise KeyboardInterrupt

    monkeypatch.setattr(stage1, "build_datasets", stop)
    for flag in (False, True):
        cfg.data.autoencoder_buckets = flag
        with pytest.raises(KeyboardInterrupt):
            stage1.run(cfg)
    assert [bool(d.aspect_buckets) for d in seen] == [False, True]
