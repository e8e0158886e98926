"""Reading foreign weight files safely: safetensors, or a pickle (`.bin`, `.ckpt`, `.pt`) only through
`torch.load(weights_only=True)`, which refuses any pickle that would construct objects or call code."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


class UnsafeWeightsError(ValueError):
    """A pickle that holds more than tensors (code, arbitrary objects): refused without running it."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from a .safetensors file or a tensors-only pickle (a `state_dict` wrapper is
    unwrapped, as the original CompVis checkpoints hold one)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:
            raise ValueError(f"cannot read {path}: {exc}. The file is corrupt or not safetensors") from exc
    if path.suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: unknown weights format {path.suffix!r}; expected .safetensors or "
                         f"{'/'.join(PICKLE_SUFFIXES)}")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeWeightsError(
            f"{path} is a pickle that holds more than tensors (code or arbitrary objects), so it was refused "
            f"without being run ({str(exc).splitlines()[0]}). Convert it to .safetensors with a tool you trust, "
            "or get the .safetensors release of the model") from exc
    except Exception as exc:
        raise ValueError(f"cannot read {path}: {exc}. The file is corrupt or not a torch checkpoint") from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(data):
        others = sorted(k for k in data if k not in tensors)
        raise ValueError(f"{path}: {len(others)} entries are not tensors ({', '.join(others[:5])}); "
                         "expected a flat state dict")
    return tensors


def find_weights(folder: Path, stem: str = "diffusion_pytorch_model") -> Path:
    """The weights file of a diffusers component folder: `<stem>.safetensors`, else `<stem>.bin`."""
    folder = Path(folder)
    for suffix in (".safetensors", ".bin"):
        if (folder / f"{stem}{suffix}").exists():
            return folder / f"{stem}{suffix}"
    sharded = sorted(folder.glob(f"{stem}*.index.json"))
    hint = " (sharded checkpoints are not supported: merge the shards first)" if sharded else ""
    raise FileNotFoundError(f"no {stem}.safetensors or {stem}.bin in {folder}{hint}")


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a .safetensors file ({} for other formats or none)."""
    if Path(path).suffix != ".safetensors":
        return {}
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})
