"""The ablation report: generation metrics over a fixed set, quality curves during training, figures with labelled
axes, rows of failed and never-run jobs, the wandb summary run (offline)."""

import json
import statistics
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from ldm_train.evaluation import plots
from ldm_train.evaluation.ablation import (
    AUTOENCODER,
    GENERATION,
    collect,
    quality_curves,
    sample_rows,
    table,
    write_report,
)
from ldm_train.evaluation.generation import generation_metrics, over_seeds
from ldm_train.evaluation.metric_info import current_name, metric_info
from ldm_train.evaluation.quality import QualityMonitor, read_quality
from ldm_train.evaluation.sweep import expand_jobs, group_name, record_failure, upload_command


def fake_job(sweep, num: int, overrides: list[str], metrics: dict | None, quality: list[dict] = (),
             logger: str = "none", choices: dict | None = None) -> None:
    """A job folder as Hydra and the pipeline leave it; `overrides` also set the config (`unet=` the choice,
    `diffusion.objective=`, `autoencoder.z_channels=`), `choices` is hydra.yaml's runtime.choices."""
    values = dict(o.split("=", 1) for o in overrides)
    f = int(values.get("f", 4))
    folder = sweep / f"{num}_pipeline_kl_f{f}"
    (folder / ".hydra").mkdir(parents=True)
    unet = values.get("unet", "small")
    diffusion = {"objective": values.get("diffusion.objective", "ddpm"),
                 "prediction_type": values.get("diffusion.prediction_type", "eps"), "schedule": "scaled_linear",
                 "num_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                 "flow": {"shift": 1.0, "logit_mean": 0.0, "logit_std": 1.0, "time_scale": 1000}}
    cfg = {"f": f, "stage": "pipeline", "regularizer": {"name": "kl"}, "prompt": ["a red circle", "a blue square"],
           "sampling": {"sampler": "ddim", "steps": 4}, "logger": {"name": logger, "project": "t", "mode": "offline"},
           "unet": {"kind": "dit" if unet.startswith("dit") else "unet"}, "diffusion": diffusion,
           "autoencoder": {"z_channels": int(values["autoencoder.z_channels"]) if "autoencoder.z_channels" in values
                           else None}}
    OmegaConf.save(OmegaConf.create(cfg), folder / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), folder / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"runtime": {"choices": choices or {"unet": unet}}}}),
                   folder / ".hydra" / "hydra.yaml")
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    if quality:
        (folder / "quality.jsonl").write_text("".join(json.dumps(q) + "\n" for q in quality))
    (folder / "samples").mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (60 * i, 100, 200)).save(folder / "samples" / f"{i:02d}_prompt_{i}_0.png")


def three_jobs(sweep) -> None:
    """f=4 and f=8 finished (with curves), f=16 failed; sweep.json plans a fourth job that never started."""
    jobs = [["stage=pipeline", f"f={f}"] for f in (4, 8, 16, 32)]
    (sweep / "sweep.json").write_text(json.dumps({"group": "f=4,8,16,32 @x", "swept": ["f"], "jobs": jobs}))
    for num, (f, fd) in enumerate([(4, 55.0), (8, 40.0)]):
        fake_job(sweep, num, jobs[num], {"recon_psnr": 33.0 - f, "recon_ssim": 0.9, "recon_lpips_randalex": 0.01,
                                         "rfd_shapes": 3.0 * f, "fd_shapes": fd, "fd_shapes_std": 2.0,
                                         "caption_alignment": 0.9, "eval_samples_per_second": 10.0 * f,
                                         "diffusion_ms_per_step": 300.0 / f},
                 [{"step": s, "fd_shapes": fd + 100 / s, "caption_alignment": 0.5, "samples": 8} for s in (2, 4)])
    fake_job(sweep, 2, jobs[2], None)
    record_failure(sweep / "2_pipeline_kl_f16", ValueError("latent health check failed: std 40\nsecond line"))


