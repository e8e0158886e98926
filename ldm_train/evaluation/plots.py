"""The ablation figures (matplotlib, no display needed): quality against training step, quality against sampling
throughput, the autoencoder metrics per row, and the sample grid with one row per job.

Every function returns a `Figure` (tests read its axes) and `save_figure` writes it. Axis labels carry the metric's
honest key, its unit and the direction of better (`metric_info`); legends carry the rows' labels (the swept
overrides, e.g. `f=8 · dit_tiny · flow`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from ldm_train.evaluation.metric_info import metric_info
from ldm_train.utils.io import atomic_write_bytes

# one row's series: [(x, mean, spread or None), ...]
Series = list[tuple[float, float, float | None]]


def _panels(n: int, width: float = 5.0, height: float = 3.6) -> tuple[Figure, list]:
    cols = 2 if n == 4 else min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def curves_figure(curves: dict[str, dict[str, Series]], samples: int | None = None) -> Figure:
    """One panel per metric, one line per row label: the metric of the EMA model against the stage-2 step.
    `curves[metric][label] = [(step, mean, spread), ...]`; a spread draws a ±1 std band."""
    fig, axes = _panels(len(curves))
    for ax, (metric, by_label) in zip(axes, curves.items()):
        for label, points in by_label.items():
            pts = sorted(points)
            x = np.array([p[0] for p in pts], dtype=float)
            y = np.array([p[1] for p in pts], dtype=float)
            line, = ax.plot(x, y, marker="o", markersize=3, label=label)
            spread = [p[2] for p in pts]
            if all(s is not None for s in spread) and len(pts) > 1:
                s = np.array(spread, dtype=float)
                ax.fill_between(x, y - s, y + s, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("stage-2 training step (optimizer steps)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric_info(metric).label("\n"))
        ax.set_title(f"EMA model, {samples} samples" if samples else "EMA model", fontsize="medium")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def speed_figure(points: dict[str, dict[str, tuple[float, float, float | None]]], sampler: str = "") -> Figure:
    """Quality against sampling throughput: one panel per metric, one marker per row label.
    `points[metric][label] = (samples per second, mean, spread)`; a spread draws a ±1 std error bar."""
    fig, axes = _panels(len(points))
    for ax, (metric, by_label) in zip(axes, points.items()):
        for label, (speed, value, spread) in by_label.items():
            ax.errorbar([speed], [value], yerr=None if spread is None else [spread], fmt="o", capsize=3, label=label)
            ax.annotate(label, (speed, value), textcoords="offset points", xytext=(5, 5), fontsize="small")
        speeds = [p[0] for p in by_label.values()]
        if speeds and min(speeds) > 0 and max(speeds) / min(speeds) > 4:
            ax.set_xscale("log")
        ax.margins(x=0.2, y=0.15)  # room for the point labels
        ax.set_xlabel("sampling throughput (samples/s), → faster" + (f"\n{sampler}" if sampler else ""))
        ax.set_ylabel(metric_info(metric).label("\n"))
        ax.set_title("final EMA model", fontsize="medium")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def bars_figure(values: dict[str, dict[str, tuple[float, float | None]]], title: str) -> Figure:
    """One panel per metric, one bar per row label: `values[metric][label] = (mean, spread)`."""
    fig, axes = _panels(len(values), width=3.8)
    for ax, (metric, by_label) in zip(axes, values.items()):
        labels = list(by_label)
        means = [by_label[k][0] for k in labels]
        spreads = [by_label[k][1] for k in labels]
        yerr = None if any(s is None for s in spreads) else spreads
        bars = ax.bar(range(len(labels)), means, yerr=yerr, capsize=3, color=[f"C{i}" for i in range(len(labels))])
        ax.bar_label(bars, fmt="%.4g", fontsize="small")
        long = max(map(len, labels), default=0) > 10  # `f=8 · dit_tiny · flow`: slanted, so labels do not overlap
        ax.set_xticks(range(len(labels)), labels, rotation=25 if long else 0, ha="right" if long else "center")
        ax.set_xlabel("ablation row")
        ax.set_ylabel(metric_info(metric).label("\n"))
        ax.set_title(f"{title}: {metric}")
        ax.grid(True, axis="y", alpha=0.3)
    return fig


def samples_figure(rows: dict[str, list[Path]], column_titles: list[str]) -> Figure:
    """One row of images per row label (the same prompts and sampling seeds in every row), prompts as titles."""
    n_cols = max(len(paths) for paths in rows.values())
    fig = Figure(figsize=(1.6 * n_cols + 0.8, 1.7 * len(rows) + 0.4), layout="constrained")
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    for r, (label, paths) in enumerate(rows.items()):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(paths):
                ax.imshow(np.asarray(Image.open(paths[c]).convert("RGB")), interpolation="nearest")
            else:
                ax.set_visible(False)
            if r == 0 and c < len(column_titles):
                ax.set_title(column_titles[c], fontsize="x-small", wrap=True)
        axes[r][0].set_ylabel(label, fontsize="medium")
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """PNG at 110 dpi, written atomically (a reader never sees half a figure)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
