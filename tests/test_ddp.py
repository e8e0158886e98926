"""Distribution without starting processes: how data is dealt to ranks, global batch, config errors, SLURM config.

The 2-process runs are in tests/test_ddp_runs.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm_train import config as ldm_config
from ldm_train.data import build_datasets
from ldm_train.data.distributed import rank_loader
from ldm_train.lit.trainer import build_trainer, global_batch

ROOT = Path(__file__).resolve().parents[1]


def image_ids(loader) -> list[list[str]]:
    """Per batch, a content hash of each image (independent of how the loader indexes the dataset)."""
    return [[hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in batch["image"]] for batch in loader]


def all_ids(dataset) -> list[str]:
    return [hashlib.sha1(dataset[i]["image"].numpy().tobytes()).hexdigest() for i in range(len(dataset))]


def folder_data(root: Path, n: int) -> OmegaConf:
    rng = np.random.default_rng(0)
    for i in range(n):  # distinct random images: content hashes identify them
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
    return OmegaConf.create({"name": "folder", "root": str(root), "resolution": 8, "random_crop": False,
                             "flip": False, "seed": 0, "val_fraction": 0.3})


@pytest.fixture(params=["shapes", "folder"])
def datasets(request, tmp_path):
    if request.param == "shapes":
        cfg = OmegaConf.create({"name": "shapes", "resolution": 8, "train_size": 23, "val_size": 11, "seed": 0})
    else:
        cfg = folder_data(tmp_path, 34)  # 24 train / 10 val
    return build_datasets(cfg)


@pytest.mark.parametrize("world", [2, 3])
def test_training_epoch_deals_each_sample_at_most_once_and_matches_one_process(datasets, world):
    train, _ = datasets
    batch = 2
    per_rank = [image_ids(rank_loader(train, batch, train=True, world_size=world, rank=r, seed=5))
                for r in range(world)]
    seen = [i for rank_batches in per_rank for b in rank_batches for i in b]
    assert len(seen) == len(set(seen)), "a sample came twice in one epoch"
    steps = len(train) // (batch * world)
    assert all(len(b) == steps for b in per_rank) and len(seen) == steps * batch * world
    # one process with the same global batch takes the same images at every step
    single = image_ids(rank_loader(train, batch * world, train=True, world_size=1, rank=0, seed=5))
    for step in range(steps):
        assert sorted(single[step]) == sorted(i for r in range(world) for i in per_rank[r][step])


def test_training_order_changes_with_the_epoch(datasets):
    train, _ = datasets
    loader = rank_loader(train, 4, train=True, world_size=2, rank=0, seed=5)
    first = image_ids(loader)
    loader.sampler.set_epoch(1)  # Lightning does this at every epoch
    assert image_ids(loader) != first


@pytest.mark.parametrize("world", [1, 2, 3])
def test_validation_takes_each_sample_exactly_once_without_padding(datasets, world):
    _, val = datasets
    per_rank = [[i for b in image_ids(rank_loader(val, 3, train=False, world_size=world, rank=r, seed=5)) for i in b]
                for r in range(world)]
    seen = [i for ids in per_rank for i in ids]
    assert len(seen) == len(set(seen)), "validation repeated a sample (DistributedSampler padding)"
    assert sorted(seen) == sorted(all_ids(val)[: len(val) - len(val) % world])  # only the last N mod W left out
    assert len({len(ids) for ids in per_rank}) == 1  # the same number of batches on every rank


def test_global_batch_is_batch_times_devices_nodes_accumulation():
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", accumulate_grad_batches=3, logger=False)
    assert global_batch(trainer, 8, "test") == 8 * 2 * 1 * 3


def test_sync_batchnorm_option_reaches_the_trainer(compose_cfg, tmp_path):
    cfg = compose_cfg(["experiment=smoke", f"paths.run_dir={tmp_path}", "trainer.accelerator=cpu", "strategy=ddp"])
    on = build_trainer(cfg, job_type="autoencoder", max_steps=1, val_every=1, sync_batchnorm=True)
    off = build_trainer(cfg, job_type="autoencoder", max_steps=1, val_every=1)
    # Lightning's layer-sync plugin is what converts BatchNorm to SyncBatchNorm when fitting
    assert type(on.strategy._layer_sync).__name__ == "TorchSyncBatchNorm" and off.strategy._layer_sync is None


@pytest.mark.parametrize(("overrides", "needle"), [
    (["autoencoder.loss.disc.sync_batchnorm=true", "trainer.accelerator=cpu"], "needs GPUs"),
    (["stage=autoencoder", "strategy=ddp", "trainer.accumulate_grad_batches=2"], "cannot accumulate"),
    (["trainer.devices=2"], "needs strategy=ddp"),
    (["trainer.num_nodes=2"], "needs strategy=ddp"),
    (["strategy=fsdp", "trainer.accelerator=gpu", "trainer.devices=2"], "one GPU only"),
])
def test_distribution_errors_name_the_fix(compose_cfg, overrides, needle):
    with pytest.raises(ldm_config.ConfigError, match=re.escape(needle)):
        ldm_config.validate(compose_cfg(["experiment=smoke", *overrides]))


def test_stage2_may_accumulate(compose_cfg):
    ldm_config.validate(compose_cfg(["experiment=smoke", "stage=diffusion", "trainer.accumulate_grad_batches=2"]))


def test_slurm_launcher_follows_devices_and_nodes(tmp_path, monkeypatch):
    """hydra/launcher=slurm composes, and submitit turns it into an sbatch script with one task per GPU."""
    submitit = pytest.importorskip("submitit")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ldm_config.CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "strategy=ddp", "trainer.devices=4",
                                           "trainer.num_nodes=2", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["_target_"].endswith("SlurmLauncher")
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (2, 4, 4)
    # the launcher's own mapping: BaseQueueConf keys as they are, the others prefixed with slurm_
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    base = set(OmegaConf.structured(BaseQueueConf).keys())
    (tmp_path / "srun").write_text("#!/bin/sh\n")  # submitit only checks that srun exists; nothing is submitted
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    executor = submitit.AutoExecutor(cluster="slurm", folder=str(tmp_path))
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("_target_", "submitit_folder", "max_num_timeout")})
    script = executor._executor._make_submission_file_text("python -m ldm_train", "uid")
    for flag in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu"):
        assert f"#SBATCH {flag}" in script


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_check_script(tmp_path):  # pragma: no cover - CI has no GPU
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "FAIL" not in out.stdout
    shutil.rmtree(tmp_path, ignore_errors=True)
