"""Tests for the procedural shapes dataset, its attribute reader and the image-folder dataset."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_train.data.folder import ImageFolderDataset
from ldm_train.data.shapes import (
    COLORS,
    POSITIONS,
    SHAPES,
    ShapesDataset,
    alignment_details,
    attributes_to_label,
    caption,
    caption_alignment,
    label_to_attributes,
    parse_caption,
    read_attributes,
    render,
)

ALL_COMBOS = list(itertools.product(COLORS, SHAPES, POSITIONS))


def _batch(ds: ShapesDataset, n: int) -> tuple[torch.Tensor, list[str]]:
    items = [ds[i] for i in range(n)]
    return torch.stack([it["image"] for it in items]), [it["caption"] for it in items]


# --- shapes dataset -----------------------------------------------------------------


def test_constants() -> None:
    assert len(COLORS) >= 8
    assert SHAPES == ("circle", "square", "triangle")
    assert set(POSITIONS) == {"left", "right", "top", "bottom", "center"}
    assert ShapesDataset.num_classes == len(COLORS) * len(SHAPES) * len(POSITIONS)
    palette = np.array(list(COLORS.values()), dtype=float)
    dists = np.linalg.norm(palette[:, None] - palette[None], axis=-1)
    assert dists[~np.eye(len(palette), dtype=bool)].min() > 80  # clearly separable


def test_determinism_and_splits() -> None:
    a, b = ShapesDataset(32, 50, "train", seed=0), ShapesDataset(32, 50, "train", seed=0)
    for i in (0, 7, 49):
        assert torch.equal(a[i]["image"], a[i]["image"])
        assert torch.equal(a[i]["image"], b[i]["image"])
        assert a[i]["caption"] == b[i]["caption"]
    val = ShapesDataset(32, 50, "val", seed=0)
    other_seed = ShapesDataset(32, 50, "train", seed=1)
    for other in (val, other_seed):
        same = sum(torch.equal(a[i]["image"], other[i]["image"]) for i in range(50))
        assert same <= 2  # identical images only by rare coincidence of attributes+jitter
    assert len({a[i]["caption"] for i in range(50)}) > 20  # items differ from each other
    with pytest.raises(IndexError):
        a[50]
    with pytest.raises(ValueError):
        ShapesDataset(32, 10, "bogus")


@pytest.mark.parametrize("res", [32, 64])
def test_item_format(res: int) -> None:
    ds = ShapesDataset(res, 20, "train")
    for i in range(20):
        it = ds[i]
        img = it["image"]
        assert img.shape == (3, res, res) and img.dtype == torch.float32
        assert img.min() >= -1.0 and img.max() <= 1.0
        assert img.max() == 1.0  # white background present
        assert isinstance(it["caption"], str) and isinstance(it["label"], int)
        assert 0 <= it["label"] < ds.num_classes
        names = (list(COLORS)[it["color"]], SHAPES[it["shape"]], POSITIONS[it["position"]])
        assert label_to_attributes(it["label"]) == names
        assert parse_caption(it["caption"]) == names


@pytest.mark.parametrize("res", [16, 32, 64, 128, 256])
def test_render_resolutions(res: int) -> None:
    rng = np.random.default_rng(0)
    img = render("blue", "triangle", "left", res, rng)
    assert img.shape == (res, res, 3) and img.dtype == np.uint8
    # Anti-aliased: some edge pixels lie strictly between background and fill colour.
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 2
    assert read_attributes(img) == ("blue", "triangle", "left")


def test_caption_parse_and_label_roundtrip() -> None:
    captions = set()
    for label, (c, s, p) in enumerate(ALL_COMBOS):
        text = caption(c, s, p)
        captions.add(text)
        assert parse_caption(text) == (c, s, p)
        assert parse_caption(text.upper() + ".") == (c, s, p)
        assert attributes_to_label(c, s, p) == label
        assert label_to_attributes(label) == (c, s, p)
    assert len(captions) == len(ALL_COMBOS)
    assert caption("red", "circle", "left") == "a red circle on the left"
    assert caption("blue", "square", "top") == "a blue square at the top"
    assert caption("cyan", "circle", "center") == "a cyan circle in the center"
    for bad in ("", "a red circle", "a pink circle on the left", "a red hexagon at the top", "hello"):
        assert parse_caption(bad) is None
    with pytest.raises(ValueError):
        label_to_attributes(ShapesDataset.num_classes)


def test_labels_cover_all_classes() -> None:
    ds = ShapesDataset(16, 1500, "train", seed=3)
    labels = {ds[i]["label"] for i in range(1500)}
    assert len(labels) == ds.num_classes  # uniform over 120 classes: all seen w.h.p.


# --- attribute reader ---------------------------------------------------------------


@pytest.mark.parametrize("res", [32, 64])
def test_reader_accuracy(res: int) -> None:
    ds = ShapesDataset(res, 2000, "val", seed=123)
    correct = sum(read_attributes(ds[i]["image"]) == parse_caption(ds[i]["caption"]) for i in range(2000))
    assert correct / 2000 >= 0.99


def test_reader_accepts_uint8_and_handles_arbitrary_images() -> None:
    item = ShapesDataset(32, 1, "train")[0]
    uint8 = ((item["image"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    assert read_attributes(uint8) == read_attributes(item["image"])
    gen = torch.Generator().manual_seed(0)
    odd = [
        torch.ones(3, 32, 32),
        -torch.ones(3, 32, 32),
        torch.rand(3, 32, 32, generator=gen) * 2 - 1,
        torch.rand(3, 7, 5, generator=gen) * 2 - 1,
        torch.full((3, 16, 16), float("nan")),
    ]
    for img in odd + [np.zeros((16, 16, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)]:
        c, s, p = read_attributes(img)
        assert c in COLORS and s in SHAPES and p in POSITIONS


def test_reader_tolerates_noise() -> None:
    images, captions = _batch(ShapesDataset(32, 200, "val", seed=5), 200)
    noisy = (images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert caption_alignment(noisy, captions) >= 0.95


def test_caption_alignment() -> None:
    images, captions = _batch(ShapesDataset(32, 200, "val", seed=7), 200)
    assert caption_alignment(images, captions) == 1.0
    details = alignment_details(images, captions)
    assert set(details) == {"color", "shape", "position", "all"}
    assert all(v == 1.0 for v in details.values())
    shuffled = captions[1:] + captions[:1]
    assert caption_alignment(images, shuffled) < 0.2
    assert alignment_details(images, shuffled)["color"] < 0.4
    assert caption_alignment(images, [""] * len(captions)) == 0.0
    # Half of the captions unparseable -> at most half aligned.
    mixed = [c if i % 2 else "" for i, c in enumerate(captions)]
    assert caption_alignment(images, mixed) == 0.5
    with pytest.raises(ValueError):
        caption_alignment(images, captions[:-1])


# --- image folder dataset ---------------------------------------------------------------


def _write_folder(root) -> None:
    rng = np.random.default_rng(0)
    sub = root / "sub" / "deeper"
    sub.mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(root / "a_rgb.jpg")
    (root / "a_rgb.txt").write_text("  a photo of noise \n", encoding="utf-8")
    rgba = np.zeros((30, 20, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :10, 3] = 255  # left half opaque red, right half fully transparent
    Image.fromarray(rgba, "RGBA").save(root / "b_rgba.png")
    (root / "b_rgba.txt").write_bytes(b"caf\xc3\xa9 \xff bad byte")
    Image.fromarray(np.full((24, 24), 128, np.uint8), "L").save(sub / "c_gray.png")
    Image.fromarray(np.full((24, 24), 65535, np.uint16)).save(sub / "d_16bit.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "e_nocap.bmp")
    (root / "notes.md").write_text("not an image")


def test_image_folder_dataset(tmp_path) -> None:
    _write_folder(tmp_path)
    ds = ImageFolderDataset(tmp_path, resolution=16)
    names = [p.name for p in ds.files]
    assert names == ["a_rgb.jpg", "b_rgba.png", "e_nocap.bmp", "c_gray.png", "d_16bit.png"]
    items = [ds[i] for i in range(len(ds))]
    for it in items:
        assert it["image"].shape == (3, 16, 16) and it["image"].dtype == torch.float32
        assert it["image"].min() >= -1.0 and it["image"].max() <= 1.0
        assert it["label"] == 0
    assert [it["caption"] for it in items][:3] == ["a photo of noise", "café \ufffd bad byte", ""]
    rgba = items[1]["image"]
    assert rgba[0, :, 0].min() > 0.9 and rgba[1:, :, 0].max() < -0.9  # opaque red column
    assert rgba[:, :, -1].min() > 0.9  # transparent area composited over white
    gray = items[3]["image"]
    assert torch.allclose(gray, torch.full_like(gray, 128 / 127.5 - 1), atol=0.02)
    assert items[4]["image"].min() > 0.99  # 16-bit full-scale white stays white, not clipped
    # Same file list and content on a second construction (deterministic).
    again = ImageFolderDataset(tmp_path, resolution=16)
    assert torch.equal(again[0]["image"], items[0]["image"])


def test_image_folder_crop_and_flip(tmp_path) -> None:
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white, right half black
    Image.fromarray(arr).save(tmp_path / "wide.png")
    center = ImageFolderDataset(tmp_path, resolution=10)[0]["image"]
    assert center.shape == (3, 10, 10)
    assert center[:, :, 0].mean() > 0.9 and center[:, :, -1].mean() < -0.9
    torch.manual_seed(0)
    aug = ImageFolderDataset(tmp_path, resolution=10, random_crop=True, flip=True)
    views = [aug[0]["image"] for _ in range(20)]
    assert all(v.shape == (3, 10, 10) for v in views)
    assert len({tuple(v[0, 5].tolist()) for v in views}) > 1  # crops/flips actually vary


def test_image_folder_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="empty_dir"):
        ImageFolderDataset(tmp_path / "empty_dir")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=r"empty_dir.*\.png"):
        ImageFolderDataset(tmp_path / "empty_dir")
    (tmp_path / "empty_dir" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    ds = ImageFolderDataset(tmp_path / "empty_dir")  # listing alone must not fail
    with pytest.raises(ValueError, match="broken.jpg"):
        ds[0]


def test_folder_split_is_disjoint_and_val_is_not_augmented(tmp_path):
    """data=folder: train/val split without overlap; validation images are the same on every read (no flip)."""
    from omegaconf import OmegaConf

    from ldm_train.data import build_datasets

    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    cfg = OmegaConf.create({"name": "folder", "root": str(tmp_path), "resolution": 16, "random_crop": True,
                            "flip": True, "val_fraction": 0.3, "seed": 0})
    train, val = build_datasets(cfg)
    assert len(train) == 7 and len(val) == 3
    assert not set(train.indices) & set(val.indices)
    for i in range(len(val)):
        torch.manual_seed(i)
        a = val[i]["image"]
        torch.manual_seed(i + 100)
        assert torch.equal(a, val[i]["image"])
