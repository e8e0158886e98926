"""`stage=inspect`: a report on an image collection before anyone trains on it.

Streams once through `data=folder` or `data=webdataset` with the readers training uses (`open_image`,
`decode_caption`: the same skip and conversion reasons and counts) and writes to `<run dir>/inspect/`:
report.md (counts, unreadable files by reason, captions, buckets, duplicates), images.csv (one row per input) and
PNG histograms of sizes, aspects, caption lengths and buckets. Only a few numbers per image are kept in memory.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from ldm_train.config import ConfigError, run_dir, size_multiple
from ldm_train.data import config_buckets
from ldm_train.data.buckets import histogram, nearest_bucket
from ldm_train.data.images import (
    CONVERT_REASONS,
    COUNT_KEYS,
    Counts,
    SkipSample,
    decode_caption,
    open_image,
    summarize,
)

log = logging.getLogger(__name__)
HEADLINE_METRIC = "readable"


@dataclass
class Record:
    """One input: where it is, its size, caption, content hash, or why it was skipped."""

    name: str
    sha256: str
    width: int = 0
    height: int = 0
    caption_chars: int = 0
    has_caption: bool = False
    skipped: str = ""  # a SKIP_REASONS entry when unreadable
    bucket: int = -1


@dataclass
class Report:
    records: list[Record] = field(default_factory=list)
    counts: Counts = field(default_factory=Counts)  # the reader's pending counts, as in training
    total: torch.Tensor = field(default_factory=lambda: torch.zeros(len(COUNT_KEYS), dtype=torch.long))


def folder_inputs(cfg: DictConfig) -> Iterator[tuple[str, bytes, bytes | None]]:
    """(relative path, image bytes, caption bytes or None) of every image of a `data=folder` root."""
    from ldm_train.data.folder import ImageFolderDataset

    ds = ImageFolderDataset(cfg.root, cfg.resolution)  # the same file list (extensions, order) as training
    for path in ds.files:
        txt = path.with_suffix(".txt")
        yield path.relative_to(ds.root).as_posix(), path.read_bytes(), txt.read_bytes() if txt.is_file() else None


def shard_inputs(cfg: DictConfig, counts: Counts) -> Iterator[tuple[str, bytes | None, bytes | str | None]]:
    """(shard/key, image bytes or None, caption) of every sample of `data=webdataset` shards, in order."""
    import webdataset as wds

    from ldm_train.data.webdataset import IMAGE_KEYS, ImageSampleDecoder, expand_urls

    decoder = ImageSampleDecoder(cfg.resolution, caption_key=cfg.caption_key, json_field=cfg.json_field)

    def bad_shard(exn: Exception) -> bool:
        counts.add("unreadable_shard")
        log.warning("unreadable shard data: %s", exn)
        return True

    for url in expand_urls(cfg.urls):
        for sample in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=bad_shard)):
            data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
            yield f"{Path(url).name}/{sample['__key__']}", data, decoder.caption_bytes(sample)


def inspect_inputs(cfg: DictConfig, buckets: list[tuple[int, int]], limit: int | None = None) -> Report:
    """One Record per input, and the reason counts training would log (`data_counts`), over the `data` config."""
    from tqdm import tqdm

    report = Report()
    if cfg.name == "folder":
        inputs = folder_inputs(cfg)
    elif cfg.name == "webdataset":
        inputs = shard_inputs(cfg, report.counts)
    else:
        raise ConfigError(f"stage=inspect reads image collections: data=folder or data=webdataset, not data={cfg.name}")
    max_pixels = cfg.get("max_image_pixels", 50_000_000)
    for i, (name, data, caption) in enumerate(tqdm(inputs, desc="inspect", unit="img", mininterval=2)):
        if limit is not None and i >= limit:
            break
        rec = Record(name, hashlib.sha256(data or b"").hexdigest())
        try:
            if data is None:
                raise SkipSample("no_image")
            img = open_image(data, max_pixels, report.counts)
        except SkipSample as err:
            report.counts.add(err.reason)
            rec.skipped = err.reason
            report.records.append(rec)
            continue
        rec.width, rec.height = img.size
        rec.bucket = nearest_bucket(rec.height, rec.width, buckets)
        rec.has_caption = caption is not None
        rec.caption_chars = len(decode_caption(caption, report.counts))
        if _upscaled(rec, cfg, buckets):
            report.counts.add("small_upscaled")
        report.total += report.counts.take()
        report.records.append(rec)
    report.total += report.counts.pending  # skips after the last readable input
    return report


def _upscaled(rec: Record, cfg: DictConfig, buckets: list[tuple[int, int]]) -> bool:
    """Whether training's resize would upscale this image (its `small_upscaled` count)."""
    h, w = buckets[rec.bucket] if cfg.get("aspect_buckets") else (cfg.resolution, cfg.resolution)
    return max(h / rec.height, w / rec.width) > 1


