"""The f ablation report of a sweep folder: ablation.md (rows f × regularizer), PNG plots against f, wandb.

Every job of a multirun leaves `metrics.json` and `.hydra/config.yaml` in its folder; this module only reads
them. It runs as a Hydra callback when a multirun ends and as `python scripts/ablation_report.py <sweep dir>`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ldm_train.utils.io import atomic_write_text

log = logging.getLogger(__name__)

# (column title, exact keys in order of preference, prefix of the variants): a cell shows the first key a job has,
# and the header names the keys found, so a random-feature variant never borrows the published metric's name.
COLUMNS = [("recon PSNR (dB)", ["recon_psnr", "psnr"], None), ("recon SSIM", ["recon_ssim", "ssim"], None),
           ("LPIPS variant", ["recon_lpips", "lpips"], ("recon_lpips_", "lpips_")),
           ("rFID variant", ["rfid"], ("rfd_",)), ("generation FID variant", ["fid"], ("fd_",)),
           ("caption alignment", ["caption_alignment", "caption_alignment_cfg"], None)]
TIMES = [("stage-1 train (s)", "autoencoder_train_seconds"), ("stage-1 ms/step", "autoencoder_ms_per_step"),
         ("stage-2 train (s)", "diffusion_train_seconds"), ("stage-2 ms/step", "diffusion_ms_per_step")]


def collect(sweep: Path) -> tuple[list[dict], list[str]]:
    """(rows, skipped): one row per job folder holding metrics.json; folders without it are listed, not hidden."""
    rows, skipped = [], []
    for job in sorted(p for p in Path(sweep).iterdir() if (p / ".hydra" / "config.yaml").exists()):
        if not (job / "metrics.json").exists():
            skipped.append(job.name)  # a failed or unfinished job
            continue
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        metrics = json.loads((job / "metrics.json").read_text())
        if cfg.stage in ("autoencoder", "diffusion") and metrics.get("steps"):  # a single-stage sweep
            metrics.setdefault(f"{cfg.stage}_train_seconds", metrics.get("train_seconds"))
            metrics.setdefault(f"{cfg.stage}_ms_per_step", 1000 * metrics.get("train_seconds", 0) / metrics["steps"])
        rows.append({"job": job.name, "f": int(cfg.f), "regularizer": str(cfg.regularizer.name),
                     "stage": str(cfg.stage), "logger": OmegaConf.to_container(cfg.logger), "metrics": metrics,
                     # the stage-2 choices of issue 19's sweeps (absent in configs from before them)
                     "backbone": str(OmegaConf.select(cfg, "unet.kind", default="unet")),
                     "objective": str(OmegaConf.select(cfg, "diffusion.objective", default="ddpm"))})
    rows.sort(key=lambda r: (r["regularizer"], r["f"]))
    return rows, skipped


def pick(metrics: dict, keys: list[str], prefixes: tuple[str, ...] | None) -> tuple[str, float] | None:
    """(key, value) of the first of `keys` present, else of the first key starting with one of `prefixes`."""
    candidates = keys + sorted(k for k in metrics if prefixes and k.startswith(prefixes))
    for key in candidates:
        if isinstance(metrics.get(key), (int, float)) and not isinstance(metrics.get(key), bool):
            return key, float(metrics[key])
    return None


def table(rows: list[dict]) -> tuple[list[str], list[list[str]], dict[str, dict]]:
    """(header, cells, series) where series[column] = {regularizer: [(f, value), ...]} for the plots."""
    header = ["f", "regularizer"]
    cells = [[str(r["f"]), r["regularizer"]] for r in rows]
    series: dict[str, dict] = {}
    for title, keys, prefix in COLUMNS:
        found = [pick(r["metrics"], keys, prefix) for r in rows]
        used = sorted({k for k, _ in filter(None, found)})
        named = f"{title} [{' / '.join(used)}]" if used and (prefix or len(keys) > 1) else title
        header.append(named)
        for cell, hit, r in zip(cells, found, rows):
            cell.append("—" if hit is None else f"{hit[1]:.4g}" + (f" ({hit[0]})" if len(used) > 1 else ""))
            if hit is not None:
                series.setdefault(named, {}).setdefault(r["regularizer"], []).append((r["f"], hit[1]))
    for title, key in TIMES:
        header.append(title)
        for cell, r in zip(cells, rows):
            value = r["metrics"].get(key)
            cell.append("—" if value is None else f"{value:.0f}")
            if value is not None:
                series.setdefault(title, {}).setdefault(r["regularizer"], []).append((r["f"], float(value)))
    header.append("job")
    for cell, r in zip(cells, rows):
        cell.append(r["job"] + (" (stage 1 reused)" if r["metrics"].get("autoencoder_reused") else ""))
    return header, cells, series


def markdown(sweep: Path, rows: list[dict], skipped: list[str], plots: list[Path], plot_note: str) -> str:
    header, cells, _ = table(rows)
    lines = [f"# Ablation over f: {Path(sweep).name}", "",
             f"{len(rows)} job(s) with metrics" + (f"; {len(skipped)} without metrics.json (failed or unfinished): "
                                                   f"{', '.join(skipped)}" if skipped else "") + ".",
             "Metric names follow the networks used: `fid`/`rfid` only with InceptionV3, `lpips` only with the "
             "ImageNet backbone; `fd_shapes`, `lpips_rand<net>` are not comparable to published numbers.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    lines += ["", plot_note] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(sweep: Path, wandb_summary: bool | None = None) -> Path | None:
    """ablation.md + plots in `sweep`; None when no job has metrics. `wandb_summary=None`: when the jobs used wandb."""
    from ldm_train.evaluation.plots import plot_series

    sweep = Path(sweep)
    rows, skipped = collect(sweep)
    if not rows:
        log.warning("no job in %s has metrics.json (%d without): no ablation report", sweep, len(skipped))
        return None
    _, _, series = table(rows)
    plots = []
    for title, by_reg in series.items():
        path = sweep / f"ablation_{_slug(title)}.png"
        plot_series(title, by_reg, path)
        plots.append(path)
    note = f"{len(plots)} plot(s) against f (PIL drawing; matplotlib is not a dependency)."
    out = sweep / "ablation.md"
    atomic_write_text(out, markdown(sweep, rows, skipped, plots, note))
    log.info("ablation report: %s (%d rows, %d plots)", out, len(rows), len(plots))
    logger = rows[0]["logger"]
    if wandb_summary or (wandb_summary is None and logger.get("name") == "wandb"):
        log_to_wandb(sweep, rows, plots, logger)
    return out


def log_to_wandb(sweep: Path, rows: list[dict], plots: list[Path], logger: dict) -> None:
    """A summary run in the sweep's wandb group: the table, and the plots as images."""
    import wandb

    from ldm_train.lit.trainer import wandb_mode

    header, cells, _ = table(rows)
    run = wandb.init(project=logger.get("project", "ldm_train"), group=logger.get("group") or sweep.name,
                     job_type="ablation", name=f"ablation-{sweep.name}", dir=str(sweep),
                     mode=wandb_mode(logger.get("mode", "auto")), reinit="finish_previous",
                     config={"jobs": [r["job"] for r in rows]})
    run.log({"ablation/table": wandb.Table(columns=header, data=cells),
             **{f"ablation/{p.stem}": wandb.Image(str(p)) for p in plots}})
    run.finish()


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:48]


class AblationReportCallback(Callback):
    """Hydra callback: write the report into the sweep folder when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        try:
            write_report(sweep)
        except Exception:  # the jobs' results are safe on disk; the report can be rebuilt on demand
            log.exception("ablation report failed; rebuild it with `python scripts/ablation_report.py %s`", sweep)
