"""stage=inspect: the data report on a generated folder (and shards) with corrupt files and duplicates."""

from __future__ import annotations

import io
import shutil
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from ldm_train.data.folder import ImageFolderDataset
from ldm_train.data.images import SkipSample

# 32² buckets with sides multiple of 8 (f=4, a 2-level U-Net): 48x24, 40x24, 32x32, 24x40, 24x48 (h x w)
BASE = ["experiment=smoke", "f=4", "unet.channel_mult=[1,2]", "data.resolution=32"]


def png(w: int, h: int, value: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def make_folder(root):
    """7 readable images (one a duplicate, one grey, one without caption) and 3 unreadable files."""
    (root / "sub").mkdir(parents=True)
    files = {"wide.png": png(80, 40, 10), "tall.png": png(30, 60, 20), "square.png": png(40, 40, 30),
             "small.png": png(16, 16, 40), "grey.png": png(64, 40, 50, "L"), "sub/nocap.png": png(50, 50, 60)}
    for name, data in files.items():
        (root / name).write_bytes(data)
        if name != "sub/nocap.png":
            (root / name).with_suffix(".txt").write_text(f"caption of {name}")
    shutil.copy(root / "wide.png", root / "sub" / "wide_copy.png")  # a duplicate by content, no caption
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_bytes(b"this is not an image")
    (root / "cut.png").write_bytes(png(40, 40, 70)[:60])  # truncated mid-stream


def test_inspect_folder_report(tmp_path, compose_cfg):
    from ldm_train.__main__ import run

    make_folder(tmp_path / "imgs")
    out = tmp_path / "run"
    m = run(compose_cfg([*BASE, "stage=inspect", "data=folder", f"data.root={tmp_path / 'imgs'}",
                         f"paths.run_dir={out}"]))
    assert m["inputs"] == 10 and m["readable"] == 7
    assert m["unreadable"] == {"empty_file": 1, "not_an_image": 1, "truncated_image": 1}
    # the same skip reasons and counts as the training reader, file by file
    ds, training = ImageFolderDataset(tmp_path / "imgs", 32), Counter()
    for i in range(len(ds)):
        try:
            ds.load_image(i)
        except SkipSample as err:
            training[err.reason] += 1
    assert dict(training) == m["unreadable"]
    assert m["counts"]["missing_caption"] == 2 and m["counts"]["grayscale"] == 1
    assert m["counts"]["small_upscaled"] == 2  # 16x16 and 30x60: the 32² square crop upscales them
    assert m["duplicate_groups"] == 1
    # wide 80x40 → 24x48 (h x w); tall 30x60 → 48x24; grey 64x40 (1.6) → 24x40; squares → 32x32
    assert m["buckets"] == {"48x24": 1, "40x24": 0, "32x32": 3, "24x40": 1, "24x48": 2}
    folder = out / "inspect"
    report = (folder / "report.md").read_text()
    assert "`sub/wide_copy.png`" in report and "`wide.png`" in report  # the duplicate group names both
    assert "`cut.png`: truncated_image" in report and "`empty.png`: empty_file" in report
    assert "5 of 7 readable images have a non-empty caption" in report
    for stem in ("sizes", "aspects", "captions", "buckets"):
        assert (folder / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (folder / "images.csv").read_text().splitlines()
    assert len(rows) == 11 and "tall.png,30,60,0.500,48x24" in "\n".join(rows)


def test_inspect_shards(tmp_path, compose_cfg):
    from ldm_train.__main__ import run

    shard = tmp_path / "s-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        sink.write({"__key__": "a", "png": png(80, 40, 1), "txt": "wide"})
        sink.write({"__key__": "b", "png": png(80, 40, 1), "txt": "wide again"})  # duplicate content
        sink.write({"__key__": "c", "png": b"garbage", "txt": "bad"})
        sink.write({"__key__": "d", "txt": "no image"})
        sink.write({"__key__": "e", "png": png(40, 40, 9)})
    m = run(compose_cfg([*BASE, "stage=inspect", "data=webdataset", f"data.urls={shard}",
                         f"paths.run_dir={tmp_path / 'run'}"]))
    assert m["inputs"] == 5 and m["readable"] == 3
    assert m["unreadable"] == {"not_an_image": 1, "no_image": 1}
    assert m["duplicate_groups"] == 1 and m["counts"]["missing_caption"] == 1
    assert m["buckets"]["24x48"] == 2 and m["buckets"]["32x32"] == 1


def test_inspect_refuses_other_data(tmp_path, compose_cfg):
    from ldm_train.__main__ import run
    from ldm_train.config import ConfigError

    with pytest.raises(ConfigError, match="data=folder or data=webdataset"):
        run(compose_cfg([*BASE, "stage=inspect", f"paths.run_dir={tmp_path}"]))

