"""The ablation report of a sweep folder: ablation.md, its figures, and a wandb summary run.

It only reads the job folders: `.hydra/config.yaml`, `.hydra/overrides.yaml` and `.hydra/hydra.yaml` (the options
chosen), `metrics.json` (a finished job), `failure.json` (a failed one, see `sweep.py`), `quality.jsonl` (stage-2
quality against the step) and `samples/*.png` (the same prompts and seeds in every job). Rows are labelled by the
swept overrides (`f=8 · dit_tiny · flow`); every table shows what the rows trained (f, backbone, objective, and the
regularizer, prediction type and latent channels when they differ).
Run by the Hydra callback at the end of a sweep, and by `python -m ldm_train.report <sweep dir>`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ldm_train.evaluation.metric_info import with_current_names
from ldm_train.evaluation.quality import QUALITY_FILE, read_quality
from ldm_train.evaluation.sweep import FAILURE_FILE, read_sweep
from ldm_train.utils.io import atomic_write_text

log = logging.getLogger(__name__)

# (column title, exact keys in order of preference, prefixes of the variants): a cell shows the first key a job
# has, and the header names the keys found, so a random-feature variant never borrows the published metric's name.
AUTOENCODER = [("recon PSNR", ["recon_psnr"], None), ("recon SSIM", ["recon_ssim"], None),
               ("LPIPS variant", ["recon_lpips"], ("recon_lpips_",)), ("rFD", ["rfid"], ("rfd_",)),
               ("recon caption alignment", ["recon_caption_alignment"], None)]
GENERATION = [("FD", ["fid"], ("fd_",)), ("caption alignment", ["caption_alignment", "caption_alignment_cfg"], None),
              ("sampling throughput", ["eval_samples_per_second"], None)]
TIMES = [("stage-1 ms/step", "autoencoder_ms_per_step"), ("stage-2 ms/step", "diffusion_ms_per_step"),
         ("stage-2 train (s)", "diffusion_train_seconds")]
# what distinguishes the rows: column → the override that sets it; the first three columns are always shown, the
# others when they differ between jobs. LABEL_FORMAT: how a swept value reads in a row label.
SETUP = ["f", "backbone", "objective", "regularizer", "prediction", "z_channels"]
SETUP_ALWAYS = 3
SETUP_KEYS = {"f": "f", "unet": "backbone", "diffusion.objective": "objective", "regularizer": "regularizer",
              "diffusion.prediction_type": "prediction", "autoencoder.z_channels": "z_channels"}
LABEL_FORMAT = {"f": "f={}", "z_channels": "z={}", "prediction": "{}-pred"}
SAMPLE_COLUMNS = 8  # single sample PNGs per row in the sample figure


def collect(sweep: Path) -> list[dict]:
    """One row per job of the sweep, in job order: finished, failed (with the reason), unfinished, or never run.
    A row's label is its swept overrides (`f=8 · dit_tiny · flow`), unique within the sweep."""
    sweep = Path(sweep)
    info = read_sweep(sweep)
    folders = {int(p.name.split("_", 1)[0]): p for p in sweep.iterdir()
               if (p / ".hydra" / "config.yaml").exists() and p.name.split("_", 1)[0].isdigit()}
    planned = info.get("jobs") or [None] * (max(folders, default=-1) + 1)
    rows = []
    for num in sorted(set(range(len(planned))) | set(folders)):
        folder = folders.get(num)
        overrides = (list(OmegaConf.load(folder / ".hydra" / "overrides.yaml"))
                     if folder and (folder / ".hydra" / "overrides.yaml").exists() else planned[num] or [])
        rows.append({"num": num, "job": folder.name if folder else f"{num} (not started)", "folder": folder,
                     "overrides": [str(o) for o in overrides], **_job_state(folder)})
    swept = info.get("swept") or _varying_keys([r["overrides"] for r in rows])
    for r in rows:
        values = dict(o.split("=", 1) for o in r["overrides"] if "=" in o)
        r["label"] = " · ".join(label_part(k, values[k]) for k in swept if k in values) or r["job"]
        for key, value in values.items():  # a job that never started: what its overrides say it would train
            column = SETUP_KEYS.get(key.lstrip("+~"))
            if column and r["setup"].get(column) is None:
                r["setup"][column] = value
    seen: dict[str, int] = {}
    for r in rows:
        seen[r["label"]] = seen.get(r["label"], 0) + 1
    for r in rows:  # same swept values twice (`seed=0,0`): the job number keeps the figures' lines apart
        if seen[r["label"]] > 1:
            r["label"] += f" #{r['num']}"
    return rows