def test_generation_metrics_loop(shapes_features):
    from ldm_train.data.shapes import ShapesDataset, caption_alignment
    from ldm_train.evaluation.features import load_shapes_features
    from ldm_train.evaluation.metrics import frechet, unit

    features = load_shapes_features(shapes_features["path"], train_if_missing=False)
    ds = ShapesDataset(32, 24, "test", seed=5)
    items = [ds[i] for i in range(24)]
    real = [{"image": torch.stack([x["image"] for x in items[i:i + 12]]),
             "caption": [x["caption"] for x in items[i:i + 12]]} for i in (0, 12)]
    other = ShapesDataset(32, 24, "val", seed=6)
    fake = [torch.stack([other[i]["image"] for i in range(j, j + 12)]) for j in (0, 12)]
    calls = []

    def gen(captions, i):
        calls.append((list(captions), i))
        return fake[i]

    out = generation_metrics(gen, real, features, caption_alignment)
    assert calls == [(b["caption"], i) for i, b in enumerate(real)]  # the fixed captions, batch index = seed offset
    assert out["samples"] == 24 and out["samples_per_second"] > 0
    direct = frechet(features)  # the same sets, fed straight to the Fréchet machinery
    for b, x in zip(real, fake):
        direct.update(unit(b["image"]), real=True)
        direct.update(unit(x), real=False)
    assert out["fd_shapes"] == pytest.approx(float(direct.compute()), rel=1e-6)
    expected = sum(caption_alignment(fake[i], real[i]["caption"]) for i in range(2)) / 2  # equal batch sizes
    assert out["caption_alignment"] == pytest.approx(expected)
    assert "fid" not in out  # a substituted feature network never earns the published name


def test_over_seeds_mean_and_sample_std():
    runs = [{"fd_shapes": 10.0, "samples": 8}, {"fd_shapes": 14.0, "samples": 8}, {"fd_shapes": 9.0, "samples": 8}]
    out = over_seeds(runs)
    assert out["fd_shapes"] == pytest.approx(11.0) and out["seeds"] == 3 and out["samples"] == 8
    assert out["fd_shapes_std"] == pytest.approx(statistics.stdev([10.0, 14.0, 9.0]))
    assert "samples_std" not in out and "fd_shapes_std" not in over_seeds(runs[:1])


def test_metric_directions_and_units():
    assert metric_info("fd_shapes").label() == "fd_shapes, ↓ lower is better"
    assert metric_info("recon_psnr").label("\n") == "recon_psnr (dB)\n↑ higher is better"
    assert metric_info("caption_alignment_cfg").higher_is_better and not metric_info("rfd_shapes").higher_is_better
    assert metric_info("eval_samples_per_second").unit == "samples/s"
    assert metric_info("something_new").higher_is_better is None  # no direction is guessed


