"""Embedded procedural dataset: coloured shapes at named positions, plus a pixel-level reader."""

from __future__ import annotations

import re

import numpy as np
import torch
from torch.utils.data import Dataset

# Saturated colours, pairwise >= ~100 apart in RGB and >= ~240 from the white background,
# so a nearest-colour lookup stays correct under blur, noise and mild colour shifts.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 25),
    "green": (20, 160, 30),
    "blue": (25, 55, 225),
    "yellow": (240, 225, 0),
    "magenta": (225, 20, 205),
    "cyan": (0, 200, 215),
    "orange": (245, 120, 0),
    "purple": (115, 20, 160),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUND: tuple[int, int, int] = (255, 255, 255)

_COLOR_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.float64)
# Anchor centres (x, y) as fractions of the image side; >= 0.25 apart, so the +-0.04
# centre jitter (plus the triangle's centroid offset) never crosses a decision boundary.
_ANCHORS = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
_ANCHOR_XY = np.array([_ANCHORS[p] for p in POSITIONS])
_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
_PHRASE_TO_POS = {v: k for k, v in _PHRASES.items()} | {"in the centre": "center"}
_CAPTION_RE = re.compile(r"^an? (\w+) (\w+) ((?:on|at|in) the \w+)$")
_SPLITS = {"train": 0, "val": 1, "test": 2}
_SIZE_RANGE = (0.25, 0.40)  # bounding-box side as a fraction of the image side
_CENTER_JITTER = 0.04
_SUPERSAMPLE = 4
# Shape thresholds, roughly midway between the ideal values (see _shape_features):
# fill ratio square 1, circle pi/4, triangle 1/2; vertical skewness triangle -0.57, else 0.
_TRIANGLE_SKEW, _TRIANGLE_FILL, _SQUARE_FILL = -0.25, 0.64, 0.9
NUM_CLASSES = len(COLORS) * len(SHAPES) * len(POSITIONS)


def caption(color: str, shape: str, position: str) -> str:
    """Return the canonical caption, e.g. "a red circle on the left"."""
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {shape} {_PHRASES[position]}"


def parse_caption(text: str) -> tuple[str, str, str] | None:
    """Invert `caption`; None when the text is not a shapes caption."""
    m = _CAPTION_RE.match(" ".join(str(text).lower().strip().rstrip(".").split()))
    if m is None:
        return None
    color, shape, phrase = m.groups()
    position = _PHRASE_TO_POS.get(phrase)
    if color not in COLORS or shape not in SHAPES or position is None:
        return None
    return color, shape, position


def attributes_to_label(color: str, shape: str, position: str) -> int:
    """Return the class index of a (colour, shape, position) combination."""
    c, s, p = _COLOR_NAMES.index(color), SHAPES.index(shape), POSITIONS.index(position)
    return (c * len(SHAPES) + s) * len(POSITIONS) + p


def captions_to_labels(captions: list[str]) -> torch.Tensor:
    """Class indices (B,) of shapes captions, for a class-conditional model (text_encoder=class)."""
    from ldm_train.config import ConfigError

    labels = []
    for caption in captions:
        attrs = parse_caption(caption)
        if attrs is None:
            raise ConfigError(f"prompt {caption!r} is not a shapes caption, and this model is conditioned on shapes "
                              "classes (text_encoder=class): use prompts like 'a red circle on the left'")
        labels.append(attributes_to_label(*attrs))
    return torch.tensor(labels)


def label_to_attributes(label: int) -> tuple[str, str, str]:
    """Return the (colour, shape, position) names of a class index."""
    if not 0 <= int(label) < NUM_CLASSES:
        raise ValueError(f"label {label} outside 0..{NUM_CLASSES - 1}")
    cs, p = divmod(int(label), len(POSITIONS))
    c, s = divmod(cs, len(SHAPES))
    return _COLOR_NAMES[c], SHAPES[s], POSITIONS[p]


def render(color: str, shape: str, position: str, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """Render one anti-aliased shape on the background as uint8 (H, W, 3)."""
    size = rng.uniform(*_SIZE_RANGE)
    cx, cy = np.array(_ANCHORS[position]) + rng.uniform(-_CENTER_JITTER, _CENTER_JITTER, 2)
    half = size / 2
    # Only rasterise the output pixels covering the shape's box (the rest stays background).
    r0, c0 = (int(np.floor((v - half) * resolution)) for v in (cy, cx))
    r1, c1 = (int(np.ceil((v + half) * resolution)) for v in (cy, cx))
    r0, c0, r1, c1 = max(r0, 0), max(c0, 0), min(r1, resolution), min(c1, resolution)
    ss = _SUPERSAMPLE
    y = ((np.arange(r0 * ss, r1 * ss) + 0.5) / (resolution * ss))[:, None]
    x = ((np.arange(c0 * ss, c1 * ss) + 0.5) / (resolution * ss))[None, :]
    if shape == "circle":
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif shape == "square":
        mask = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    elif shape == "triangle":
        # Apex-up isosceles triangle filling its size x size box: width grows linearly downwards.
        depth = y - (cy - half)
        mask = (depth >= 0) & (depth <= size) & (np.abs(x - cx) <= depth / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    # Box-downsample the supersampled coverage mask into per-pixel alpha.
    alpha = np.zeros((resolution, resolution))
    alpha[r0:r1, c0:c1] = mask.reshape(r1 - r0, ss, c1 - c0, ss).mean(axis=(1, 3))
    bg, fg = np.array(BACKGROUND, np.float64), np.array(COLORS[color], np.float64)
    img = bg + alpha[..., None] * (fg - bg)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


class ShapesDataset(Dataset):
    """Deterministic procedural dataset of captioned coloured shapes."""

    num_classes: int = NUM_CLASSES
    deterministic_items = True  # an item draws nothing from torch's RNG (data/resumable.py need not seed it)

    def __init__(self, resolution: int = 32, size: int = 10000, split: str = "train", seed: int = 0):
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {tuple(_SPLITS)}")
        self.resolution, self.size, self.split, self.seed = resolution, size, split, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for dataset of size {self.size}")
        # Seeding per item (not per worker) keeps items identical across workers and epochs.
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], int(index)])
        label = int(rng.integers(NUM_CLASSES))
        color, shape, position = label_to_attributes(label)
        img = render(color, shape, position, self.resolution, rng)
        image = torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1.0
        return {
            "image": image,
            "caption": caption(color, shape, position),
            "label": label,
            "color": _COLOR_NAMES.index(color),
            "shape": SHAPES.index(shape),
            "position": POSITIONS.index(position),
        }


