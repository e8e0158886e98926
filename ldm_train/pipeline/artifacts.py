"""The seam between the stages: autoencoder and diffusion artifacts, written atomically, loaded safely.

Autoencoder artifact `<paths.artifacts>/autoencoder/<regularizer>_f<f>/`:
    model.safetensors   weights (no pickle)
    config.yaml         the resolved architecture (GroupNorm groups and all); a reload rebuilds exactly this
    calibration.json    scale_factor = 1/std(z) and the health report (missing → stage 2 refuses to run)
    metrics.json        validation metrics of stage 1
    provenance.json     data, resolution, steps, experiment and the hash of the config that shaped the weights
Diffusion artifact `<paths.artifacts>/diffusion/<name>/`: model.safetensors (EMA U-Net), config.yaml (U-Net,
text encoder, schedule), autoencoder.json (path + content hash of its autoencoder), metrics.json, provenance.json.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ldm_train.commands import suggest_command
from ldm_train.config import ConfigError
from ldm_train.errors import UserError
from ldm_train.pipeline.provenance import PROVENANCE_FILE, log_replacement
from ldm_train.utils.io import atomic_write_dir, file_hash


class ArtifactError(UserError, RuntimeError):
    """A missing, incomplete or mismatched artifact; the message names the command that fixes it."""


def content_hash(artifact: Path) -> str:
    """sha256 over the weights and architecture: what a cache or a diffusion model depends on."""
    artifact = Path(artifact)
    return hashlib.sha256((file_hash(artifact / "model.safetensors") +
                           file_hash(artifact / "config.yaml")).encode()).hexdigest()


def state_to_safetensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """safetensors only: weights never travel as pickles."""
    try:
        return load_file(str(path))
    except Exception as exc:
        raise ArtifactError(f"cannot read weights {path}: {exc}. The file is corrupt or not safetensors; "
                            "re-create the artifact with the stage that wrote it") from exc


# ---------------------------------------------------------------------------------------------- autoencoder

def write_provenance(directory: Path, provenance: dict | None) -> None:
    if provenance is not None:
        (directory / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")


def save_autoencoder(final: Path, model: torch.nn.Module, arch: dict, calibration: dict | None,
                     metrics: dict, provenance: dict | None = None) -> None:
    """Weights, architecture, calibration, metrics and provenance (see ldm_train/pipeline/provenance.py)."""

    def write(tmp: Path) -> None:
        save_file(state_to_safetensors(model), str(tmp / "model.safetensors"))
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"architecture": arch})))
        if calibration is not None:
            (tmp / "calibration.json").write_text(json.dumps(calibration, indent=2, sort_keys=True) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        write_provenance(tmp, provenance)

    log_replacement(final, provenance)
    atomic_write_dir(final, write)


def stage1_command(regularizer: str, f: int | str) -> str:
    """The stage-1 command for this autoencoder, with the user's own overrides (see ldm_train.commands)."""
    return suggest_command("stage=autoencoder", f"f={f}", f"regularizer={regularizer}")


def artifact_choice(arch: dict) -> tuple[str, str]:
    """The `f=` and `regularizer=` overrides that address an autoencoder artifact of this architecture."""
    return f"f={arch['f']}", f"regularizer={arch['regularizer']['name']}"


def read_arch(artifact: Path) -> dict:
    artifact = Path(artifact)
    if not (artifact / "model.safetensors").exists() or not (artifact / "config.yaml").exists():
        raise ArtifactError(f"no autoencoder artifact at {artifact}")
    return OmegaConf.to_container(OmegaConf.load(artifact / "config.yaml"))["architecture"]


