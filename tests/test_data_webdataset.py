"""data=webdataset: rank and worker splitting (each sample once per epoch, equal batches per rank), URL forms,
caption sources, decoding and augmentation; make_shards."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image

from ldm_train.config import CONF_DIR
from ldm_train.data import build_datasets, make_loader
from ldm_train.data.webdataset import ImageSampleDecoder, ShardStream


def png_bytes(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_shards(root: Path, sizes: list[int], ext: str = "png", res: int = 8) -> str:
    """Shards of solid-colour images whose red channel encodes the sample number; returns a brace pattern."""
    root.mkdir(parents=True, exist_ok=True)
    n = 0
    for s, size in enumerate(sizes):
        with wds.TarWriter(str(root / f"shard-{s:06d}.tar")) as sink:
            for _ in range(size):
                arr = np.full((res, res, 3), n, np.uint8)
                sink.write({"__key__": f"s{n:05d}", ext: png_bytes(arr, "JPEG" if ext in ("jpg", "jpeg") else
                                                                  ext.upper()),
                            "txt": f"sample {n}", "json": json.dumps({"caption": f"json caption {n}"}),
                            "cls": str(n)})
                n += 1
    return str(root / f"shard-{{000000..{len(sizes) - 1:06d}}}.tar")


def data_cfg(urls: str, **kw) -> OmegaConf:
    cfg = OmegaConf.load(CONF_DIR / "data" / "webdataset.yaml")
    cfg.merge_with({"urls": urls, "resolution": 8, "flip": False, "shuffle_buffer": 4, **kw})
    return cfg


def epoch_keys(stream: ShardStream, monkeypatch, rank: int, world: int, workers: int, batch: int,
               epochs: int = 1) -> list[list[list[str]]]:
    """Per epoch, the key batches one rank sees (the rank as webdataset's splitter reads it: RANK/WORLD_SIZE)."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    loader = make_loader(stream, batch, True, workers, drop_last=True)
    return [[list(b["key"]) for b in loader] for _ in range(epochs)]


def test_each_sample_once_per_epoch_over_ranks_and_workers(tmp_path, monkeypatch):
    urls = write_shards(tmp_path, [5] * 8)  # 8 shards = 2 ranks × 2 workers × 2
    train, _ = build_datasets(data_cfg(urls, epoch_size=None))
    assert train.epoch_size == 40 and train.check_split(2, 2) is None
    per_rank = [epoch_keys(train, monkeypatch, r, 2, 2, batch=2, epochs=2) for r in (0, 1)]
    for epoch in range(2):
        batches = [per_rank[r][epoch] for r in (0, 1)]
        assert len(batches[0]) == len(batches[1]) == 10  # equal batches per rank: 2 workers × 10 samples / 2
        keys = [k for r in (0, 1) for b in batches[r] for k in b]
        assert sorted(keys) == [f"s{n:05d}" for n in range(40)]  # every sample exactly once
    assert per_rank[0][0] != per_rank[0][1]  # shards and samples reshuffled per epoch


def test_uneven_shards_warn_but_keep_equal_batches(tmp_path, monkeypatch):
    urls = write_shards(tmp_path, [5, 5, 2])
    train, _ = build_datasets(data_cfg(urls))
    msg = train.check_split(2, 1)
    assert msg is not None and "7..5" not in msg and "5..7" in msg and "each reads 6" in msg
    counts = []
    for rank in (0, 1):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batches = epoch_keys(train, monkeypatch, rank, 2, 0, batch=3)[0]
        counts.append(len(batches))
        assert any("each reads 6" in str(w.message) for w in caught) == (rank == 0)  # rank 0 reports it
    assert counts == [2, 2]  # 6 samples each → 2 batches of 3 on both ranks: no rank waits for the other


def test_too_few_shards_for_the_readers_is_an_error(tmp_path, monkeypatch):
    train, _ = build_datasets(data_cfg(write_shards(tmp_path, [4, 4, 4])))
    with pytest.raises(ValueError, match=r"3 shards for 2 rank\(s\) × 2 worker\(s\) = 4 readers"):
        epoch_keys(train, monkeypatch, 0, 2, 2, batch=2)


def test_url_forms_and_caption_sources(tmp_path):
    pattern = write_shards(tmp_path, [3, 3], ext="jpg")
    files = sorted(str(p) for p in tmp_path.glob("*.tar"))
    dec = ImageSampleDecoder(8)
    by_list = ShardStream(files, dec, shardshuffle=False, shuffle_buffer=0)
    by_brace = ShardStream(pattern, dec, shardshuffle=False, shuffle_buffer=0)
    assert by_list.urls == by_brace.urls == files and by_brace.epoch_size == 6
    # pipe: URLs pass through to webdataset's opener; their size cannot be counted, so it is declared
    pipe = [f"pipe:cat {f}" for f in files]
    with pytest.raises(ValueError, match="data.epoch_size"):
        ShardStream(pipe, dec)
    items = list(ShardStream(pipe, dec, epoch_size=6, shardshuffle=False, shuffle_buffer=0))
    assert [it["caption"] for it in items] == [f"sample {n}" for n in range(6)]
    assert [it["label"] for it in items] == list(range(6))
    red = [float(it["image"][0].mean()) for it in items]
    assert np.allclose(red, [n / 127.5 - 1 for n in range(6)], atol=0.05)  # JPEG decoded, values kept
    json_dec = ImageSampleDecoder(8, caption_key="json", json_field="caption")
    items = list(ShardStream(files, json_dec, shardshuffle=False, shuffle_buffer=0))
    assert [it["caption"] for it in items] == [f"json caption {n}" for n in range(6)]
    with pytest.raises(ValueError, match="caption_key"):
        ImageSampleDecoder(8, caption_key="caption")


@pytest.mark.parametrize("ext", ["jpg", "jpeg", "png", "webp"])
def test_image_keys(tmp_path, ext):
    write_shards(tmp_path, [2], ext=ext)
    items = list(ShardStream(str(tmp_path / "shard-000000.tar"), ImageSampleDecoder(8), shuffle_buffer=0))
    assert len(items) == 2 and all(it["image"].shape == (3, 8, 8) for it in items)


def test_resize_crop_and_flip(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white, right half black: a 2:1 image
    with wds.TarWriter(str(tmp_path / "a.tar")) as sink:
        sink.write({"__key__": "wide", "png": png_bytes(arr), "txt": "x"})
    url = str(tmp_path / "a.tar")
    center = next(iter(ShardStream(url, ImageSampleDecoder(10), shuffle_buffer=0)))["image"]
    assert center.shape == (3, 10, 10)  # shorter side 20 → 10, then the middle 10 of 20 columns
    assert center[:, :, 0].mean() > 0.9 and center[:, :, -1].mean() < -0.9
    torch.manual_seed(0)
    aug = ShardStream(url, ImageSampleDecoder(10, random_crop=True, flip=True), epoch_size=30, shuffle_buffer=0)
    views = [it["image"] for it in aug]
    first_cols = {round(float(v[0, :, 0].mean()), 2) for v in views}
    assert len(first_cols) > 2  # crop offsets and flips vary


def test_make_shards_folder_and_shapes(tmp_path, capsys):
    from ldm_train.data.make_shards import main

    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    for i in range(5):
        Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(src / "sub" / f"img.{i}.png")
        (src / "sub" / f"img.{i}.txt").write_text(f"photo {i}")
    (src / "broken.jpg").write_bytes(b"not a jpeg at all")
    Image.fromarray(np.full((12, 12, 3), 7, np.uint8)).save(src / "nocap.bmp")
    out = main(["--folder", str(src), "--out", str(tmp_path / "shards"), "--shard-size", "2"])
    assert out["written"] == {"train": 6}
    assert out["bad"] == {"not_an_image": 1, "missing_caption": 1}
    printed = capsys.readouterr().out
    assert "3 train shard(s)" in printed and "train-{000000..000002}.tar" in printed
    items = list(ShardStream(str(tmp_path / "shards" / "train-{000000..000002}.tar"), ImageSampleDecoder(12),
                             shardshuffle=False, shuffle_buffer=0))
    assert sorted(it["caption"] for it in items) == ["", *[f"photo {i}" for i in range(5)]]  # dotted names kept
    out = main(["--shapes", "6", "--val", "2", "--resolution", "16", "--out", str(tmp_path / "sh"),
                "--shard-size", "4"])
    assert out["written"] == {"train": 6, "val": 2}
    cfg = data_cfg(str(tmp_path / "sh" / "train-{000000..000001}.tar"), resolution=16, shuffle_buffer=0,
                   shardshuffle=False, val_urls=str(tmp_path / "sh" / "val-000000.tar"), val_size=2)
    train, val = build_datasets(cfg)
    from ldm_train.data.shapes import ShapesDataset

    ref = ShapesDataset(16, 6, "train", 0)
    got = list(train)
    for i, it in enumerate(got):
        assert it["caption"] == ref[i]["caption"] and it["label"] == ref[i]["label"]
        assert torch.allclose(it["image"], ref[i]["image"], atol=1 / 127.5 + 1e-6)  # PNG is lossless up to rounding
    assert len(list(val)) == 2


def test_stage1_trains_and_calibrates_on_shards(tmp_path):
    """experiment=smoke stage=autoencoder with data=webdataset: training, validation and calibration read shards."""
    from ldm_train.__main__ import run
    from ldm_train.data.make_shards import main as make_shards
    from tests.conftest import compose_cfg, smoke_overrides

    make_shards(["--shapes", "64", "--val", "16", "--resolution", "16", "--out", str(tmp_path / "sh"),
                 "--shard-size", "16"])
    metrics = run(compose_cfg([*smoke_overrides(tmp_path), "data=webdataset", "data.resolution=16",
                               f"data.urls='{tmp_path}/sh/train-{{000000..000003}}.tar'",
                               f"data.val_urls={tmp_path}/sh/val-000000.tar", "data.num_workers=0",
                               "autoencoder.max_steps=4", "autoencoder.val_every=2"]))
    assert metrics["steps"] == 4 and metrics["scale_factor"] > 0
    assert (tmp_path / "artifacts" / "autoencoder" / "kl_f4" / "calibration.json").is_file()


def _ddp_reader(rank: int, world: int, urls: str, init_file: str, out_dir: str) -> None:
    """One gloo rank (no RANK/WORLD_SIZE in the environment) reading an epoch with 2 spawn-started workers."""
    import os

    import torch.distributed as dist

    for key in ("RANK", "WORLD_SIZE"):
        os.environ.pop(key, None)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        stream = ShardStream(urls, ImageSampleDecoder(8), shuffle_buffer=4)
        loader = make_loader(stream, 2, True, num_workers=2)
        loader.multiprocessing_context = "spawn"  # workers that do not inherit the process group
        batches = [list(b["key"]) for b in loader]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(batches))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_with_spawned_workers_read_each_sample_once(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    urls = write_shards(tmp_path / "shards", [3] * 8)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    mp.spawn(_ddp_reader, args=(2, urls, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    batches = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(batches[0]) == len(batches[1]) == 6  # 2 workers × 6 samples / batch 2, on both ranks
    keys = [k for rank in batches for b in rank for k in b]
    assert sorted(keys) == [f"s{n:05d}" for n in range(24)]
