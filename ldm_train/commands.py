"""The commands the framework suggests ("train it first with …", "resume with …", the next stage), rebuilt from the
user's own command line so that copy-paste keeps their choices (`experiment=smoke`, `data.root=…`)."""

from __future__ import annotations

import shlex
from functools import cache

from omegaconf import OmegaConf

from ldm_train.config import CONF_DIR

PROGRAM = "python -m ldm_train"
DROPPED = ("ckpt_path",)  # belongs to the run that was interrupted, never to the next one it suggests


def user_overrides() -> list[str]:
    """The overrides the user typed for this job (Hydra's `overrides.task`; [] outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def user_chose_run_dir() -> bool:
    """Whether the user placed this run's folder themselves (`hydra.run.dir=` or `paths.run_dir=`)."""
    from hydra.core.hydra_config import HydraConfig

    typed = user_overrides() + (list(HydraConfig.get().overrides.hydra) if HydraConfig.initialized() else [])
    return any(override_key(o) in ("hydra.run.dir", "paths.run_dir") for o in typed)


def override_key(override: str) -> str:
    """`+a.b=1` → `a.b`; `~x` → `x`."""
    return override.split("=", 1)[0].lstrip("+~")


@cache
def stage_keys(stage: str) -> frozenset[str]:
    """Top-level keys a stage's config file defines (following its `defaults`, e.g. diffusion → sample)."""
    path = CONF_DIR / "stage" / f"{stage}.yaml"
    if not path.is_file():
        return frozenset()
    node = OmegaConf.to_container(OmegaConf.load(path))
    keys = {k for k in node if k != "defaults"}
    for parent in node.get("defaults", []):
        if isinstance(parent, str) and parent != "_self_":
            keys |= stage_keys(parent)
    return frozenset(keys)


def suggest_command(*changes: str, overrides: list[str] | None = None) -> str:
    """`python -m ldm_train <the user's overrides, with `changes` replacing the same keys>`, shell-quoted.

    Dropped from the user's overrides: `ckpt_path`, and, when `changes` switch the stage, the keys only the
    current stage has (e.g. `prompt=` of stage=sample), which Hydra would refuse for the other stage; and when
    `changes` choose a group (`data=latents`), the user's keys inside that group (`data.root=`).
    """
    typed = user_overrides() if overrides is None else list(overrides)
    changed = {override_key(c) for c in changes}
    current = next((o.split("=", 1)[1] for o in typed if override_key(o) == "stage"), "autoencoder")
    target = next((c.split("=", 1)[1] for c in changes if override_key(c) == "stage"), current)
    foreign = set()
    if target != current:
        every = set().union(*(stage_keys(p.stem) for p in (CONF_DIR / "stage").glob("*.yaml")))
        base = set(OmegaConf.load(CONF_DIR / "config.yaml"))  # keys every stage has (e.g. the training `seed`)
        foreign = every - stage_keys(target) - base
    regrouped = {k for k in changed if "." not in k}  # `data=latents` makes the user's `data.root=` meaningless
    kept = [o for o in typed if override_key(o) not in changed | set(DROPPED)
            and override_key(o).split(".")[0] not in foreign | regrouped]
    # the stage first, the way people write it
    parts = sorted([*kept, *changes], key=lambda o: override_key(o) != "stage")
    return " ".join([PROGRAM, *(shlex.quote(p) for p in parts)])


def resume_command(stage: str, run_stage: str, checkpoint) -> str:
    """The command that continues an interrupted `stage` from `checkpoint`: `ckpt_path=last` where a fresh run finds
    it (a sibling run folder of the same stage), else the file itself."""
    explicit = user_chose_run_dir() or run_stage != stage
    return suggest_command(f"stage={stage}", f"ckpt_path={checkpoint if explicit else 'last'}")
