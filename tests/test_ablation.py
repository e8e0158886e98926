"""The ablation report: table and plots from job folders, a real `-m` pipeline sweep, the wandb summary run."""

import json
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf
from PIL import Image

from ldm_train.evaluation.ablation import collect, table, write_report

ROOT = Path(__file__).resolve().parents[1]


def fake_job(sweep: Path, name: str, f: int, reg: str, metrics: dict | None) -> None:
    (sweep / name / ".hydra").mkdir(parents=True)
    cfg = {"f": f, "stage": "pipeline", "regularizer": {"name": reg}, "logger": {"name": "wandb", "project": "t",
                                                                                  "mode": "offline"}}
    OmegaConf.save(OmegaConf.create(cfg), sweep / name / ".hydra" / "config.yaml")
    if metrics is not None:
        (sweep / name / "metrics.json").write_text(json.dumps(metrics))


def test_report_rows_columns_and_names(tmp_path):
    fake_job(tmp_path, "1_pipeline_kl_f8", 8, "kl", {"recon_psnr": 28.5, "recon_lpips_randalex": 0.02,
                                                      "fd_shapes": 40.0, "caption_alignment": 0.9,
                                                      "diffusion_ms_per_step": 120.0})
    fake_job(tmp_path, "0_pipeline_kl_f4", 4, "kl", {"recon_psnr": 33.0, "recon_lpips_randalex": 0.01,
                                                      "fd_shapes": 55.0, "caption_alignment": 0.8,
                                                      "diffusion_ms_per_step": 300.0})
    fake_job(tmp_path, "2_pipeline_vq_f4", 4, "vq", None)  # failed job: counted, not hidden
    rows, skipped = collect(tmp_path)
    assert [r["f"] for r in rows] == [4, 8] and skipped == ["2_pipeline_vq_f4"]
    assert {(r["backbone"], r["objective"]) for r in rows} == {("unet", "ddpm")}  # configs from before DiT/flow
    header, cells, series = table(rows)
    assert "generation FID variant [fd_shapes]" in header and "LPIPS variant [recon_lpips_randalex]" in header
    assert not any("[fid]" in h or "[recon_lpips]" in h for h in header)
    col = header.index("recon PSNR (dB) [recon_psnr]")
    assert [c[col] for c in cells] == ["33", "28.5"] and cells[0][header.index("rFID variant")] == "—"
    assert series["stage-2 ms/step"] == {"kl": [(4, 300.0), (8, 120.0)]}

    out = write_report(tmp_path, wandb_summary=False)
    text = out.read_text()
    assert text.count("| 4 | kl |") == 1 and text.count("| 8 | kl |") == 1 and "2_pipeline_vq_f4" in text
    plots = sorted(tmp_path.glob("ablation_*.png"))
    assert len(plots) == len(series) and Image.open(plots[0]).size == (480, 320)
    assert all(f"({p.name})" in text for p in plots)


def test_report_to_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    fake_job(tmp_path, "0_pipeline_kl_f4", 4, "kl", {"recon_psnr": 33.0, "fd_shapes": 55.0})
    fake_job(tmp_path, "1_pipeline_kl_f8", 8, "kl", {"recon_psnr": 28.5, "fd_shapes": 40.0})
    write_report(tmp_path)  # the jobs used logger=wandb (offline): a summary run of the sweep's group
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    tables = list(runs[0].glob("files/media/table/ablation/table_*.table.json"))
    data = json.loads(tables[0].read_text())
    assert [row[:2] for row in data["data"]] == [["4", "kl"], ["8", "kl"]]
    assert len(list(runs[0].glob("files/media/images/ablation/*.png"))) == 2  # recon PSNR and fd_shapes vs f


def test_multirun_pipeline_writes_ablation_report(tmp_path, shapes_features):
    """A real `-m` sweep over f=4,8 (tiny pipeline jobs); the Hydra callback writes the report at the end."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "ldm_train", "-m", "experiment=smoke", "stage=pipeline", "f=4,8",
           "autoencoder.max_steps=2", "autoencoder.val_every=2", "diffusion.max_steps=2", "diffusion.val_every=2",
           "diffusion.eval_samples=0", "n_per_prompt=1", "prompt=[a red circle on the left]", "sampling.steps=2",
           "eval.num_samples=4", "eval.batch_size=4", f"eval.features_path={shapes_features['path']}",
           f"paths.artifacts={tmp_path}/artifacts", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0_pipeline_kl_f4", "1_pipeline_kl_f8"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert {"recon_psnr", "rfd_shapes", "fd_shapes", "caption_alignment"} <= set(metrics)
    text = (sweep / "ablation.md").read_text()
    assert [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "kl" in line] \
        == ["4", "8"]
    assert len(list(sweep.glob("ablation_*.png"))) >= 6

    (sweep / "ablation.md").unlink()  # on demand, from the job folders alone
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "ablation_report.py"), str(sweep)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (sweep / "ablation.md").read_text() == text


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


def test_rows_carry_backbone_and_objective(tmp_path):
    fake_job(tmp_path, "0_pipeline_kl_f4", 4, "kl", {"caption_alignment": 0.9})
    cfg = OmegaConf.load(tmp_path / "0_pipeline_kl_f4" / ".hydra" / "config.yaml")
    cfg.unet, cfg.diffusion = {"kind": "dit"}, {"objective": "flow"}
    OmegaConf.save(cfg, tmp_path / "0_pipeline_kl_f4" / ".hydra" / "config.yaml")
    rows, _ = collect(tmp_path)
    assert (rows[0]["backbone"], rows[0]["objective"]) == ("dit", "flow")
