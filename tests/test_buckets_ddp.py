"""Aspect buckets under DDP: 2 CPU processes over gloo (Lightning's launcher), stage 1 on a folder of 3 aspects.

Every rank must train the same number of batches (no hang at the epoch's end), each batch of one bucket, and no
image twice in an epoch across the ranks. Slow (two processes): one short run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_ddp_runs import env, read_ranks

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 2 gloo processes; the per-rank batch counts are also tested in-process (test_buckets*.py)
def test_buckets_on_two_processes(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):  # 10 each of 16x40, 24x28 and 40x16 (h x w): buckets 12x24, 16x16, 24x12
        h, w = ((16, 40), (24, 28), (40, 16))[i % 3]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    steps = 9  # 24 training images (~8 per bucket), batch 2 per rank: ~12 batches an epoch, ~6 per rank
    cmd = [sys.executable, str(ROOT / "tests" / "ddp_probe.py"), "stage=autoencoder", "experiment=smoke",
           "trainer.accelerator=cpu", "strategy=ddp", "trainer.devices=2", "autoencoder.batch_size=2",
           f"autoencoder.max_steps={steps}", "autoencoder.val_every=100", "autoencoder.val_batches=1",
           "autoencoder.loss.disc.norm=group", "data=folder", f"data.root={root}", "data.resolution=16",
           "data.aspect_buckets=true", "data.flip=false", "data.num_workers=0", "data.val_fraction=0.2",
           "data.min_val_images=1",
           f"paths.artifacts={tmp_path / 'artifacts'}", f"hydra.run.dir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env(tmp_path / "probe"), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ranks = read_ranks(tmp_path / "probe", 2)
    steps_run = [r["stage1"] for r in ranks]
    assert [len(s) for s in steps_run] == [steps, steps]
    hist = json.loads((tmp_path / "run" / "buckets.json").read_text())
    per_rank = sum(v // 2 for v in hist.values()) // 2  # whole batches of 2, dealt to 2 ranks
    assert sum(hist.values()) == 24 and per_rank < steps  # the run crosses into the second epoch
    epoch0 = [img for s in steps_run for entry in s[:per_rank] for img in entry["images"]]
    assert len(epoch0) == 4 * per_rank and len(set(epoch0)) == len(epoch0)  # no image twice in the epoch
    sizes = {tuple(entry["size"]) for s in steps_run for entry in s}
    assert sizes == {(12, 24), (16, 16), (24, 12)}
