"""`-m` sweeps: f as typed on the command line, every job's config checked before the first job, and a report
that survives a failing job (its row says why; the figures are there)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's ldm_train, whatever the venv has installed


def sweep(tmp_path, *overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ldm_train", "-m", "experiment=smoke", *overrides,
           f"paths.artifacts={tmp_path}/artifacts", f"hydra.sweep.dir={tmp_path}/sweep"]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=ENV)


def test_multirun_sweeps_f(tmp_path):
    proc = sweep(tmp_path, "stage=autoencoder", "f=4,8", "autoencoder.max_steps=2", "autoencoder.val_every=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for f, z, ch_mult in [(4, 3, [1, 2, 4]), (8, 4, [1, 2, 4, 4])]:
        art = tmp_path / "artifacts" / "autoencoder" / f"kl_f{f}"
        arch = OmegaConf.load(art / "config.yaml").architecture
        assert (arch.f, arch.z_channels, list(arch.ch_mult)) == (f, z, ch_mult)
        assert json.loads((art / "calibration.json").read_text())["scale_factor"] > 0
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert jobs == ["0_autoencoder_kl_f4", "1_autoencoder_kl_f8"]
    report = (tmp_path / "sweep" / "ablation.md").read_text()  # the Hydra callback reads each job's folder
    assert "| f=4 | ok | 4 | tiny | ddpm | 3 | 0_autoencoder_kl_f4 |" in report and "| f=8 | ok |" in report
    assert "[recon_lpips_randalex]" in report and "[recon_psnr]" in report  # stage 1's names are evaluate's


def test_sweep_checks_every_job_before_the_first_starts(tmp_path):
    proc = sweep(tmp_path, "stage=autoencoder", "f=4,8,3", timeout=300)
    assert proc.returncode != 0
    assert "1 of 3 sweep job(s) have a bad config; nothing was run" in proc.stderr
    assert "job 2 (f=3): invalid f=3: valid downsampling factors are" in proc.stderr
    assert not [p for p in (tmp_path / "sweep").glob("*") if p.is_dir()]  # f=4 and f=8 did not run first


@pytest.mark.slow  # the report of a failed job and its figures: also tests/test_ablation.py on a synthetic sweep
def test_pipeline_sweep_with_a_failing_job_still_reports(tmp_path, shapes_features):
    """Job 0 runs the whole smoke pipeline with quality curves; job 1 reuses its autoencoder and fails its latent
    health check. The report has both rows (the failed one says why), the curves, the speed and sample figures,
    and `python -m ldm_train.report` rebuilds the same report."""
    proc = sweep(tmp_path, "stage=pipeline", "f=4", "diffusion.latent_std_range=[0.0,100.0],[50.0,60.0]",
                 "autoencoder.max_steps=2", "autoencoder.val_every=2", "diffusion.max_steps=4",
                 "diffusion.val_every=4", "diffusion.eval_every=2", "diffusion.eval_num_samples=8", "n_per_prompt=1",
                 "prompt=[a red circle on the left,a blue square at the top]", "sampling.steps=2",
                 "eval.num_samples=8", "eval.batch_size=8", f"eval.features_path={shapes_features['path']}")
    assert proc.returncode != 0  # Hydra reports the failed job at the end
    out = tmp_path / "sweep"
    quality = [json.loads(line) for line in (out / "0_pipeline_kl_f4" / "quality.jsonl").read_text().splitlines()]
    assert [q["step"] for q in quality] == [2, 4] and {"fd_shapes", "caption_alignment"} <= set(quality[0])
    failure = json.loads((out / "1_pipeline_kl_f4" / "failure.json").read_text())
    assert "latent" in failure["message"] and not (out / "1_pipeline_kl_f4" / "metrics.json").exists()
    text = (out / "ablation.md").read_text()
    assert "| diffusion.latent_std_range=[0.0,100.0] | ok | 4 | tiny | ddpm | 0_pipeline_kl_f4 |" in text
    assert f"| diffusion.latent_std_range=[50.0,60.0] | failed: {failure['error']}: " in text
    assert "FD [fd_shapes]" in text and "sampling throughput [eval_samples_per_second]" in text
    for name in ("curves", "speed", "autoencoder", "samples"):
        png = out / f"ablation_{name}.png"
        assert f"({png.name})" in text and png.stat().st_size > 5000 and Image.open(png).format == "PNG"
    assert json.loads((out / "sweep.json").read_text())["group"].startswith("diffusion.latent_std_range=[0.0,100.0]")

    (out / "ablation.md").unlink()  # on demand, from the job folders alone
    proc = subprocess.run([sys.executable, "-m", "ldm_train.report", str(out)], capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "ablation.md").read_text() == text
