"""A `-m` sweep that fails well: every job's config is checked before the first job starts, a failed job leaves
its reason in its folder, and the ablation report is written even when a job failed.

Files in the sweep folder: `sweep.json` (the expanded jobs, the swept keys, the wandb group); in a failed job's
folder: `failure.json` (exception type and message). The Hydra callback is configured in conf/config.yaml
(`hydra.callbacks.ablation_report`).
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ldm_train.config import ConfigError
from ldm_train.utils.io import atomic_write_json

log = logging.getLogger(__name__)
SWEEP_FILE, FAILURE_FILE = "sweep.json", "failure.json"
WANDB_GROUP_MAX = 128  # wandb's limit on a group name


def expand_jobs(task_overrides: list[str]) -> tuple[list[list[str]], list[str]]:
    """(one override list per job, in the basic sweeper's order; the keys that take more than one value)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(task_overrides)
    swept = [o.get_key_element() for o in parsed if o.is_sweep_override()]
    return BasicSweeper.split_arguments(parsed, max_batch_size=None)[0], swept


def group_name(task_overrides: list[str], swept: list[str], sweep_dir: Path) -> str:
    """The wandb group: the swept overrides as typed (`f=4,8,16`), the experiment and stage when given, then the
    sweep folder's name (its time stamp keeps reruns apart); cut to wandb's 128 characters."""
    keyed = {o.split("=", 1)[0].lstrip("+~"): o for o in task_overrides}
    name = " ".join(keyed[k] for k in [*swept, "experiment", "stage"] if k in keyed)
    stamp = f" @{Path(sweep_dir).name}"
    return name[:WANDB_GROUP_MAX - len(stamp)] + stamp if name else Path(sweep_dir).name


def validate_jobs(master: DictConfig, jobs: list[list[str]], swept: list[str]) -> None:
    """Compose every job's config and run the start-up checks on it; one ConfigError naming every bad job by its
    swept values."""
    from hydra.core.global_hydra import GlobalHydra

    from ldm_train.config import validate

    loader = GlobalHydra.instance().config_loader()
    errors = []
    for num, overrides in enumerate(jobs):
        try:
            validate(loader.load_sweep_config(master, list(overrides)))
        except Exception as e:  # noqa: BLE001 - a bad value surfaces as ConfigError or as a Hydra composition error
            label = " ".join(o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept)
            errors.append(f"  job {num} ({label or ' '.join(overrides)}): {e}")
    if errors:
        raise ConfigError(f"{len(errors)} of {len(jobs)} sweep job(s) have a bad config; nothing was run. Fix or "
                          "drop these values and start the sweep again:\n" + "\n".join(errors))


def read_sweep(sweep: Path) -> dict:
    """sweep.json, or {} for a folder written without the callback."""
    path = Path(sweep) / SWEEP_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def record_failure(job_dir: Path, error: BaseException) -> None:
    """failure.json in the job's folder: what the report's row says about it."""
    tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    atomic_write_json(Path(job_dir) / FAILURE_FILE, {"error": type(error).__name__, "message": str(error),
                                                     "traceback": tb[-4000:]})


def upload_command(sweep: Path) -> str | None:
    """One `wandb sync` command for every offline run of the sweep (each job's stages and the summary run)."""
    sweep = Path(sweep)
    parts = [pattern for pattern in ("*/wandb/offline-run-*", "wandb/offline-run-*") if any(sweep.glob(pattern))]
    return "wandb sync " + " ".join(f"{sweep}/{p}" for p in parts) if parts else None


class AblationReportCallback(Callback):
    """Hydra callback: validate all jobs first, record failures, write the report when the last job ends."""

    def __init__(self) -> None:
        self._reported: set[str] = set()

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        task = list(config.hydra.overrides.task)
        try:
            jobs, swept = expand_jobs(task)
        except Exception as e:  # noqa: BLE001 - another sweeper's syntax: its own launcher reports
            log.info("sweep not expanded (%s): jobs are checked as they start", e)
            return
        try:
            validate_jobs(config, jobs, swept)
        except ConfigError as e:  # Hydra turns a callback's exception into a warning and goes on: stop here
            raise SystemExit(f"error: {e}") from None
        atomic_write_json(sweep / SWEEP_FILE, {"group": group_name(task, swept, sweep), "swept": swept,
                                               "jobs": jobs})
        log.info("all %d sweep job(s) passed the config checks", len(jobs))

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus

        hc = HydraConfig.get()
        job_dir, sweep = Path(hc.runtime.output_dir), Path(hc.sweep.dir)
        if job_return.status == JobStatus.FAILED:
            record_failure(job_dir, job_return._return_value)
            log.error("job %s failed: %s (recorded in %s)", hc.job.num, job_return._return_value,
                      job_dir / FAILURE_FILE)
        jobs = read_sweep(sweep).get("jobs")
        if jobs and hc.job.num == len(jobs) - 1:  # the last job: Hydra skips on_multirun_end after a failure
            self._finish(sweep)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self._finish(Path(config.hydra.sweep.dir))

    def _finish(self, sweep: Path) -> None:
        if str(sweep) in self._reported:
            return
        self._reported.add(str(sweep))
        from ldm_train.evaluation.ablation import write_report

        try:
            write_report(sweep)
        except Exception:  # the jobs' results are safe on disk; the report can be rebuilt on demand
            log.exception("ablation report failed; rebuild it with `python -m ldm_train.report %s`", sweep)
        command = upload_command(sweep)
        if command:
            log.info("wandb ran offline; upload the whole sweep with:\n  %s", command)