def _to_array(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """Convert a (3,H,W) [-1,1] tensor or (H,W,3) uint8 array to float64 (H,W,3) in 0..255."""
    if isinstance(image, torch.Tensor):
        t = torch.nan_to_num(image.detach().float().cpu())  # diverged samples must not crash
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        return ((t.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy().astype(np.float64)
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    return np.nan_to_num(arr.astype(np.float64))


def _shape_features(alpha: np.ndarray) -> tuple[float, float, float, float, float]:
    """Return (fill ratio, vertical skewness, centroid x, centroid y, height) of a soft mask."""
    h, w = alpha.shape
    total = alpha.sum()
    ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
    cx = float((alpha.sum(0) * xs).sum() / total)
    py = alpha.sum(1) / total
    cy = float((py * ys).sum())
    # Widest row x tallest column bounds the shape's box with sub-pixel accuracy, so
    # area / box is ~1 for squares, pi/4 for circles and 1/2 for triangles.
    width, height = alpha.sum(1).max() / w, alpha.sum(0).max() / h
    fill = float(total / (h * w) / max(width * height, 1e-12))
    # An apex-up triangle has its mass low (negative skew); circles and squares are symmetric.
    var = (py * (ys - cy) ** 2).sum()
    skew = float((py * (ys - cy) ** 3).sum() / max(var, 1e-12) ** 1.5)
    return fill, skew, cx, cy, float(height)


def read_attributes(image: torch.Tensor | np.ndarray) -> tuple[str, str, str]:
    """Read (colour, shape, position) from one image by pixel statistics alone."""
    img = _to_array(image)
    h, w, _ = img.shape
    # The background is estimated from the border (shapes never touch it), which tolerates
    # generated images whose background is slightly off-white.
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    diff = img - bg
    dist = np.linalg.norm(diff, axis=-1)
    strong = float(np.quantile(dist, 0.99))
    if strong < 1e-6:  # nothing stands out: fall back to the whole image
        core = np.ones((h, w), bool)
    else:
        # Only near-opaque pixels: anti-aliased edges blend towards the background and
        # would drag the colour estimate (e.g. red towards orange).
        core = dist >= 0.8 * strong
    fg = np.median(img[core], axis=0)
    color = _COLOR_NAMES[int(np.argmin(((_PALETTE - fg) ** 2).sum(1)))]
    axis = fg - bg
    norm2 = float(axis @ axis)
    if norm2 > 1e-6:
        # Soft coverage: projection of each pixel onto the background -> foreground line.
        alpha = np.clip(diff @ axis / norm2, 0.0, 1.0)
        alpha[alpha < 0.1] = 0.0  # drop faint background noise
        # Keep only a window around the opaque core: noise far from the shape would
        # otherwise inflate the area and the row/column profiles.
        rows, cols = np.nonzero(core)
        m = max(2, round(0.05 * max(h, w)))
        window = np.zeros((h, w), bool)
        r0, c0 = max(rows.min() - m, 0), max(cols.min() - m, 0)
        window[r0 : rows.max() + m + 1, c0 : cols.max() + m + 1] = True
        alpha[~window] = 0.0
    else:
        alpha = core.astype(np.float64)
    if alpha.sum() < 1e-6:
        alpha = np.ones((h, w))
    fill, skew, cx, cy, height = _shape_features(alpha)
    # Skewness decides triangles first: at low resolution the fill ratio of small triangles
    # drifts up towards the circle's, while their skew stays clearly negative.
    if skew < _TRIANGLE_SKEW or fill < _TRIANGLE_FILL:
        shape = "triangle"
    else:
        shape = "square" if fill > _SQUARE_FILL else "circle"
    if shape == "triangle":
        cy -= height / 6  # centroid sits h/6 below the box centre that render() places
    position = POSITIONS[int(np.argmin(((_ANCHOR_XY - (cx, cy)) ** 2).sum(1)))]
    return color, shape, position


def alignment_details(images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Per-attribute and joint accuracy of read attributes against the captions."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    hits = np.zeros((max(len(captions), 1), 4))
    for i, (img, text) in enumerate(zip(images, captions)):
        target = parse_caption(text)
        if target is None:  # unparseable (e.g. empty) prompts score against nothing
            continue
        read = read_attributes(img)
        match = [r == t for r, t in zip(read, target)]
        hits[i] = [*match, all(match)]
    mean = hits.mean(0) if len(captions) else hits[0]
    return dict(zip(("color", "shape", "position", "all"), map(float, mean)))


def caption_alignment(images: torch.Tensor, captions: list[str]) -> float:
    """Fraction of images whose colour, shape and position all match their caption."""
    return alignment_details(images, captions)["all"]
