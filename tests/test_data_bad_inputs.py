"""Bad inputs in image folders and in shards: each case is converted or skipped and counted by its reason;
above data.max_skip_fraction the run stops with a clear error."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ldm_train.data.folder import ImageFolderDataset
from ldm_train.data.health import DataHealth, SkipFractionError, check_skip_fraction
from ldm_train.data.images import COUNT_KEYS, COUNTS_KEY, NAMES_KEY, CaptionLimit, summarize
from ldm_train.data.webdataset import ImageSampleDecoder, ShardStream
from ldm_train.models.text import ByteTokenizer

RES = 16
LIMIT = CaptionLimit(ByteTokenizer(24), 24)  # 22 caption bytes + BOS + EOS


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def good_png() -> bytes:
    return encode(Image.fromarray(np.full((24, 24, 3), 90, np.uint8)), "PNG")


def bomb_png() -> bytes:
    """A valid 1×1 PNG whose header claims 100000×100000 pixels (tiny file, 10 G pixels once decoded)."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = bytearray(data[16:29])  # width, height, depth, colour type, …
    ihdr[0:8] = struct.pack(">II", 100_000, 100_000)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]  # headers intact, half of the scan data gone


def rgba_png() -> bytes:
    rgba = np.zeros((24, 24, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent everywhere
    return encode(Image.fromarray(rgba, "RGBA"), "PNG")


# name: (extension, image bytes, caption bytes or None, reason, kept, check of the kept image)
CASES = {
    "truncated_jpeg": ("jpg", lambda: truncated(encode(Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")), b"c",
        "truncated_image", False, None),
    "zero_byte": ("png", lambda: b"", b"c", "empty_file", False, None),
    "not_an_image": ("jpg", lambda: b"<html>this is not a jpeg</html>", b"c", "not_an_image", False, None),
    "png_alpha": ("png", rgba_png, b"c", "alpha", True, lambda x: x.min() > 0.99),  # over white
    "png_16bit": ("png", lambda: encode(Image.fromarray(np.full((24, 24), 65535, np.uint16)), "PNG"), b"c",
                  "high_bit_depth", True, lambda x: x.min() > 0.99),  # rescaled, not clipped
    "grayscale": ("png", lambda: encode(Image.fromarray(np.full((24, 24), 128, np.uint8), "L"), "PNG"), b"c",
                  "grayscale", True, lambda x: torch.allclose(x, torch.full_like(x, 128 / 127.5 - 1), atol=0.02)),
    "cmyk_jpeg": ("jpg", lambda: encode(Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "JPEG"), b"c",
                  "cmyk", True, lambda x: x[0].mean() > 0.8 and x[1:].mean() < -0.8),  # CMYK red → RGB red
    "smaller_than_crop": ("png", lambda: encode(Image.new("RGB", (6, 9), (0, 0, 255)), "PNG"), b"c",
                          "small_upscaled", True, lambda x: x.shape == (3, RES, RES) and x[2].min() > 0.99),
    "decompression_bomb": ("png", bomb_png, b"c", "too_many_pixels", False, None),
    "missing_caption": ("png", good_png, None, "missing_caption", True, None),
    "caption_not_utf8": ("png", good_png, b"caf\xe9 au lait", "caption_not_utf8", True, None),
    "caption_too_long": ("png", good_png, b"a caption of thirty-one bytes..", "caption_too_long", True, None),
}


def totals(items: list[dict]) -> dict[str, int]:
    return summarize(torch.stack([it[COUNTS_KEY] for it in items]).sum(0))


def expected(reason: str, delivered: int) -> dict[str, int]:
    return {"samples": delivered, reason: 1}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_in_a_folder(tmp_path, case):
    ext, make, caption, reason, kept, check = CASES[case]
    Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(tmp_path / "a_good.png")
    (tmp_path / "a_good.txt").write_text("good")
    (tmp_path / f"b_case.{ext}").write_bytes(make())
    if caption is not None:
        (tmp_path / "b_case.txt").write_bytes(caption)
    ds = ImageFolderDataset(tmp_path, RES, caption_limit=LIMIT)
    items = [ds[0], ds[1]]
    assert totals(items) == expected(reason, 2)  # counted once, by its reason, and nothing else
    if kept:
        assert items[1]["image"].shape == (3, RES, RES)
        assert check is None or check(items[1]["image"])
        if caption is not None and reason.startswith("caption"):
            assert items[1]["caption"] == caption.decode("utf-8", errors="replace")
    else:  # served from the next readable file instead: batch shapes never change
        assert torch.equal(items[1]["image"], items[0]["image"]) and items[1]["caption"] == "good"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_in_a_shard(tmp_path, case):
    ext, make, caption, reason, kept, check = CASES[case]
    case_sample = {"__key__": "b_case", ext: make()}
    if caption is not None:
        case_sample["txt"] = caption
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        sink.write({"__key__": "a_good", "png": good_png(), "txt": b"good"})
        sink.write(case_sample)
    stream = ShardStream(str(tmp_path / "s.tar"), ImageSampleDecoder(RES, caption_limit=LIMIT),
                         shardshuffle=False, shuffle_buffer=0)
    items = list(stream)  # the epoch is 2 samples: a skipped one is made up by reading the shard again
    assert len(items) == 2 and totals(items) == expected(reason, 2)
    keys = [it["key"] for it in items]
    if kept:
        assert keys == ["a_good", "b_case"]
        assert check is None or check(items[1]["image"])
    else:
        assert keys == ["a_good", "a_good"]


def test_shard_sample_without_image_and_corrupt_tar(tmp_path):
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        sink.write({"__key__": "a_good", "png": good_png(), "txt": b"good"})
        sink.write({"__key__": "b_text_only", "txt": b"caption without an image"})
    items = list(ShardStream(str(tmp_path / "s.tar"), ImageSampleDecoder(RES), shardshuffle=False,
                             shuffle_buffer=0))
    assert totals(items) == {"samples": 2, "no_image": 1}
    (tmp_path / "t.tar").write_bytes((tmp_path / "s.tar").read_bytes()[:700])  # cut inside the first member
    stream = ShardStream([str(tmp_path / "s.tar"), str(tmp_path / "t.tar")], ImageSampleDecoder(RES),
                         epoch_size=4, shardshuffle=False, shuffle_buffer=0)
    with pytest.warns(UserWarning, match="unreadable shard"):
        items = list(stream)
    assert len(items) == 4 and totals(items)["unreadable_shard"] >= 1


def test_all_files_unreadable_is_a_clear_error(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(ValueError, match=r"no readable image.*broken\.jpg"):
        ImageFolderDataset(tmp_path)[0]


def counts_vector(samples: int, **reasons: int) -> torch.Tensor:
    v = torch.zeros(len(COUNT_KEYS), dtype=torch.long)
    v[0] = samples
    for k, n in reasons.items():
        v[COUNT_KEYS.index(k)] = n
    return v


def test_skip_fraction_limit():
    check_skip_fraction(counts_vector(95, not_an_image=5), 0.05)  # 5 / 100 is at the limit: fine
    check_skip_fraction(counts_vector(50, alpha=50), 0.0)  # conversions never count as skips
    with pytest.raises(SkipFractionError, match=r"6\.0%.*not_an_image.*data.max_skip_fraction"):
        check_skip_fraction(counts_vector(94, not_an_image=4, empty_file=2), 0.05)


def test_data_health_logs_per_epoch_and_stops(caplog):
    logged = []
    trainer = SimpleNamespace(world_size=1, current_epoch=3, global_step=7,
                              strategy=SimpleNamespace(root_device=torch.device("cpu")),
                              logger=SimpleNamespace(log_metrics=lambda m, step: logged.append((m, step))))
    cb = DataHealth(max_skip_fraction=0.2, check_every=2, min_samples=4)
    cb.on_train_epoch_start(trainer, None)
    batch = {COUNTS_KEY: torch.stack([counts_vector(1), counts_vector(1, grayscale=1)])}
    cb.on_train_batch_end(trainer, None, None, batch, 0)
    with caplog.at_level("INFO"):
        cb.on_train_epoch_end(trainer, None)
    assert logged == [({"data/samples": 2.0, "data/grayscale": 1.0}, 7)]
    assert "epoch 3 data: 2 samples" in caplog.text
    cb.on_train_epoch_start(trainer, None)  # counts are per epoch
    bad = {COUNTS_KEY: torch.stack([counts_vector(1, truncated_image=1), counts_vector(1)])}
    cb.on_train_batch_end(trainer, None, None, bad, 0)
    with pytest.raises(SkipFractionError, match="epoch 3 so far"):  # checked mid-epoch after check_every batches
        cb.on_train_batch_end(trainer, None, None, bad, 1)


def test_training_stops_when_too_much_is_unreadable(tmp_path):
    """The stage wires DataHealth in: a folder with a third of its files broken stops stage 1 with the counts."""
    from ldm_train.__main__ import run
    from tests.conftest import compose_cfg, smoke_overrides

    root = tmp_path / "images"
    root.mkdir()
    for i in range(30):
        if i % 3:
            Image.fromarray(np.full((20, 20, 3), 8 * i, np.uint8)).save(root / f"img{i:02d}.png")
        else:
            (root / f"img{i:02d}.png").write_bytes(b"")
    cfg = compose_cfg([*smoke_overrides(tmp_path), "data=folder", f"data.root={root}", "data.resolution=16",
                       "data.num_workers=0", "data.min_val_images=1", "autoencoder.max_steps=8",
                       "autoencoder.val_every=8"])
    with pytest.raises(SkipFractionError, match=r"data.max_skip_fraction=0.05.*empty_file.*"
                                                 r"\(first: empty_file: .*/img\d\d\.png"):
        run(cfg)


def folder_with_bad_files(root: Path, n: int, bad: tuple[int, ...]) -> Path:
    root.mkdir()
    for i in range(n):
        if i in bad:
            (root / f"img{i:02d}.png").write_bytes(b"")
        else:
            Image.fromarray(np.full((20, 20, 3), 4 * i, np.uint8)).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"image {i}")
    return root


def test_a_bad_file_counts_once_when_the_replacement_scan_wraps_around(tmp_path):
    """2 bad files in 43, the last and the first: the last one's replacement scan wraps around over the first, which
    its own index counts too. One epoch reads 2 skips (4.4%, under the 5% limit), not 3 (6.5%, a stopped run)."""
    ds = ImageFolderDataset(folder_with_bad_files(tmp_path / "imgs", 43, bad=(0, 42)), RES)
    total = torch.stack([ds[i][COUNTS_KEY] for i in range(len(ds))]).sum(0)
    assert summarize(total) == {"samples": 43, "empty_file": 2}
    check_skip_fraction(total, 0.05)


def test_skipped_files_are_named(tmp_path, caplog):
    root = folder_with_bad_files(tmp_path / "imgs", 12, bad=(1, 2, 3, 4, 5, 6, 7))
    ds = ImageFolderDataset(root, RES)
    items = [ds[i] for i in range(len(ds))]
    assert items[1][NAMES_KEY] == f"empty_file\t{root / 'img01.png'}" and items[0][NAMES_KEY] == ""
    trainer = SimpleNamespace(world_size=1, current_epoch=0, global_step=1, logger=None,
                              strategy=SimpleNamespace(root_device=torch.device("cpu")))
    cb = DataHealth(max_skip_fraction=0.05)
    cb.on_train_epoch_start(trainer, None)
    batch = {COUNTS_KEY: torch.stack([it[COUNTS_KEY] for it in items]), NAMES_KEY: [it[NAMES_KEY] for it in items]}
    with caplog.at_level("WARNING"):
        cb.on_train_batch_end(trainer, None, None, batch, 0)
    named = [f"img{i:02d}.png" for i in range(1, 6)]  # the first NAMED_PER_REASON of the reason, not the others
    assert all(n in caplog.text for n in named) and "img06.png" not in caplog.text
    with pytest.raises(SkipFractionError, match=r"\(first: empty_file: .*img01.png, .*img05.png\)"):
        cb.on_train_epoch_end(trainer, None)


def test_make_shards_names_the_bad_files(tmp_path, capsys):
    from ldm_train.data.make_shards import main as make_shards

    root = folder_with_bad_files(tmp_path / "imgs", 4, bad=(2,))
    make_shards(["--folder", str(root), "--out", str(tmp_path / "shards")])
    assert f"skipped (empty_file): {root / 'img02.png'}" in capsys.readouterr().out
