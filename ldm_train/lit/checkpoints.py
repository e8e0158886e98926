"""`ckpt_path`: which checkpoint a run resumes from, checked before anything heavy starts."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ldm_train.errors import UserError

log = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the fix."""


def find_last_checkpoint(run_dir: Path, stage: str, name: str) -> Path | None:
    """The newest `checkpoints/last.ckpt` among this run's folder and its siblings that ran the same stage and name.

    Hydra gives every run its own folder (`outputs/<stage>/<name>/<time>/`), so the run to continue is a sibling;
    a folder whose `.hydra/config.yaml` names another stage or name is skipped (e.g. other jobs of a sweep).
    """
    from omegaconf import OmegaConf

    found = []
    for ckpt in {run_dir / "checkpoints" / "last.ckpt", *run_dir.parent.glob("*/checkpoints/last.ckpt")}:
        if not ckpt.is_file():
            continue
        hydra_cfg = ckpt.parent.parent / ".hydra" / "config.yaml"
        if hydra_cfg.is_file():
            try:
                other = OmegaConf.load(hydra_cfg)
                same = other.get("stage") == stage and str(other.get("name")) == str(name)
            except Exception:  # unreadable: judge by the folder alone
                same = True
            if not same:
                continue
        found.append(ckpt)
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


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
        path = find_last_checkpoint(here, cfg.stage, cfg.name)
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
