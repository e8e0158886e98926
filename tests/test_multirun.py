"""`-m f=4,8` sweeps f as typed on the command line: one stage-1 artifact per factor, each with its own shape."""

import json
import subprocess
import sys

from omegaconf import OmegaConf


def test_multirun_sweeps_f(tmp_path):
    cmd = [sys.executable, "-m", "ldm_train", "-m", "experiment=smoke", "stage=autoencoder", "f=4,8",
           "autoencoder.max_steps=2", "autoencoder.val_every=2", f"paths.artifacts={tmp_path}/artifacts",
           f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for f, z, ch_mult in [(4, 3, [1, 2, 4]), (8, 4, [1, 2, 4, 4])]:
        art = tmp_path / "artifacts" / "autoencoder" / f"kl_f{f}"
        arch = OmegaConf.load(art / "config.yaml").architecture
        assert (arch.f, arch.z_channels, list(arch.ch_mult)) == (f, z, ch_mult)
        assert json.loads((art / "calibration.json").read_text())["scale_factor"] > 0
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert jobs == ["0_autoencoder_kl_f4", "1_autoencoder_kl_f8"]
    report = (tmp_path / "sweep" / "ablation.md").read_text()  # the Hydra callback reads each job's metrics.json
    assert "| 4 | kl |" in report and "| 8 | kl |" in report and "[lpips_randalex]" in report
