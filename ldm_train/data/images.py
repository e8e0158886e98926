"""The bad-input policy shared by every image source: decode, convert or skip, and count each case by reason.

Skipped (the sample is dropped, counted, and counts toward `data.max_skip_fraction`):
    empty_file, not_an_image, truncated_image, too_many_pixels (decompression-bomb guard), no_image (a shard
    sample without an image key), unreadable_shard (a tar that cannot be read).
Converted (kept, counted):
    alpha (composited over white), high_bit_depth (rescaled to 8 bits), grayscale, cmyk, small_upscaled (shorter
    side below the crop: resized up), missing_caption (""), caption_not_utf8 (undecodable bytes → U+FFFD),
    caption_too_long (the text encoder truncates it to its limit).
Unused (read, but no whole batch took it this epoch; not a skip):
    bucket_leftover (a shard stream with aspect buckets, see ldm_train.data.buckets.stream_bucket_batches).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

SKIP_REASONS = ("empty_file", "not_an_image", "truncated_image", "too_many_pixels", "no_image", "unreadable_shard")
CONVERT_REASONS = ("alpha", "high_bit_depth", "grayscale", "cmyk", "small_upscaled", "missing_caption",
                   "caption_not_utf8", "caption_too_long")
UNUSED_REASONS = ("bucket_leftover",)
# Slot 0 counts delivered samples, so one summed vector gives the skip fraction.
COUNT_KEYS = ("samples", *SKIP_REASONS, *CONVERT_REASONS, *UNUSED_REASONS)
COUNTS_KEY = "data_counts"  # the batch key that carries the count vectors
NAMES_KEY = "data_skipped"  # the batch key that carries "reason<TAB>file" lines of skipped inputs ("" for none)
NAMED_PER_REASON = 5  # skipped inputs named per reason (per reader, and in the logs); the rest are only counted
DEFAULT_MAX_PIXELS = 50_000_000


class SkipSample(Exception):
    """Raised by a decoder for an input that must be dropped; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Counts:
    """Per-reason event counter of one reader (a worker); `take()` hands the pending counts to the next sample,
    `take_names()` the names of the first skipped inputs (NAMED_PER_REASON per reason and reader)."""

    def __init__(self):
        self.pending = torch.zeros(len(COUNT_KEYS), dtype=torch.long)
        self.named: dict[str, int] = {}  # reason → inputs named so far by this reader
        self.pending_names: list[str] = []

    def add(self, reason: str, n: int = 1, name: str | None = None) -> None:
        self.pending[COUNT_KEYS.index(reason)] += n
        if name is not None and self.named.get(reason, 0) < NAMED_PER_REASON:
            self.named[reason] = self.named.get(reason, 0) + 1
            self.pending_names.append(f"{reason}\t{name}")

    def take_names(self) -> str:
        """"reason<TAB>name" lines of the inputs skipped since the last call ("" when none)."""
        out, self.pending_names = "\n".join(self.pending_names), []
        return out

    def take(self) -> torch.Tensor:
        """The counts since the last delivered sample, plus this delivered sample (slot 0)."""
        self.add("samples")
        out, self.pending = self.pending, torch.zeros(len(COUNT_KEYS), dtype=torch.long)
        return out


def summarize(total: torch.Tensor) -> dict[str, int]:
    """{reason: count} for the non-zero entries of a summed count vector (samples always present)."""
    return {k: int(v) for k, v in zip(COUNT_KEYS, total.tolist()) if v or k == "samples"}


def parse_names(lines: str) -> list[tuple[str, str]]:
    """The (reason, name) pairs of a `take_names()` string."""
    return [tuple(line.split("\t", 1)) for line in lines.splitlines() if "\t" in line]


def skip_fraction(total: torch.Tensor) -> float:
    """Skipped / (delivered + skipped) of a summed count vector."""
    skipped = int(total[1 : 1 + len(SKIP_REASONS)].sum())
    seen = skipped + int(total[0])
    return skipped / seen if seen else 0.0


# ---------------------------------------------------------------------------------------------- images