def write_report(report: Report, out: Path, cfg: DictConfig, buckets: list[tuple[int, int]]) -> dict:
    """report.md, images.csv and the histograms (PNG) under `out`; returns the headline numbers."""
    out.mkdir(parents=True, exist_ok=True)
    recs = report.records
    ok = [r for r in recs if not r.skipped]
    totals = summarize(report.total)
    by_hash: dict[str, list[str]] = defaultdict(list)
    for r in recs:
        if r.sha256 and not r.skipped:
            by_hash[r.sha256].append(r.name)
    dupes = [names for names in by_hash.values() if len(names) > 1]
    skipped = Counter(r.skipped for r in recs if r.skipped)
    bucket_hist = histogram((r.bucket for r in ok), buckets)
    with open(out / "images.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "width", "height", "aspect", "bucket", "caption_chars", "sha256", "skipped"])
        for r in recs:
            bucket = f"{buckets[r.bucket][0]}x{buckets[r.bucket][1]}" if r.bucket >= 0 else ""
            w.writerow([r.name, r.width, r.height, f"{r.width / r.height:.3f}" if r.height else "", bucket,
                        r.caption_chars if not r.skipped else "", r.sha256, r.skipped])
    pngs = _plots(ok, bucket_hist, out)
    captioned = [r for r in ok if r.caption_chars > 0]
    lines = [f"# Data report: data={cfg.name}", "",
             f"- inputs: {len(recs)}; readable: {len(ok)}; unreadable: {len(recs) - len(ok)}",
             f"- unreadable by reason: {dict(skipped) or 'none'}",
             f"- conversions training would count (caption_too_long needs the text encoder: not checked here): "
             f"{ {k: v for k, v in totals.items() if k in CONVERT_REASONS} or 'none'}",
             f"- captions: {len(captioned)} of {len(ok)} readable images have a non-empty caption"
             + (f"; length (characters) min {min(r.caption_chars for r in captioned)}, "
                f"median {sorted(r.caption_chars for r in captioned)[len(captioned) // 2]}, "
                f"max {max(r.caption_chars for r in captioned)}" if captioned else ""),
             f"- duplicates by content (SHA-256): {len(dupes)} groups, {sum(len(d) - 1 for d in dupes)} extra copies",
             "", f"## Buckets (area ≈ {cfg.resolution}², sides multiples of {buckets_multiple(buckets)}, "
             f"aspect w/h in {list(cfg.get('bucket_aspect_range', [0.5, 2.0]))}; "
             f"data.aspect_buckets={bool(cfg.get('aspect_buckets', False))})", "",
             "| bucket (h×w) | images |", "|---|---|", *(f"| {k} | {v} |" for k, v in bucket_hist.items()), ""]
    if skipped:
        lines += ["## Unreadable files", "", *(f"- `{r.name}`: {r.skipped}" for r in recs if r.skipped), ""]
    if dupes:
        lines += ["## Duplicates", "", *(f"- {', '.join(f'`{n}`' for n in d)}" for d in dupes), ""]
    lines += ["## Histograms", "", *(f"![{p.stem}]({p.name})" for p in pngs), ""]
    (out / "report.md").write_text("\n".join(lines))
    return {"inputs": len(recs), "readable": len(ok), "unreadable": dict(skipped), "duplicate_groups": len(dupes),
            "buckets": bucket_hist, "counts": totals, "report": str(out / "report.md")}


def buckets_multiple(buckets: list[tuple[int, int]]) -> int:
    from math import gcd

    g = 0
    for h, w in buckets:
        g = gcd(gcd(g, h), w)
    return g


def _plots(ok: list[Record], bucket_hist: dict[str, int], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figs = {
        "sizes": ("shorter side (px)", [min(r.width, r.height) for r in ok]),
        "aspects": ("aspect w/h (log scale bins)", [r.width / r.height for r in ok]),
        "captions": ("caption length (characters)", [r.caption_chars for r in ok]),
    }
    paths = []
    for stem, (label, values) in figs.items():
        fig, ax = plt.subplots(figsize=(5, 3))
        if stem == "aspects" and values:
            import numpy as np

            ax.hist(values, bins=np.geomspace(min(values), max(values) * 1.001 + 1e-9, 20))
            ax.set_xscale("log")
        else:
            ax.hist(values, bins=20)
        ax.set_xlabel(label)
        ax.set_ylabel("images")
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png")
        plt.close(fig)
        paths.append(out / f"{stem}.png")
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(list(bucket_hist), list(bucket_hist.values()))
    ax.set_xlabel("bucket (h×w)")
    ax.set_ylabel("images")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(out / "buckets.png")
    plt.close(fig)
    return [*paths, out / "buckets.png"]


def run(cfg: DictConfig) -> dict:
    d = cfg.data
    buckets = config_buckets(d, size_multiple(cfg), force=True)  # the report shows them with buckets on or off
    out = Path(cfg.inspect.out) if cfg.inspect.get("out") else run_dir(cfg) / "inspect"
    report = inspect_inputs(d, buckets, cfg.inspect.get("limit"))
    metrics = write_report(report, out, d, buckets)
    log.info("inspected %d inputs (%d readable); unreadable %s; %d duplicate groups; report: %s", metrics["inputs"],
             metrics["readable"], metrics["unreadable"] or "none", metrics["duplicate_groups"], metrics["report"])
    return metrics
