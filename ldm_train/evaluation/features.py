"""Feature networks for Fréchet distances, each with the metric names it earns.

Only torchmetrics' InceptionV3 (torch-fidelity's FID weights) gives `fid` / `rfid`. The project's own
shapes network (a small CNN trained to read colour, shape and position, `scripts/train_shapes_features.py`)
gives `fd_shapes` / `rfd_shapes`: a Fréchet distance in its 32-d feature space (few dimensions, so a few hundred
samples give a usable estimate), comparable only between runs that used the same weights file (its sha256 is
reported with the numbers) and the same number of samples (the estimate is biased upwards at small N).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm_train.errors import UserError

log = logging.getLogger(__name__)

FEATURES = ("auto", "inception", "shapes", "none")
SHAPES_INPUT = 32  # the shapes network sees every image at 32 px, whatever the data resolution


class FeatureNetworkError(UserError, RuntimeError):
    """The requested feature network cannot be built; the message names the fix."""


@dataclass
class FeatureNetwork:
    """A frozen extractor for torchmetrics' FID (`num_features`, takes floats in [0, 1]) and its metric names."""

    module: nn.Module
    name: str          # "inception" | "shapes"
    fid_key: str       # generated vs real
    rfid_key: str      # reconstructions vs originals
    weights_sha256: str | None = None


def metric_names(name: str) -> tuple[str, str]:
    """(generation, reconstruction) keys: `fid`/`rfid` only for Inception, `fd_<net>`/`rfd_<net>` otherwise."""
    return ("fid", "rfid") if name == "inception" else (f"fd_{name}", f"rfd_{name}")


# ---------------------------------------------------------------------------------------------- shapes network

class ShapesFeatureNet(nn.Module):
    """Small CNN: 32 px image → 32-d feature → colour / shape / position logits (trained on shapes data)."""

    num_features = 32

    def __init__(self, num_colors: int = 8, num_shapes: int = 3, num_positions: int = 5):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 4, stride=2, padding=1), nn.SiLU(),    # 16 px (stride 2 at once: 5× cheaper)
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),   # 8 px
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),   # 4 px: position survives the flatten
            nn.Flatten(), nn.Linear(64 * 16, self.num_features))
        self.heads = nn.ModuleDict({"color": nn.Linear(self.num_features, num_colors),
                                    "shape": nn.Linear(self.num_features, num_shapes),
                                    "position": nn.Linear(self.num_features, num_positions)})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, 64)."""
        if x.shape[-2:] != (SHAPES_INPUT, SHAPES_INPUT):
            x = F.interpolate(x, size=(SHAPES_INPUT, SHAPES_INPUT), mode="bilinear", align_corners=False)
        return self.body(x)

    def logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.silu(self.features(x))
        return {k: head(h) for k, head in self.heads.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """torchmetrics' FID entry point: floats in [0, 1] → features (B, 32)."""
        return self.features(x.float() * 2 - 1)


def train_shapes_features(path: Path, steps: int = 400, batch_size: int = 64, lr: float = 2e-3,
                          seed: int = 0, pool: int = 4096) -> dict:
    """Train ShapesFeatureNet on the shapes train split and save it (atomically) as safetensors; returns stats.

    `pool` images are rendered once and reused (rendering dominates otherwise); held-out accuracy is measured on
    the validation split.
    """
    from safetensors.torch import save_file

    from ldm_train.data.shapes import ShapesDataset
    from ldm_train.pipeline.artifacts import state_to_safetensors
    from ldm_train.utils.io import atomic_write_json

    torch.manual_seed(seed)
    start = time.time()
    train = _render(ShapesDataset(SHAPES_INPUT, pool, "train", seed))
    net = ShapesFeatureNet()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(pool, (batch_size,), generator=gen)
        x = train["image"][idx]
        x = x + 0.05 * torch.randn(x.shape, generator=gen)  # robust to the mild noise of generated samples
        logits = net.logits(x)
        loss = sum(F.cross_entropy(logits[k], train[k][idx]) for k in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    accuracy = shapes_accuracy(net, _render(ShapesDataset(SHAPES_INPUT, 1024, "val", seed)))
    stats = {"steps": steps, "train_seconds": time.time() - start, "val_accuracy": accuracy}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state_to_safetensors(net), str(tmp))
    tmp.replace(path)  # readers never see half a weights file
    atomic_write_json(path.with_suffix(".json"), stats)
    log.info("shapes feature network: %d steps in %.0f s, held-out accuracy %s → %s", steps,
             stats["train_seconds"], {k: round(v, 3) for k, v in accuracy.items()}, path)
    return stats