def label_part(key: str, value: str) -> str:
    """How one swept override reads in a row label: `f=8`, `z=4`, the option alone for `unet`, `regularizer`,
    `diffusion.objective` (`dit_tiny`, `vq`, `flow`), `v-pred`; any other key as typed (`diffusion.lr=1e-4`)."""
    column = SETUP_KEYS.get(key.lstrip("+~"))
    return LABEL_FORMAT.get(column, "{}").format(value) if column else f"{key}={value}"


def setup(cfg: DictConfig, choices: dict) -> dict:
    """What a job trained, from its composed config: f, regularizer, backbone (the `unet` option chosen),
    objective, prediction (what the denoiser predicts: eps | v | velocity) and the latent channels."""
    from ldm_train.config import autoencoder_arch
    from ldm_train.diffusion.parameterization import build_parameterization

    f, reg = cfg.get("f"), OmegaConf.select(cfg, "regularizer.name")
    out = {"f": f, "regularizer": reg, "backbone": choices.get("unet") or OmegaConf.select(cfg, "unet.kind"),
           "objective": OmegaConf.select(cfg, "diffusion.objective", default="ddpm"), "prediction": None,
           "z_channels": OmegaConf.select(cfg, "autoencoder.z_channels")}
    try:
        out["prediction"] = build_parameterization(OmegaConf.to_container(cfg.diffusion, resolve=True)).name
    except Exception:  # noqa: BLE001 - a folder from an older version: the cell stays empty
        log.debug("no parameterisation for %s", cfg.get("name"))
    if out["z_channels"] is None:
        try:
            out["z_channels"] = autoencoder_arch(f, reg)["z_channels"]
        except Exception:  # noqa: BLE001 - an unknown f/regularizer: the cell stays empty
            pass
    return out


def _job_state(folder: Path | None) -> dict:
    state = {"status": "not run", "reason": "the sweep stopped before this job", "metrics": {}, "quality": [],
             "config": {}, "setup": dict.fromkeys(SETUP)}
    if folder is None:
        return state
    cfg = OmegaConf.load(folder / ".hydra" / "config.yaml")
    hydra_file = folder / ".hydra" / "hydra.yaml"
    choices = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.choices", default={}) \
        if hydra_file.exists() else {}
    state["setup"] = setup(cfg, dict(choices or {}))
    state["config"] = {"f": cfg.get("f"), "regularizer": OmegaConf.select(cfg, "regularizer.name"),
                       "prompt": OmegaConf.select(cfg, "prompt"), "sampling": OmegaConf.select(cfg, "sampling"),
                       "logger": OmegaConf.select(cfg, "logger")}
    state["config"] = OmegaConf.to_container(OmegaConf.create(state["config"]), resolve=False)
    state["quality"], bad = read_quality(folder / QUALITY_FILE)
    if bad:
        log.warning("%s: %d unreadable line(s) in %s skipped", folder.name, bad, QUALITY_FILE)
    if (folder / "metrics.json").exists():
        metrics = with_current_names(json.loads((folder / "metrics.json").read_text()))  # a folder of any age
        if metrics.get("steps") and metrics.get("train_seconds") is not None:  # a single-stage sweep
            stage = OmegaConf.select(cfg, "stage")
            metrics.setdefault(f"{stage}_train_seconds", metrics["train_seconds"])
            metrics.setdefault(f"{stage}_ms_per_step", 1000 * metrics["train_seconds"] / metrics["steps"])
        return {**state, "status": "ok", "reason": "", "metrics": metrics}
    if (folder / FAILURE_FILE).exists():
        failure = json.loads((folder / FAILURE_FILE).read_text())
        first = (failure.get("message") or "").strip().splitlines()
        return {**state, "status": "failed", "reason": f"{failure.get('error')}: {first[0] if first else ''}"}
    return {**state, "status": "unfinished", "reason": "no metrics.json and no failure.json (still running or killed)"}


