"""Line plots of a metric against f, drawn with PIL (matplotlib is not a dependency of this project)."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def plot_series(title: str, series: dict[str, list[tuple[int, float]]], path: Path, size=(480, 320)) -> Path:
    """One line per key of `series` (e.g. regularizer), x = f on a log2 axis, y = the metric; saved as PNG."""
    w, h = size
    left, right, top, bottom = 64, 16, 28, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    points = [p for pts in series.values() for p in pts]
    xs = sorted({f for f, _ in points})
    ys = [v for _, v in points]
    y_lo, y_hi = min(ys), max(ys)
    if y_hi - y_lo < 1e-12:  # a flat line still needs a visible axis range
        y_lo, y_hi = y_lo - 0.5 * (abs(y_lo) or 1), y_hi + 0.5 * (abs(y_hi) or 1)
    x_lo, x_hi = math.log2(xs[0]), math.log2(xs[-1])

    def to_px(f: int, v: float) -> tuple[float, float]:
        fx = 0.5 if x_hi == x_lo else (math.log2(f) - x_lo) / (x_hi - x_lo)
        return left + fx * (w - left - right), top + (1 - (v - y_lo) / (y_hi - y_lo)) * (h - top - bottom)

    draw.text((left, 8), title, fill="black")
    draw.line([(left, top), (left, h - bottom), (w - right, h - bottom)], fill="black")
    for f in xs:
        x, _ = to_px(f, y_lo)
        draw.line([(x, h - bottom), (x, h - bottom + 4)], fill="black")
        draw.text((x - 6, h - bottom + 6), f"f={f}", fill="black")
    for v in (y_lo, (y_lo + y_hi) / 2, y_hi):
        _, y = to_px(xs[0], v)
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((4, y - 6), f"{v:.4g}", fill="black")
    for i, (name, pts) in enumerate(sorted(series.items())):
        color = COLORS[i % len(COLORS)]
        px = [to_px(f, v) for f, v in sorted(pts)]
        if len(px) > 1:
            draw.line(px, fill=color, width=2)
        for x, y in px:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        draw.text((w - right - 40 * (i + 1), 8), name, fill=color)  # legend in the title line, clear of the data
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return Path(path)