def load_autoencoder(artifact: Path, expect_f: int | None = None, expect_regularizer: str | None = None,
                     require_calibration: bool = True) -> tuple[torch.nn.Module, dict]:
    """Rebuild the exact trained architecture, strict-load its weights, freeze it; returns (model, calibration)."""
    from ldm_train.models.autoencoder import Autoencoder
    from ldm_train.models.regularizers import REGULARIZERS

    artifact = Path(artifact)
    if not (artifact / "model.safetensors").exists():
        hint = stage1_command(expect_regularizer or f"<{'|'.join(REGULARIZERS)}>", expect_f or "<f>")
        raise ArtifactError(f"no autoencoder artifact at {artifact}: train it first with `{hint}` "
                            "(or point autoencoder.path= at an existing one)")
    arch = read_arch(artifact)
    if expect_f is not None and int(arch["f"]) != int(expect_f):
        raise ArtifactError(f"autoencoder {artifact} has f={arch['f']}, but the run asks for f={expect_f}")
    if expect_regularizer is not None and arch["regularizer"]["name"] != expect_regularizer:
        raise ArtifactError(f"autoencoder {artifact} is {arch['regularizer']['name']}, "
                            f"but the run asks for regularizer={expect_regularizer}")
    model = Autoencoder(arch)
    try:
        model.load_state_dict(load_weights(artifact / "model.safetensors"), strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"weights in {artifact} do not match its config.yaml: {exc}") from exc
    calibration = read_calibration(artifact) if require_calibration else None
    return freeze(model), calibration


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no grad, and `train()` disabled: a frozen first stage never goes back to training."""
    model.eval()
    model.requires_grad_(False)
    model.train = lambda mode=True: model  # type: ignore[method-assign]
    return model


def read_calibration(artifact: Path) -> dict:
    path = Path(artifact) / "calibration.json"
    if not path.exists():
        arch = read_arch(artifact)
        raise ArtifactError(
            f"autoencoder {artifact} is not calibrated ({path.name} missing): run "
            f"`{suggest_command('stage=calibrate', *artifact_choice(arch))}`")
    data = json.loads(path.read_text())
    scale = data.get("scale_factor")
    if not isinstance(scale, (int, float)) or not scale > 0 or scale != scale:
        raise ArtifactError(f"{path} holds no valid scale_factor ({scale!r}); re-run stage=calibrate")
    return data


# ---------------------------------------------------------------------------------------------- diffusion

def save_diffusion(final: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None, config: dict,
                   autoencoder: Path, metrics: dict, provenance: dict | None = None,
                   extra: Callable[[Path], None] | None = None) -> None:
    """EMA U-Net (+ a trainable text encoder) as safetensors, its config, the autoencoder reference, provenance;
    `extra(tmp)` adds further files (an imported text tower) inside the same atomic write."""

    def write(tmp: Path) -> None:
        save_file(state_to_safetensors(unet), str(tmp / "model.safetensors"))
        if text_encoder is not None:
            save_file(state_to_safetensors(text_encoder), str(tmp / "text_encoder.safetensors"))
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
        ref = {"path": str(Path(autoencoder).resolve()), "content_hash": content_hash(autoencoder)}
        (tmp / "autoencoder.json").write_text(json.dumps(ref, indent=2) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        write_provenance(tmp, provenance)
        if extra is not None:
            extra(tmp)

    log_replacement(final, provenance)
    atomic_write_dir(final, write)


def read_diffusion(artifact: Path) -> tuple[dict, Path]:
    """(config, autoencoder path) of a diffusion artifact, checking its autoencoder still has the same hash."""
    artifact = Path(artifact)
    if not (artifact / "model.safetensors").exists():
        raise ArtifactError(f"no diffusion artifact at {artifact}: train one with "
                            f"`{suggest_command('stage=diffusion')}` (or set diffusion_path=)")
    config = OmegaConf.to_container(OmegaConf.load(artifact / "config.yaml"))
    ref = json.loads((artifact / "autoencoder.json").read_text())
    ae = Path(ref["path"])
    if not (ae / "model.safetensors").exists():
        raise ArtifactError(f"the autoencoder of {artifact} is gone: {ae}")
    if content_hash(ae) != ref["content_hash"]:
        raise ArtifactError(f"the autoencoder at {ae} changed since {artifact} was trained (content hash "
                            "mismatch); retrain stage 2 or restore that autoencoder")
    return config, ae


__all__ = ["ArtifactError", "ConfigError", "content_hash", "load_autoencoder", "read_calibration", "read_diffusion",
           "save_autoencoder", "save_diffusion"]
