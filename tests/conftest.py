"""Shared fixtures: compose the real Hydra configs, and train the smoke autoencoder once per session."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from ldm_train.config import CONF_DIR


def compose_cfg(overrides: Iterable[str] = ()) -> DictConfig:
    """The package's real `config` composed with command-line style overrides (no Hydra run, no output dir)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# the quickstart's stage-1 cosine LR schedule node, as a command-line override
STAGE1_COSINE = ("autoencoder.lr_scheduler={_target_:torch.optim.lr_scheduler.LambdaLR,_partial_:true,"
                 "lr_lambda:{_target_:ldm_train.lit.optim.cosine_decay,_partial_:true,total:${autoencoder.max_steps}}}")


def smoke_overrides(root: Path) -> list[str]:
    """`experiment=smoke` writing artifacts under `root`; `paths.run_dir` replaces `${hydra:...}` under compose."""
    return ["experiment=smoke", "logger=none", f"paths.artifacts={root / 'artifacts'}",
            f"paths.run_dir={root / 'run'}"]


@pytest.fixture(name="compose_cfg", scope="session")
def compose_cfg_fixture():
    return compose_cfg


@pytest.fixture(scope="session")
def smoke_autoencoder(tmp_path_factory) -> dict:
    """The KL f=4 smoke autoencoder, trained once per session with `ldm_train.__main__.run`.

    Treat the artifact as read-only (copy it before editing): other tests reuse it. Keys: `cfg_overrides`
    (reproduce the run's config, append e.g. `stage=diffusion`), `artifacts` (the artifacts root), `artifact`
    (the kl_f4 directory), `metrics` (what the stage returned).
    """
    from ldm_train.__main__ import run

    root = tmp_path_factory.mktemp("smoke_autoencoder")
    overrides = smoke_overrides(root)
    metrics = run(compose_cfg(overrides))
    artifacts = root / "artifacts"
    return {"cfg_overrides": overrides, "artifacts": artifacts, "artifact": artifacts / "autoencoder" / "kl_f4",
            "metrics": metrics}


@pytest.fixture(scope="session")
def shapes_features(tmp_path_factory) -> dict:
    """A quickly trained shapes feature network (fd_shapes / rfd_shapes): `path` to its weights, `stats`."""
    from ldm_train.evaluation.features import train_shapes_features

    path = tmp_path_factory.mktemp("features") / "shapes.safetensors"
    return {"path": path, "stats": train_shapes_features(path, steps=120, pool=1024)}


# The files that start real subprocesses (sweeps, DDP, signals) run first: `make test` gives whole files to its
# pytest-xdist workers in collection order, so a long file collected last would run alone at the end.
HEAVY_FIRST = ("test_multirun.py", "test_ddp_runs.py", "test_pipeline.py", "test_reliability.py", "test_resume.py",
               "test_buckets_ddp.py", "test_interop.py", "test_first_hour.py", "test_ddp.py")


def pytest_configure(config):
    """Under pytest-xdist, one torch thread per core per worker (and for the subprocesses a worker starts): with two
    workers on two cores, two threads each oversubscribe the cores and OpenMP's spin-waits stall whole tests."""
    import os

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