def _render(ds) -> dict[str, torch.Tensor]:
    items = [ds[i] for i in range(len(ds))]
    return {"image": torch.stack([it["image"] for it in items]),
            **{k: torch.tensor([it[k] for it in items]) for k in ("color", "shape", "position")}}


@torch.no_grad()
def shapes_accuracy(net: ShapesFeatureNet, data: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-attribute accuracy of the heads, and `all` (every attribute right)."""
    logits = net.logits(data["image"])
    hits = {k: logits[k].argmax(-1) == data[k] for k in logits}
    out = {k: float(v.float().mean()) for k, v in hits.items()}
    out["all"] = float(torch.stack(list(hits.values())).all(0).float().mean())
    return out


def train_command(path: Path) -> str:
    return f"python scripts/train_shapes_features.py --out {path}"


def load_shapes_features(path: Path, train_if_missing: bool = True) -> FeatureNetwork:
    """The shapes network from `path`; trained there first (about a minute on 2 cores) when it is missing."""
    from ldm_train.pipeline.artifacts import load_weights
    from ldm_train.utils.io import file_hash

    path = Path(path)
    if not path.exists():
        if not train_if_missing:
            raise FeatureNetworkError(f"no shapes feature network at {path}: train it with `{train_command(path)}`")
        log.info("no shapes feature network at %s: training it now (once; `%s` does the same)", path,
                 train_command(path))
        train_shapes_features(path)
    net = ShapesFeatureNet()
    try:
        net.load_state_dict(load_weights(path), strict=True)
    except RuntimeError as exc:
        raise FeatureNetworkError(f"{path} is not a ShapesFeatureNet ({exc}); delete it and run "
                                  f"`{train_command(path)}`") from exc
    fid_key, rfid_key = metric_names("shapes")
    return FeatureNetwork(net.eval().requires_grad_(False), "shapes", fid_key, rfid_key, file_hash(path))


# ---------------------------------------------------------------------------------------------- inception

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID InceptionV3


def inception_available(weights_path: str | None = None) -> bool:
    if importlib.util.find_spec("torch_fidelity") is None:
        return False
    return bool(weights_path and Path(weights_path).exists()) or _try_inception(weights_path) is not None


def _try_inception(weights_path: str | None) -> nn.Module | None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    try:  # torch-fidelity loads the cache or downloads; offline machines without the cache fail here
        return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights_path).inception
    except Exception as exc:
        log.debug("InceptionV3 for FID unavailable: %s", exc)
        return None


def load_inception(weights_path: str | None = None) -> FeatureNetwork:
    """torchmetrics' FID InceptionV3, or a FeatureNetworkError naming the package, the file and the alternatives."""
    alternatives = ("or choose another feature network: eval.features=shapes (shapes data; reported as fd_shapes, "
                    "not fid) or eval.features=none")
    if importlib.util.find_spec("torch_fidelity") is None:
        raise FeatureNetworkError("FID needs torch-fidelity's InceptionV3: `pip install torch-fidelity` (and its "
                                  f"weights file {INCEPTION_FILE}), {alternatives}")
    module = _try_inception(weights_path)
    if module is None:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        raise FeatureNetworkError(f"the FID InceptionV3 weights are missing and cannot be downloaded: put "
                                  f"{INCEPTION_FILE} at {cache} (or set eval.inception_weights=<file>), "
                                  f"{alternatives}")
    return FeatureNetwork(_InceptionUnit(module), "inception", *metric_names("inception"))


class _InceptionUnit(nn.Module):
    """Inception from floats in [0, 1] (torchmetrics' custom-module path passes images through untouched)."""

    def __init__(self, inception: nn.Module):
        super().__init__()
        self.inception = inception
        self.num_features = 2048

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inception((x * 255).round().clamp(0, 255).to(torch.uint8))


# ---------------------------------------------------------------------------------------------- choice

def resolve_features(choice: str, data_name: str, shapes_path: Path, inception_weights: str | None = None,
                     train_if_missing: bool = True) -> FeatureNetwork | None:
    """`eval.features`: inception (required), shapes, none, or auto (inception when present, else shapes on
    shapes data, else a FeatureNetworkError)."""
    if choice not in FEATURES:
        raise FeatureNetworkError(f"unknown eval.features={choice!r}; valid: {', '.join(FEATURES)}")
    if choice == "none":
        return None
    if choice == "inception" or (choice == "auto" and inception_available(inception_weights)):
        return load_inception(inception_weights)
    if choice == "auto" and data_name != "shapes":
        load_inception(inception_weights)  # raises with the remedy
    if choice == "auto":
        log.warning("FID InceptionV3 not available: Fréchet distances use the shapes feature network and are "
                    "named fd_shapes / rfd_shapes (not fid). Set eval.features=inception to require FID.")
    return load_shapes_features(shapes_path, train_if_missing)
