"""`python -m ldm_train stage=<autoencoder|calibrate|diffusion|sample|evaluate|pipeline> f=<f> regularizer=<kl|vq>`"""

from __future__ import annotations

import importlib
import logging
import shutil
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, open_dict
from omegaconf.errors import MissingMandatoryValue

from ldm_train.checks import check_artifacts
from ldm_train.config import CONF_DIR, run_dir, validate
from ldm_train.errors import CTRL_C_EXIT, USER_ERROR_EXIT, UserError

log = logging.getLogger("ldm_train")


def run(cfg: DictConfig) -> dict:
    """Validate the config and run its stage; returns the stage's metrics (for sweepers)."""
    validate(cfg)  # before any heavy import: a bad config fails in a second
    if cfg.data.get("aspect_buckets"):
        from ldm_train.config import size_multiple

        with open_dict(cfg):  # the bucket sides follow what the models of this stage need
            cfg.data.bucket_multiple = size_multiple(cfg)
            cfg.data.bucket_report = str(run_dir(cfg) / "buckets.json")
    check_artifacts(cfg)  # the artifact the stage starts from, before any model is built
    from ldm_train.lit.checkpoints import resolve_checkpoint

    ckpt_path = resolve_checkpoint(cfg)  # `last` → a file; refuses unsafe or other-stage checkpoints now
    from ldm_train.lit.trainer import finish_logger, quiet_lightning  # lazy: `--help` and `--cfg` need no torch

    quiet_lightning()
    with open_dict(cfg):
        cfg.ckpt_path = ckpt_path
    stage = importlib.import_module(f"ldm_train.stages.{cfg.stage}")
    log.info("stage=%s: run folder %s", cfg.stage, run_dir(cfg))
    metrics = stage.run(cfg)
    log.info("stage=%s done: run folder %s", cfg.stage, run_dir(cfg))
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if metrics and rank_zero_only.rank == 0:
        write_run_metrics(cfg, metrics)
    finish_logger(metrics)
    return metrics


def write_run_metrics(cfg: DictConfig, metrics: dict) -> None:
    """`<run dir>/metrics.json` (rank 0 only): the job folder keeps its results; sweeps and ablation reports read it."""
    from ldm_train.config import run_dir
    from ldm_train.utils.io import atomic_write_json

    atomic_write_json(run_dir(cfg) / "metrics.json", metrics)


def headline(stage: str, metrics: dict | None) -> float | None:
    """The stage's headline metric (its module's HEADLINE_METRIC), for a Hydra sweeper to optimise."""
    key = getattr(importlib.import_module(f"ldm_train.stages.{stage}"), "HEADLINE_METRIC", None)
    value = (metrics or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def report_user_error(err: UserError, cfg: DictConfig) -> None:
    """`error: <message>` on one line of stderr, no traceback; a run folder that holds nothing of the run is
    removed (a failed check must not leave an empty `outputs/<stage>/<name>/<time>/` behind)."""
    log.debug("user error", exc_info=err)  # the traceback stays available at debug level
    print(f"error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
    if not in_multirun():  # a sweep's job folder keeps its config: the report names the failed job by it
        remove_empty_run_dir(run_dir(cfg))


def remove_empty_run_dir(folder: Path) -> bool:
    """Delete `folder` when it holds only Hydra's bookkeeping (`.hydra/`, `*.log`), then its empty parents up to the
    working folder. Returns whether it was deleted."""
    folder = Path(folder).resolve()
    if not folder.is_dir() or folder == Path.cwd().resolve():
        return False
    if any(p.name != ".hydra" and p.suffix != ".log" for p in folder.iterdir()):
        return False
    shutil.rmtree(folder)
    cwd = Path.cwd().resolve()
    for parent in folder.parents:
        if parent == cwd or cwd not in parent.parents or any(parent.iterdir()):
            break
        parent.rmdir()
    return True


def in_multirun() -> bool:
    """Whether this job is one of a `-m` sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        return headline(cfg.stage, run(cfg))
    except (UserError, MissingMandatoryValue) as err:  # a mistake the user can fix: one line, exit status 2
        report_user_error(err, cfg)
        if in_multirun():
            raise  # Hydra records this job as failed and the sweep goes on; its report row says why
        sys.exit(USER_ERROR_EXIT)
    except KeyboardInterrupt:  # Ctrl-C outside the training steps (within them, lit/resume.py saves a checkpoint)
        print("interrupted outside the training steps: nothing was saved now (earlier checkpoints are kept)",
              file=sys.stderr, flush=True)
        remove_empty_run_dir(run_dir(cfg))
        sys.exit(CTRL_C_EXIT)


if __name__ == "__main__":
    main()
