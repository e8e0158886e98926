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


def save_image(img: Image.Image, path: Path) -> Path:
    """PNG-encode in memory, then write atomically: an interrupted write leaves the previous file intact."""
    from ldm_train.utils.io import atomic_write_bytes

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def save_png(x: torch.Tensor, path: Path) -> None:
    save_image(Image.fromarray(to_uint8(x)), path)


def make_grid(images: torch.Tensor, nrow: int | None = None, captions: list[str] | None = None,
              scale: int = 1) -> Image.Image:
    """A grid of (B, 3, H, W) images in [-1, 1]; `captions` (one per row) are written above each row."""
    arr = to_uint8(images)
    b, h, w, _ = arr.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol_rows = math.ceil(b / nrow)
    h, w = h * scale, w * scale
    cap_h = 14 if captions else 0
    pad = 2
    width = max(nrow * (w + pad) + pad, 8 * max((len(c) for c in captions), default=0) if captions else 0)
    grid = Image.new("RGB", (width, ncol_rows * (h + pad + cap_h) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(b):
        r, c = divmod(i, nrow)
        top = pad + r * (h + pad + cap_h)
        if captions and c == 0 and r < len(captions):
            draw.text((pad, top), captions[r], fill=(0, 0, 0))
        tile = Image.fromarray(arr[i]).resize((w, h), Image.NEAREST)
        grid.paste(tile, (pad + c * (w + pad), top + cap_h))
    return grid


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None, captions: list[str] | None = None,
              scale: int = 1) -> Path:
    return save_image(make_grid(images, nrow, captions, scale), path)
