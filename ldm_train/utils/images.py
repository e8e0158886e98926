"""Image helpers: tensors in [-1, 1] ↔ PNG files, and grids with optional captions."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) or (3, H, W) in [-1, 1] → uint8 (…, H, W, 3)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def save_image(img: Image.Image, path: Path, text: dict[str, object] | None = None) -> Path:
    """PNG-encode in memory, then write atomically: an interrupted write leaves the previous file intact. `text`
    becomes PNG text chunks (key → str(value)), e.g. how a sample was made."""
    from PIL.PngImagePlugin import PngInfo

    from ldm_train.utils.io import atomic_write_bytes

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, str(value))  # international text: prompts need not be Latin-1
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def save_png(x: torch.Tensor, path: Path, text: dict[str, object] | None = None) -> Path:
    return save_image(Image.fromarray(to_uint8(x)), path, text)


def make_grid(images: torch.Tensor, nrow: int | None = None, captions: list[str] | None = None,
              scale: int = 1) -> Image.Image:
    """A grid of (B, 3, H, W) images in [-1, 1] (torchvision's `make_grid`, `nrow` per row, 2 px white gaps, tiles
    enlarged `scale` times); `captions` (one per row) are written in a 14 px band above each row."""
    from torchvision.utils import make_grid as tv_make_grid

    pad, cap_h = 2, 14
    x = images.detach().float().clamp(-1, 1).cpu()
    x = x.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)  # nearest-neighbour enlargement
    b, _, h, _ = x.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    grid = Image.fromarray(to_uint8(tv_make_grid(x, nrow=nrow, padding=pad, pad_value=1.0)))
    if not captions:
        return grid
    rows = math.ceil(b / nrow)
    width = max(grid.width, 8 * max(len(c) for c in captions))
    out = Image.new("RGB", (width, grid.height + rows * cap_h), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for r in range(rows):  # each row strip (its tiles and the gap below) moves down by the bands above it
        top = pad + r * (h + pad + cap_h)
        if r < len(captions):
            draw.text((pad, top), captions[r], fill=(0, 0, 0))
        out.paste(grid.crop((0, pad + r * (h + pad), grid.width, pad + (r + 1) * (h + pad))), (0, top + cap_h))
    return out


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None, captions: list[str] | None = None,
              scale: int = 1, text: dict[str, object] | None = None) -> Path:
    return save_image(make_grid(images, nrow, captions, scale), path, text)
