"""Where an artifact's weights came from: the data, the steps, the experiment and a hash of the config that shaped
them, written as `provenance.json` next to the weights. Reuse and replacement compare it; `ckpt_path=last` compares
the same config subset of two runs (see docs/artifacts.md)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

PROVENANCE_FILE = "provenance.json"
# The config sections that shape each stage's weights (stage 2 adds its autoencoder's content hash).
SECTIONS = {"autoencoder": ("data", "f", "seed", "regularizer", "autoencoder"),
            "diffusion": ("data", "f", "seed", "regularizer", "diffusion", "unet", "text_encoder")}
# Keys in those sections that do not change the weights: where to load from, how often to validate, how to sample
# afterwards, how many loader processes, whether to compile.
NOT_SHAPING = {
    "data": ("num_workers", "max_skip_fraction", "max_image_pixels", "val_prompts"),
    "autoencoder": ("path", "compile", "val_every", "val_batches"),
    "diffusion": ("compile", "val_every", "val_prompts", "val_num_prompts", "val_n_per_prompt", "eval_samples",
                  "eval_diagnostic_samples", "latent_std_range"),
}
# How long a stage trains: continuing a run with a larger max_steps is a legitimate resume (ckpt_path only).
TRAINING_LENGTH = ("max_steps", "max_time", "lr_scheduler")  # the schedule spans max_steps
# Data keys naming where the data lives: made absolute so the same folder compares equal from any launch folder.
DATA_LOCATIONS = ("root", "urls", "val_urls", "info")


def _absolute(location):
    """A local path (or brace pattern) made absolute; URLs and `pipe:` commands as given."""
    if not isinstance(location, str) or "://" in location or location.startswith("pipe:"):
        return location
    return os.path.abspath(os.path.expanduser(location))


def weights_config(cfg: DictConfig, stage: str, exclude: tuple[str, ...] = ()) -> dict:
    """The resolved config subset that shaped stage `stage`'s weights (SECTIONS minus NOT_SHAPING minus `exclude`)."""
    from ldm_train.config import register_resolvers

    register_resolvers()  # `autoencoder.arch` of a config loaded from a file resolves through ldm_arch
    subset = {}
    for section in SECTIONS[stage]:
        value = cfg.get(section)
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        if isinstance(value, dict):
            drop = set(NOT_SHAPING.get(section, ())) | set(exclude)
            value = {k: v for k, v in value.items() if k not in drop}
        subset[section] = value
    subset["data"] = {k: _absolute(v) if k in DATA_LOCATIONS else v for k, v in subset["data"].items()}
    return subset


def config_hash(subset: dict) -> str:
    """sha256 of the subset as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(subset, sort_keys=True, default=str).encode()).hexdigest()


def hydra_choices() -> dict | None:
    """The config-group choices of the Hydra run (experiment, data, unet, ...); None outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    choices = OmegaConf.to_container(HydraConfig.get().runtime.choices)
    return {k: v for k, v in choices.items() if not k.startswith("hydra")}


DATA_SUMMARY = ("name", *DATA_LOCATIONS, "resolution")


def data_summary(data: dict) -> dict:
    """The data's identity: its name, where it lives, its resolution."""
    return {k: data[k] for k in DATA_SUMMARY if data.get(k) is not None}


def provenance(cfg: DictConfig, stage: str, steps: int | None = None, autoencoder: Path | None = None) -> dict:
    """What an artifact of `stage` ("autoencoder" | "diffusion") trained by this run records about itself.

    `steps`: the steps actually trained (None before training); `autoencoder`: stage 2's autoencoder artifact,
    whose content hash (weights + architecture) joins the hashed config.
    """
    subset = weights_config(cfg, stage)
    if stage == "diffusion":
        from ldm_train.pipeline.artifacts import content_hash

        subset["autoencoder_content_hash"] = content_hash(autoencoder) if autoencoder is not None else None
    choices = hydra_choices()
    return {"stage": stage, "data": data_summary(subset["data"]), "resolution": subset["data"].get("resolution"),
            "steps": steps, "experiment": choices.get("experiment") if choices else None, "choices": choices,
            "config_hash": config_hash(subset), "config": subset}


def read_provenance(artifact: Path) -> dict | None:
    """The artifact's provenance.json; None when it predates provenance (or the file is unreadable)."""
    path = Path(artifact) / PROVENANCE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _short(value) -> str:
    text = "(absent)" if value is _ABSENT else json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


_ABSENT = object()


def differences(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for every leaf that differs, in the order of `new` (data first)."""
    a, b = _flatten(old), _flatten(new)
    keys = list(b) + [k for k in a if k not in b]
    return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in keys if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def describe_differences(old: dict, new: dict, limit: int = 4) -> str:
    """'key: old → new; ...' for the first `limit` differing keys, and how many more."""
    diffs = differences(old, new)
    text = "; ".join(f"{k}: {_short(o)} → {_short(n)}" for k, o, n in diffs[:limit])
    return text + (f" (+{len(diffs) - limit} more)" if len(diffs) > limit else "")


def describe_data(prov: dict) -> str:
    """'data=shapes (resolution 16)' from a provenance's data summary."""
    data = prov.get("data") or {}
    details = ", ".join(f"{k} {data[k]}" for k in DATA_SUMMARY[1:] if k in data)
    return f"data={data.get('name', '?')}" + (f" ({details})" if details else "")


def compare(old: dict | None, new: dict, subject: str = "it") -> tuple[bool, str]:
    """(same config?, why): the reason names the data when that differs, else the first differing config keys."""
    if old is None:
        return False, f"{subject} has no {PROVENANCE_FILE} (written before provenance was recorded)"
    if old.get("config_hash") == new["config_hash"]:
        return True, f"same data ({describe_data(new)}) and config (hash {new['config_hash'][:12]})"
    if old.get("data") != new["data"]:
        return False, f"{subject} was trained on {describe_data(old)}, this run uses {describe_data(new)}"
    diff = describe_differences(old.get("config", {}), new["config"])
    return False, f"{subject} was trained with another config: {diff}"


def log_replacement(final: Path, new: dict | None) -> None:
    """Replacing an existing artifact says what differed (old → new), before the new one is written."""
    final = Path(final)
    if not final.exists() or new is None:
        return
    old = read_provenance(final)
    same, why = compare(old, new, "the old one")
    if same:
        log.info("replacing %s: %s; steps %s → %s", final, why, old.get("steps"), new.get("steps"))
    else:
        log.warning("replacing %s: %s", final, why)
