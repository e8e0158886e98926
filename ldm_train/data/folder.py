"""Image-folder dataset: images found recursively, captions from same-name .txt files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, compositing transparency over white."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # Pillow's convert() clips high-bit-depth greyscale at 255 instead of rescaling.
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            peak = 65535.0
        elif img.mode == "F" and arr.max() <= 1.0:
            peak = 1.0
        else:  # "I" / "F" carry no declared depth: guess 16-bit when values exceed 8-bit
            peak = 65535.0 if arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


class ImageFolderDataset(Dataset):
    """Images under `root` (recursive, sorted) resized and cropped to a square `resolution`."""

    def __init__(
        self,
        root: str | Path,
        resolution: int = 256,
        random_crop: bool = False,
        flip: bool = False,
        extensions: tuple[str, ...] = DEFAULT_EXTENSIONS,
    ):
        self.root = Path(root)
        self.resolution, self.random_crop, self.flip = resolution, random_crop, flip
        self.extensions = tuple(e.lower() for e in extensions)
        expected = (
            f"expected image files ({', '.join(self.extensions)}) anywhere below it, each "
            "optionally with a same-name .txt caption file (e.g. cat.jpg + cat.txt)"
        )
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder '{self.root}' does not exist; {expected}")
        # Sorting relative POSIX paths makes the index -> file mapping identical on every machine.
        self.files = sorted(
            (p for p in self.root.rglob("*") if p.suffix.lower() in self.extensions and p.is_file()),
            key=lambda p: p.relative_to(self.root).as_posix(),
        )
        if not self.files:
            raise FileNotFoundError(f"no images found in folder '{self.root}'; {expected}")

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, index: int) -> str:
        """Return the caption of image `index` ("" when it has no .txt file)."""
        txt = self.files[index].with_suffix(".txt")
        if not txt.is_file():
            return ""
        return txt.read_text(encoding="utf-8", errors="replace").strip()

    def load_image(self, index: int) -> Image.Image:
        """Open image `index` as upright RGB; raises ValueError naming the file if unreadable."""
        path = self.files[index]
        try:
            with Image.open(path) as img:
                img.load()
                return _to_rgb(ImageOps.exif_transpose(img))
        except Exception as err:  # PIL raises many types for corrupt/truncated files
            raise ValueError(f"could not read image file '{path}': {err}") from err

    def __getitem__(self, index: int) -> dict:
        img = self.load_image(index)
        r = self.resolution
        w, h = img.size
        scale = r / min(w, h)
        # max(r, ...) guards against rounding the shorter side to r - 1.
        nw, nh = max(r, round(w * scale)), max(r, round(h * scale))
        # PIL's resize filters widen their support when downscaling, i.e. they antialias.
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        if self.random_crop:
            # torch RNG so DataLoader workers get distinct, seedable crops.
            left = int(torch.randint(nw - r + 1, ()).item())
            top = int(torch.randint(nh - r + 1, ()).item())
        else:
            left, top = (nw - r) // 2, (nh - r) // 2
        img = img.crop((left, top, left + r, top + r))
        if self.flip and torch.rand(()).item() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(img, dtype=np.uint8)
        image = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
        return {"image": image, "caption": self.caption(index), "label": 0}