def _varying_keys(override_lists: list[list[str]]) -> list[str]:
    """The keys whose value differs between jobs (the swept ones, when sweep.json is missing)."""
    values: dict[str, set] = {}
    for overrides in override_lists:
        for o in overrides:
            if "=" in o:
                k, v = o.split("=", 1)
                values.setdefault(k, set()).add(v)
    return [k for k, v in values.items() if len(v) > 1]


def pick(metrics: dict, keys: list[str], prefixes: tuple[str, ...] | None) -> str | None:
    """The first of `keys` holding a number, else the first key starting with one of `prefixes`."""
    candidates = keys + sorted(k for k in metrics if prefixes and k.startswith(prefixes) and not k.endswith("_std"))
    for key in candidates:
        if isinstance(metrics.get(key), (int, float)) and not isinstance(metrics.get(key), bool):
            return key
    return None


def value(metrics: dict, key: str) -> tuple[float, float | None]:
    """(mean, spread): `<key>_std` is the standard deviation over `eval.seeds` when there were several."""
    std = metrics.get(f"{key}_std")
    return float(metrics[key]), (float(std) if isinstance(std, (int, float)) else None)


def _cell(metrics: dict, key: str | None) -> str:
    if key is None:
        return "—"
    mean, std = value(metrics, key)
    return f"{mean:.4g}" + (f" ± {std:.2g}" if std is not None else "")


def setup_columns(rows: list[dict]) -> list[str]:
    """The setup columns a table shows: f, backbone and objective, and each other one whose value differs between
    jobs (z_channels in SD3's latent-channel ablation, the regularizer, the prediction type)."""
    def varies(column: str) -> bool:
        return len({str(r["setup"].get(column)) for r in rows if r["setup"].get(column) is not None}) > 1

    return SETUP[:SETUP_ALWAYS] + [c for c in SETUP[SETUP_ALWAYS:] if varies(c)]