def test_quality_monitor_logs_every_n_steps_and_at_the_end(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    denoiser, text = nn.Linear(2, 2), nn.Linear(2, 2)
    seen_modes = []

    def evaluate(pipe):
        seen_modes.append((pipe.denoiser.training, pipe.text_encoder.training))
        return {"fd_shapes": 100.0 / trainer.global_step, "caption_alignment": 0.1 * trainer.global_step}

    logger = CSVLogger(tmp_path, name="csv", version="diffusion")
    trainer = SimpleNamespace(global_step=0, is_global_zero=True, loggers=[logger])
    module = SimpleNamespace(ema_pipeline=lambda: SimpleNamespace(denoiser=denoiser, text_encoder=text))
    monitor = QualityMonitor(2, evaluate, tmp_path / "quality.jsonl")
    for step in range(1, 6):
        trainer.global_step = step
        monitor.on_train_batch_end(trainer, module, None, None, step)
    monitor.on_train_end(trainer, module)
    logger.save()
    records, bad = read_quality(tmp_path / "quality.jsonl")
    assert bad == 0 and [r["step"] for r in records] == [2, 4, 5]
    assert records[-1]["fd_shapes"] == pytest.approx(20.0)
    assert seen_modes == [(False, False)] * 3 and denoiser.training and text.training  # eval mode, then restored
    rows = (tmp_path / "csv" / "diffusion" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    steps = [int(r.split(",")[header.index("step")]) for r in rows[1:]]
    assert "eval/fd_shapes" in header and "eval/caption_alignment" in header and steps == [2, 4, 5]


def test_figures_label_axes_with_honest_names_and_directions(tmp_path):
    curves = {"fd_shapes": {"f=4": [(2, 50.0, None), (4, 40.0, None)], "f=8": [(2, 60.0, None), (4, 55.0, None)]}}
    fig = plots.curves_figure(curves, samples=64)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "stage-2 training step (optimizer steps)"
    assert ax.get_ylabel() == "fd_shapes\n↓ lower is better"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["f=4", "f=8"]
    assert list(ax.lines[0].get_xdata()) == [2, 4] and list(ax.lines[1].get_ydata()) == [60.0, 55.0]

    fig = plots.speed_figure({"caption_alignment": {"f=4": (10.0, 0.9, 0.02), "f=8": (30.0, 0.7, None)}}, "ddim 50")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "sampling throughput (samples/s), → faster\nddim 50"
    assert ax.get_ylabel() == "caption_alignment (fraction of samples)\n↑ higher is better"

    fig = plots.bars_figure({"recon_psnr": {"f=4": (33.0, None), "f=8": (29.0, None)}}, "autoencoder")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["f=4", "f=8"] and "(dB)" in ax.get_ylabel()
    assert [round(b.get_height(), 3) for b in ax.patches] == [33.0, 29.0]
    path = plots.save_figure(fig, tmp_path / "bars.png")
    assert Image.open(path).format == "PNG" and path.stat().st_size > 5000


def test_report_rows_failed_and_never_run_jobs(tmp_path):
    three_jobs(tmp_path)
    rows = collect(tmp_path)
    assert [(r["label"], r["status"]) for r in rows] == [("f=4", "ok"), ("f=8", "ok"), ("f=16", "failed"),
                                                         ("f=32", "not run")]
    assert rows[2]["reason"] == "ValueError: latent health check failed: std 40"
    header, cells, _ = table(rows, GENERATION)
    # the latent channels follow f (the architecture table: 3 at f=4, 4 at f=8); the prediction does not vary
    assert header[:6] == ["row", "f", "backbone", "objective", "z_channels", "FD [fd_shapes]"]
    assert cells[0][:6] == ["f=4", "4", "small", "ddpm", "3", "55 ± 2"]
    assert cells[1][4] == "4" and cells[2][5] == "—"
    header, _, values = table(rows, AUTOENCODER)
    assert "LPIPS variant [recon_lpips_randalex]" in header and not any("[fid]" in h or "[rfid]" in h for h in header)
    assert values["recon_psnr"] == {"f=4": (29.0, None), "f=8": (25.0, None)}

    text = write_report(tmp_path, wandb_summary=False).read_text()
    assert "# Ablation: f=4,8,16,32 @x" in text
    assert "| row | status | f | backbone | objective | z_channels | job |" in text
    assert "| f=16 | failed: ValueError: latent health check failed: std 40 | 16 | small | ddpm | 16 | " \
           "2_pipeline_kl_f16 |" in text
    assert "| f=32 | not run: the sweep stopped before this job | 32 | — | — | — | 3 (not started) |" in text
    for name in ("curves", "speed", "autoencoder", "samples"):
        png = tmp_path / f"ablation_{name}.png"
        assert f"(ablation_{name}.png)" in text and png.stat().st_size > 5000 and Image.open(png).format == "PNG"


def backbone_objective_sweep(sweep) -> list[list[str]]:
    """`-m stage=pipeline unet=small,dit_tiny diffusion.objective=ddpm,flow` at one f: three jobs finished (with
    curves and samples), the last one failed. Every job folder is `<n>_pipeline_kl_f4`: only the number differs."""
    jobs, swept = expand_jobs(["stage=pipeline", "unet=small,dit_tiny", "diffusion.objective=ddpm,flow"])
    (sweep / "sweep.json").write_text(json.dumps({"group": "g", "swept": swept, "jobs": jobs}))
    for num, overrides in enumerate(jobs[:3]):
        fake_job(sweep, num, overrides, {"recon_psnr": 30.0, "fd_shapes": 50.0 - num, "caption_alignment": 0.5,
                                         "eval_samples_per_second": 10.0 + num},
                 [{"step": s, "fd_shapes": 60.0 - num - s, "samples": 8} for s in (2, 4)])
    fake_job(sweep, 3, jobs[3], None)
    record_failure(sweep / "3_pipeline_kl_f4", RuntimeError("DiT ran out of memory"))
    return jobs


def test_report_one_table_for_a_backbone_and_objective_sweep(tmp_path):
    backbone_objective_sweep(tmp_path)
    rows = collect(tmp_path)
    labels = ["small · ddpm", "small · flow", "dit_tiny · ddpm", "dit_tiny · flow"]
    assert [r["label"] for r in rows] == labels
    header, cells, values = table(rows, GENERATION)
    # prediction varies (ε for ddpm, the velocity for flow), f, the regularizer and z_channels do not
    assert header[:6] == ["row", "f", "backbone", "objective", "prediction", "FD [fd_shapes]"]
    assert [c[1:5] for c in cells] == [["4", "small", "ddpm", "eps"], ["4", "small", "flow", "velocity"],
                                       ["4", "dit_tiny", "ddpm", "eps"], ["4", "dit_tiny", "flow", "velocity"]]
    assert [c[5] for c in cells] == ["50", "49", "48", "—"]
    assert values["fd_shapes"] == {labels[i]: (50.0 - i, None) for i in range(3)}  # one value per job, none merged
    # the figures: one line, one bar, one sample row per finished job
    curves = quality_curves(rows)["fd_shapes"]
    assert list(curves) == labels[:3] and curves[labels[2]] == [(2, 56.0, None), (4, 54.0, None)]
    ax = plots.curves_figure(quality_curves(rows)).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == labels[:3]
    _, _, ae = table(rows, AUTOENCODER)
    ax = plots.bars_figure(ae, "autoencoder").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == labels[:3]
    assert list(sample_rows(rows)[0]) == labels[:3]

    text = write_report(tmp_path, wandb_summary=False).read_text()
    assert "| row | status | f | backbone | objective | prediction | job |" in text
    assert "| dit_tiny · flow | failed: RuntimeError: DiT ran out of memory | 4 | dit_tiny | flow | velocity | " \
           "3_pipeline_kl_f4 |" in text
    assert "| small · flow | 4 | small | flow | velocity | 30 |" in text  # the autoencoder table has them too


def test_report_z_channels_column_and_repeated_jobs(tmp_path):
    """SD3's latent-channel ablation (`-m autoencoder.z_channels=3,4`) gets a z_channels column; a job repeated with
    the same swept values (`-m seed=0,0`) keeps its own row and line."""
    jobs = [["stage=pipeline", f"autoencoder.z_channels={z}"] for z in (3, 4)]
    sweep = tmp_path / "z"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"group": "g", "swept": ["autoencoder.z_channels"], "jobs": jobs}))
    for num, overrides in enumerate(jobs):
        fake_job(sweep, num, overrides, {"recon_psnr": 28.0 + num, "fd_shapes": 9.0})
    rows = collect(sweep)
    header, cells, _ = table(rows, AUTOENCODER)
    assert [r["label"] for r in rows] == ["z=3", "z=4"]
    assert header[:6] == ["row", "f", "backbone", "objective", "z_channels", "recon PSNR [recon_psnr]"]
    assert [c[4:6] for c in cells] == [["3", "28"], ["4", "29"]]
    unset = collect(tmp_path / "z")  # z_channels=null takes the architecture table's value (3 at f=4, KL)
    assert unset[0]["setup"]["z_channels"] == 3

    sweep = tmp_path / "repeat"
    sweep.mkdir()
    for num in range(2):  # no sweep.json: the swept keys are read from the overrides
        fake_job(sweep, num, ["stage=pipeline", "seed=0", f"diffusion.lr={num}"], {"fd_shapes": 9.0 + num},
                 [{"step": 2, "fd_shapes": 9.0 + num}])
    rows = collect(sweep)
    assert [r["label"] for r in rows] == ["diffusion.lr=0", "diffusion.lr=1"]
    for num in range(2):
        OmegaConf.save(OmegaConf.create(["stage=pipeline", "seed=0"]),
                       sweep / f"{num}_pipeline_kl_f4" / ".hydra" / "overrides.yaml")
    (sweep / "sweep.json").write_text(json.dumps({"group": "g", "swept": ["seed"], "jobs": [["seed=0"]] * 2}))
    rows = collect(sweep)
    assert [r["label"] for r in rows] == ["seed=0 #0", "seed=0 #1"]
    assert quality_curves(rows)["fd_shapes"] == {"seed=0 #0": [(2, 9.0, None)], "seed=0 #1": [(2, 10.0, None)]}


