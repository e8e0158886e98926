"""`ckpt_path`: which checkpoint a run resumes from, checked before anything heavy starts."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ldm_train.errors import UserError

log = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the fix."""


def resume_config(cfg, stage: str) -> dict:
    """What a checkpoint must share with the run resuming it: the config that shapes the stage's weights
    (ldm_train/pipeline/provenance.py) minus the training length (max_steps, max_time), which a resume may extend."""
    from ldm_train.pipeline.provenance import TRAINING_LENGTH, weights_config

    return weights_config(cfg, stage, exclude=TRAINING_LENGTH)


def config_difference(other, stage: str, config: dict, source: Path) -> str:
    """'key: theirs → ours; ...' between another run's config (`other`, loaded from `source`) and this run's
    resume_config; empty when they match."""
    from ldm_train.pipeline.provenance import describe_differences

    try:
        return describe_differences(resume_config(other, stage), config, limit=3)
    except Exception as exc:
        return f"its {source} cannot be resolved ({str(exc).splitlines()[0][:120]})"


def scan_last_checkpoints(run_dir: Path, stage: str, name: str,
                          config: dict | None = None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(resumable `checkpoints/last.ckpt` files, [(skipped file, why)]) among this run's folder and its siblings.

    Hydra gives every run its own folder (`outputs/<stage>/<name>/<time>/`), so the run to continue is a sibling;
    a folder whose `.hydra/config.yaml` names another stage or name is passed over silently (e.g. other jobs of a
    sweep), one whose resume_config differs from `config` (this run's) is skipped with the keys that differ.
    A folder without `.hydra/config.yaml` (a run outside Hydra) is judged by its place alone.
    """
    from omegaconf import OmegaConf

    found, skipped = [], []
    for ckpt in {run_dir / "checkpoints" / "last.ckpt", *run_dir.parent.glob("*/checkpoints/last.ckpt")}:
        if not ckpt.is_file():
            continue
        hydra_cfg = ckpt.parent.parent / ".hydra" / "config.yaml"
        if hydra_cfg.is_file():
            try:
                other = OmegaConf.load(hydra_cfg)
                same = other.get("stage") == stage and str(other.get("name")) == str(name)
            except Exception:  # unreadable: judge by the folder alone
                other, same = None, True
            if not same:
                continue
            if config is not None and other is not None:
                diff = config_difference(other, stage, config, hydra_cfg)
                if diff:
                    skipped.append((ckpt, diff))
                    continue
        found.append(ckpt)
    return found, skipped


def find_last_checkpoint(run_dir: Path, stage: str, name: str, config: dict | None = None) -> Path | None:
    """The newest resumable checkpoint of scan_last_checkpoints, or None."""
    found, _ = scan_last_checkpoints(run_dir, stage, name, config)
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def check_state_shapes(own: dict, loaded: dict) -> None:
    """One line naming the first weights that differ between this run's model (`own`) and a checkpoint's
    state_dict (`loaded`), instead of the strict load's one line per key; nothing when they fit."""
    missing = [k for k in own if k not in loaded]
    unexpected = [k for k in loaded if k not in own]
    reshaped = [k for k in own if k in loaded and tuple(own[k].shape) != tuple(loaded[k].shape)]
    if not (missing or unexpected or reshaped):
        return

    def first(keys: list[str], what: str, show=str) -> str:
        more = f", +{len(keys) - 3} more" if len(keys) > 3 else ""
        return f"{len(keys)} {what} ({', '.join(show(k) for k in keys[:3])}{more})"

    def shapes(k: str) -> str:
        return f"{k}: {list(loaded[k].shape)} in the checkpoint, {list(own[k].shape)} here"

    parts = [first(reshaped, "with another shape", shapes) if reshaped else "",
             first(missing, "missing from the checkpoint") if missing else "",
             first(unexpected, "unknown to this model") if unexpected else ""]
    raise CheckpointError(f"the checkpoint does not fit this run's model: weights {'; '.join(p for p in parts if p)}"
                          ". It was trained with another architecture: resume it with the config it was trained "
                          "with (its run folder's .hydra/config.yaml), or start without ckpt_path")


def warn_if_config_differs(path: Path, cfg) -> None:
    """A checkpoint given by path is taken (changing a setting on resume can be deliberate), with one line when its
    run's config differs from this run's."""
    from omegaconf import OmegaConf

    hydra_cfg = path.parent.parent / ".hydra" / "config.yaml"
    try:
        other = OmegaConf.load(hydra_cfg) if hydra_cfg.is_file() else None
    except Exception:
        return
    diff = config_difference(other, cfg.stage, resume_config(cfg, cfg.stage), hydra_cfg) if other else ""
    if diff:
        log.warning("ckpt_path=%s: its run was configured otherwise: %s (checkpoint's → this run's)", path, diff)


def resolve_checkpoint(cfg) -> str | None:
    """`ckpt_path` made concrete and checked before anything heavy starts: `last` → a file (see
    find_last_checkpoint), the file must exist, load without running code, and come from this stage."""
    import pickle

    from ldm_train.config import ConfigError, run_dir

    requested = cfg.get("ckpt_path")
    if requested is None:
        return None
    if cfg.stage not in ("autoencoder", "diffusion"):
        raise ConfigError(f"ckpt_path resumes stage=autoencoder or stage=diffusion, not stage={cfg.stage}; resume "
                          "the interrupted stage on its own (e.g. stage=diffusion ckpt_path=last), then run the rest")
    if str(requested) == "last":
        here = run_dir(cfg)
        found, skipped = scan_last_checkpoints(here, cfg.stage, cfg.name, resume_config(cfg, cfg.stage))
        path = max(found, key=lambda p: p.stat().st_mtime, default=None)
        newer = [(p, why) for p, why in skipped if path is None or p.stat().st_mtime > path.stat().st_mtime]
        newest_skipped = max(newer, key=lambda item: item[0].stat().st_mtime, default=None)
        if path is None and newest_skipped is not None:
            raise CheckpointError(
                f"ckpt_path=last: no earlier stage={cfg.stage} name={cfg.name} run next to {here} has this run's "
                f"config; the newest, {newest_skipped[0]}, differs in {newest_skipped[1]} (checkpoint's → this "
                "run's). Resume with that run's settings, start without ckpt_path, or give a file: ckpt_path=<path>")
        if newest_skipped is not None:
            log.warning("ckpt_path=last: skipped %d newer checkpoint(s) with another config (the newest, %s, "
                        "differs in %s)", len(newer), newest_skipped[0], newest_skipped[1])
        if path is None:
            raise CheckpointError(
                f"ckpt_path=last: no checkpoints/last.ckpt of an earlier stage={cfg.stage} name={cfg.name} run next "
                f"to {here} (looked in {here.parent}/*/checkpoints/). Start without ckpt_path, or give the file: "
                "ckpt_path=outputs/<stage>/<name>/<time>/checkpoints/last.ckpt")
        log.info("ckpt_path=last → %s", path)
    else:
        path = Path(str(requested)).expanduser().resolve()
        if not path.is_file():
            raise CheckpointError(f"ckpt_path={requested}: no such file; give an existing checkpoint (e.g. "
                                  "outputs/<stage>/<name>/<time>/checkpoints/last.ckpt) or ckpt_path=last")
        warn_if_config_differs(path, cfg)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects that would run code when unpickled, so it is not "
            f"a checkpoint written by ldm_train (torch.load(weights_only=True) rejected it: {str(exc)[:300]}). "
            "Only resume from checkpoints you trust") from exc
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}; the file is corrupt or not a checkpoint — "
                              "resume from another one (checkpoints/last.ckpt of an earlier run)") from exc
    stage = checkpoint.get("ldm_train", {}).get("stage") if isinstance(checkpoint, dict) else None
    if stage is not None and stage != cfg.stage:
        raise CheckpointError(f"{path} is a stage={stage} checkpoint; resume it with stage={stage}, or give a "
                              f"stage={cfg.stage} checkpoint")
    return str(path)