def to_rgb(img: Image.Image, counts: Counts | None = None) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, compositing transparency over white; conversions are counted."""
    count = counts.add if counts is not None else (lambda reason: None)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # Pillow's convert() clips high-bit-depth greyscale at 255 instead of rescaling.
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            peak = 65535.0
        elif img.mode == "F" and arr.max() <= 1.0:
            peak = 1.0
        else:  # "I" / "F" carry no declared depth: guess 16-bit when values exceed 8-bit
            peak = 65535.0 if arr.max() > 255 else 255.0
        count("high_bit_depth")
        arr = np.clip(arr / peak * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        count("alpha")
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in ("L", "1"):
        count("grayscale")
    elif img.mode == "CMYK":
        count("cmyk")
    return img.convert("RGB")


def open_image(source: bytes | Path, max_pixels: int = DEFAULT_MAX_PIXELS, counts: Counts | None = None
               ) -> Image.Image:
    """Decode file bytes or a path to upright 8-bit RGB; raises SkipSample with the reason when it cannot."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if not data:
        raise SkipSample("empty_file")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:  # Pillow's own limit (2 × MAX_IMAGE_PIXELS), checked on open
        raise SkipSample("too_many_pixels", str(err)) from err
    except (UnidentifiedImageError, OSError) as err:
        raise SkipSample("not_an_image", str(err)) from err
    # The header alone gives the size: refuse before decoding a single pixel of a bomb.
    if img.width * img.height > max_pixels:
        raise SkipSample("too_many_pixels", f"{img.width}x{img.height} > data.max_image_pixels={max_pixels}")
    try:
        img.load()
    except Image.DecompressionBombError as err:
        raise SkipSample("too_many_pixels", str(err)) from err
    except (OSError, SyntaxError, ValueError) as err:  # PIL reports truncation and corrupt streams this way
        raise SkipSample("truncated_image", str(err)) from err
    return to_rgb(ImageOps.exif_transpose(img), counts)


def to_tensor(img: Image.Image, resolution: int, random_crop: bool = False, flip: bool = False,
              counts: Counts | None = None, size: tuple[int, int] | None = None,
              crop: list[int] | None = None) -> torch.Tensor:
    """Resize to cover `size` = (h, w) (default: the square `resolution`; scale = max(h/H, w/W), i.e. the shorter
    side to `resolution` for a square), crop it (center or random), maybe flip → (3, h, w) in [-1, 1].
    `crop`, when given, receives the crop's [top, left] in the resized image (size conditioning)."""
    bh, bw = size or (resolution, resolution)
    w, h = img.size
    scale = max(bh / h, bw / w)
    if scale > 1 and counts is not None:
        counts.add("small_upscaled")
    # max(...) guards against rounding a side to one pixel below the crop.
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    # PIL's resize filters widen their support when downscaling, i.e. they antialias.
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    if random_crop:
        # torch RNG so DataLoader workers get distinct, seedable crops.
        left = int(torch.randint(nw - bw + 1, ()).item())
        top = int(torch.randint(nh - bh + 1, ()).item())
    else:
        left, top = (nw - bw) // 2, (nh - bh) // 2
    img = img.crop((left, top, left + bw, top + bh))
    if crop is not None:
        crop[:] = [top, left]
    if flip and torch.rand(()).item() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, h, w)


def size_condition(img: Image.Image, crop: list[int], image: torch.Tensor) -> torch.Tensor:
    """SDXL's micro-conditioning of one item: [original h, w, crop top, left, target h, w] (float32, (6,))."""
    return torch.tensor([img.height, img.width, *crop, *image.shape[1:]], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- captions

@dataclass
class CaptionLimit:
    """The text encoder's token limit: `tokenizer` is a Hugging Face tokenizer or the byte tokenizer."""

    tokenizer: Any
    max_tokens: int

    def too_long(self, text: str) -> bool:
        from ldm_train.models.text import ByteTokenizer

        if isinstance(self.tokenizer, ByteTokenizer):
            return len(text.encode("utf-8")) + 2 > self.max_tokens  # + BOS, EOS
        return len(self.tokenizer(text, truncation=False, verbose=False)["input_ids"]) > self.max_tokens


def caption_limit(text_encoder: Any) -> CaptionLimit | None:
    """The CaptionLimit of a built text encoder (None for encoders without a tokenizer, e.g. class labels)."""
    tokenizer, max_length = getattr(text_encoder, "tokenizer", None), getattr(text_encoder, "max_length", None)
    return CaptionLimit(tokenizer, int(max_length)) if tokenizer is not None and max_length else None


def decode_caption(raw: bytes | str | None, counts: Counts | None = None, limit: CaptionLimit | None = None) -> str:
    """Caption bytes → stripped text: missing → "", bad UTF-8 replaced, over-long counted (the encoder truncates)."""
    count = counts.add if counts is not None else (lambda reason: None)
    if raw is None:
        count("missing_caption")
        return ""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            count("caption_not_utf8")
            text = raw.decode("utf-8", errors="replace")
    else:
        text = raw
    text = text.strip()
    if limit is not None and limit.too_long(text):
        count("caption_too_long")
    return text