def test_old_metric_names_are_read_under_the_current_ones(tmp_path):
    """Stage 1 once wrote `psnr`, `ssim`, `lpips_rand<net>`: an old sweep folder reports them as recon_*."""
    assert [current_name(k) for k in ("psnr", "ssim", "l1", "lpips", "lpips_randalex")] == [
        "recon_psnr", "recon_ssim", "recon_l1", "recon_lpips", "recon_lpips_randalex"]
    assert [current_name(k) for k in ("recon_psnr", "fd_shapes", "rfd_shapes", "scale_factor")] == [
        "recon_psnr", "fd_shapes", "rfd_shapes", "scale_factor"]
    fake_job(tmp_path, 0, ["stage=autoencoder", "f=4"], {"psnr": 31.0, "ssim": 0.9, "lpips_randalex": 0.02})
    fake_job(tmp_path, 1, ["stage=autoencoder", "f=8"], {"recon_psnr": 27.0, "psnr": 1.0, "recon_ssim": 0.8})
    rows = collect(tmp_path)
    header, cells, _ = table(rows, AUTOENCODER)
    assert header[5:8] == ["recon PSNR [recon_psnr]", "recon SSIM [recon_ssim]",
                           "LPIPS variant [recon_lpips_randalex]"]  # after row, f, backbone, objective, z_channels
    assert [c[5:8] for c in cells] == [["31", "0.9", "0.02"], ["27", "0.8", "—"]]  # the current name wins