def lead(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The first columns of every table: the row label and the setup columns."""
    shown = setup_columns(rows)
    return ["row", *shown], [[r["label"]] + ["—" if r["setup"].get(c) is None else str(r["setup"][c]) for c in shown]
                             for r in rows]


def table(rows: list[dict], columns: list) -> tuple[list[str], list[list[str]], dict[str, dict]]:
    """(header, cells, values) for `columns` after the lead columns; values[key][label] = (mean, spread) for the
    figures."""
    (header, cells), values = lead(rows), {}
    for title, keys, prefixes in columns:
        found = [pick(r["metrics"], keys, prefixes) for r in rows]
        used = sorted({k for k in found if k})
        header.append(f"{title} [{' / '.join(used)}]" if used else title)
        for cell, key, r in zip(cells, found, rows):
            cell.append(_cell(r["metrics"], key) + (f" ({key})" if key and len(used) > 1 else ""))
            if key:
                values.setdefault(key, {})[r["label"]] = value(r["metrics"], key)
    return header, cells, values


def _md_table(header: list[str], cells: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(c) + " |" for c in cells]


def markdown(sweep: Path, rows: list[dict], figures: list[Path]) -> str:
    info = read_sweep(sweep)
    done = [r for r in rows if r["status"] == "ok"]
    lines = [f"# Ablation: {info.get('group') or Path(sweep).name}", "",
             f"{len(rows)} job(s): {len(done)} finished, {len(rows) - len(done)} without results.",
             "Metric names follow the networks used: `fid`/`rfid` only with InceptionV3, `lpips` only with the "
             "ImageNet backbone; `fd_shapes`, `lpips_rand<net>` are not comparable to published numbers. "
             "± is one standard deviation over `eval.seeds` sampling seeds.", "", "## Jobs", ""]
    first, firsts = lead(rows)
    lines += _md_table([first[0], "status", *first[1:], "job"],
                       [[c[0], r["status"] + (f": {r['reason']}" if r["reason"] else ""), *c[1:], r["job"]]
                        for c, r in zip(firsts, rows)])
    times = [c + [f"{r['metrics'][k]:.0f}" if isinstance(r["metrics"].get(k), (int, float)) else "—"
                  for _, k in TIMES] for c, r in zip(firsts, rows)]
    for title, columns, direction in (
            ("Autoencoder (stage 1)", AUTOENCODER, "PSNR, SSIM ↑ higher is better; LPIPS variant, rFD ↓ lower"),
            ("Generation (stage 2, final EMA model)", GENERATION, "FD ↓ lower is better; caption alignment, "
                                                                  "samples/s ↑ higher")):
        header, cells, _ = table(rows, columns)
        lines += ["", f"## {title}", "", direction + ".", ""] + _md_table(header, cells)
    lines += ["", "## Cost", ""] + _md_table(first + [t for t, _ in TIMES], times)
    lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures]
    return "\n".join(lines) + "\n"


def quality_curves(rows: list[dict]) -> dict[str, dict[str, list]]:
    """curves[metric][label] = [(step, value, None), ...] from the jobs' quality.jsonl (stage-2 training)."""
    curves: dict[str, dict] = {}
    for r in rows:
        for rec in r["quality"]:
            for key, v in rec.items():
                if key not in ("step", "samples", "samples_per_second") and isinstance(v, (int, float)):
                    curves.setdefault(key, {}).setdefault(r["label"], []).append((rec["step"], v, None))
    return curves


def figures(sweep: Path, rows: list[dict]) -> dict[str, Path]:
    """The report's PNGs in the sweep folder (those with data): curves, speed, autoencoder, samples."""
    from ldm_train.evaluation import plots

    sweep, out = Path(sweep), {}
    curves = quality_curves(rows)
    if curves:
        n = next((rec.get("samples") for r in rows for rec in r["quality"]), None)
        out["curves"] = plots.save_figure(plots.curves_figure(curves, n), sweep / "ablation_curves.png")
    _, _, gen = table(rows, GENERATION)
    speed = gen.pop("eval_samples_per_second", {})
    points = {k: {label: (speed[label][0], *v) for label, v in by.items() if label in speed} for k, by in gen.items()}
    points = {k: v for k, v in points.items() if v}
    if points:
        sampling = next((r["config"].get("sampling") for r in rows if r["config"].get("sampling")), None) or {}
        sampler = ", ".join(f"{k} {sampling[k]}" for k in ("sampler", "steps", "guidance_scale") if k in sampling)
        out["speed"] = plots.save_figure(plots.speed_figure(points, sampler), sweep / "ablation_speed.png")
    _, _, ae = table(rows, AUTOENCODER)
    if ae:
        out["autoencoder"] = plots.save_figure(plots.bars_figure(ae, "autoencoder"), sweep / "ablation_autoencoder.png")
    samples, titles = sample_rows(rows)
    if samples:
        out["samples"] = plots.save_figure(plots.samples_figure(samples, titles), sweep / "ablation_samples.png")
    return out


def sample_rows(rows: list[dict]) -> tuple[dict[str, list[Path]], list[str]]:
    """Each finished job's single sample PNGs (`NN_<prompt>_K.png`, the same prompts and seeds in every job) and
    the column titles (the prompts)."""
    samples, titles = {}, []
    for r in rows:
        folder = r["folder"]
        files = sorted(p for p in (folder / "samples").glob("*.png") if re.match(r"\d+_.*_\d+\.png$", p.name)) \
            if folder and r["status"] == "ok" else []
        if not files:
            continue
        samples[r["label"]] = files[:SAMPLE_COLUMNS]
        if not titles:
            prompts = r["config"].get("prompt") or []
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            for p in files[:SAMPLE_COLUMNS]:
                i, k = int(p.name.split("_", 1)[0]), int(p.stem.rsplit("_", 1)[1])
                titles.append((prompts[i] if i < len(prompts) else p.stem) + (f" #{k}" if k else ""))
    return samples, titles


def write_report(sweep: Path, wandb_summary: bool | None = None) -> Path | None:
    """ablation.md + figures in `sweep`; None when the folder holds no job. `wandb_summary=None`: when the jobs
    used wandb."""
    sweep = Path(sweep)
    rows = collect(sweep)
    if not rows:
        log.warning("no job folder in %s: no ablation report", sweep)
        return None
    figs = figures(sweep, rows)
    out = sweep / "ablation.md"
    atomic_write_text(out, markdown(sweep, rows, list(figs.values())))
    log.info("ablation report: %s (%d rows, %d failed or missing, %d figures)", out, len(rows),
             sum(r["status"] != "ok" for r in rows), len(figs))
    logger = next((r["config"].get("logger") for r in rows if r["config"].get("logger")), None) or {}
    if wandb_summary or (wandb_summary is None and logger.get("name") == "wandb"):
        from ldm_train.evaluation.ablation_wandb import log_to_wandb

        log_to_wandb(sweep, rows, figs, logger)
    return out