def test_report_to_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    three_jobs(tmp_path)
    for cfg_path in tmp_path.glob("*/.hydra/config.yaml"):  # these jobs used logger=wandb (offline)
        cfg = OmegaConf.load(cfg_path)
        cfg.logger.name = "wandb"
        OmegaConf.save(cfg, cfg_path)
    write_report(tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = runs[0] / "files" / "media"
    table_file = next(media.glob("table/ablation/table/generation_*.table.json"))
    data = json.loads(table_file.read_text())
    assert data["columns"][5] == "FD [fd_shapes]" and [row[0] for row in data["data"]] == ["f=4", "f=8", "f=16",
                                                                                          "f=32"]
    jobs = json.loads(next(media.glob("table/ablation/table/jobs_*.table.json")).read_text())
    assert jobs["columns"] == ["row", "f", "backbone", "objective", "z_channels", "status", "reason", "job"]
    assert jobs["data"][2][:6] == ["f=16", "16", "small", "ddpm", "16", "failed"]
    assert len(list(media.glob("table/ablation/table/*.table.json"))) == 3  # jobs, autoencoder, generation
    curve = next(media.glob("table/ablation/curve/fd_shapes_table_*.table.json"))  # the native line plot's data
    assert json.loads(curve.read_text())["data"] == [[2, "f=4", 105.0], [4, "f=4", 80.0], [2, "f=8", 90.0],
                                                     [4, "f=8", 65.0]]
    assert len(list(media.glob("images/ablation/figure/*.png"))) == 4
    assert upload_command(tmp_path) == f"wandb sync {tmp_path}/wandb/offline-run-*"


def test_sweep_expansion_and_group_name(tmp_path):
    jobs, swept = expand_jobs(["stage=pipeline", "f=4,8", "regularizer=kl,vq"])
    assert swept == ["f", "regularizer"] and len(jobs) == 4
    assert jobs[1] == ["stage=pipeline", "f=4", "regularizer=vq"]
    name = group_name(["stage=pipeline", "f=4,8", "paths.artifacts=/x", "diffusion.lr=1"], ["f"],
                      tmp_path / "2026-11-30_01-00-00")
    assert name == "f=4,8 stage=pipeline @2026-11-30_01-00-00"


def test_wandb_runs_named_grouped_and_summarised(compose_cfg, tmp_path, monkeypatch):
    import wandb

    from ldm_train.lit.trainer import build_logger, finish_logger

    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_cfg(["experiment=smoke", "logger=wandb", "logger.mode=offline", "logger.group=sweep_x", "f=8",
                       f"paths.run_dir={tmp_path}"])
    logger = build_logger(cfg, "evaluate")
    run = logger.experiment
    assert (run.name, run.group, run.job_type) == ("kl_f8-evaluate", "sweep_x", "evaluate")
    assert run.config["f"] == 8 and run.config["regularizer"]["name"] == "kl"
    seen, real_finish = {}, wandb.finish

    def finish(*args, **kwargs):  # look at the summary just before the run closes
        seen.update(dict(wandb.run.summary))
        real_finish(*args, **kwargs)

    monkeypatch.setattr(wandb, "finish", finish)
    finish_logger({"recon_psnr": 30.5, "nested": {"skipped": 1}})
    assert wandb.run is None  # closed: the next stage of a pipeline opens its own run
    assert seen["recon_psnr"] == 30.5 and "nested" not in seen


