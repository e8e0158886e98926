"""`stage=import source=<diffusers folder | single file> name=<name>`: a Stable Diffusion model → our artifacts."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from ldm_train.config import ConfigError, artifacts_root

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Convert everything in memory, then write `autoencoder/<name>` and `diffusion/<name>` (all or nothing)."""
    from omegaconf import OmegaConf

    from ldm_train.interop.diffusers_import import convert, write_artifacts
    from ldm_train.interop.single_file import convert_single_file

    if not cfg.get("source"):
        raise ConfigError("stage=import needs source=<a diffusers pipeline folder or a single .safetensors/.ckpt "
                          "file> (and name=<artifact name>)")
    source = Path(cfg.source).expanduser()
    if not source.exists():
        raise ConfigError(f"source={source} does not exist")
    ae_dir, diff_dir = (artifacts_root(cfg) / kind / cfg.name for kind in ("autoencoder", "diffusion"))
    existing = [str(p) for p in (ae_dir, diff_dir) if p.exists()]
    if existing and not cfg.get("overwrite", False):
        raise ConfigError(f"{' and '.join(existing)} already exist: choose another name= or pass overwrite=true")
    with tempfile.TemporaryDirectory(prefix="ldm_import_") as work:
        if source.is_dir():
            imported = convert(source, Path(work))
        else:
            options = OmegaConf.to_container(cfg.get("import") or {}, resolve=True)
            imported = convert_single_file(source, Path(work), options)
        for note in imported.notes:
            log.warning("%s", note)
        imported.calibration["measured"] = measure_scale(imported, cfg)
        write_artifacts(imported, ae_dir, diff_dir)
    written = [str(ae_dir)] + ([str(diff_dir)] if imported.text_folder is not None else [])
    log.info("imported %s → %s (VAE scale factor %.5f, stored)", source, " and ".join(written),
             imported.calibration["scale_factor"])
    if imported.sampling:
        log.info("sampling: %s, %s spacing, steps_offset %d; prediction %s", imported.sampling["sampler"],
                 imported.sampling["timestep_spacing"], imported.sampling["steps_offset"],
                 imported.diffusion["prediction_type"])
    return {"autoencoder": str(ae_dir), "diffusion": str(diff_dir) if len(written) > 1 else None,
            "unet_tensors": len(imported.unet_state), "vae_tensors": len(imported.vae_state),
            "notes": imported.notes}


def measure_scale(imported, cfg: DictConfig) -> dict | None:
    """The latent scale measured on the data at hand, recorded next to the stored one (which stays the one used):
    `import.measure_samples` validation images of the command's `data=` (default: shapes) at the model's
    resolution, encoded only (no reconstruction). 0 samples: not measured (None)."""
    import torch
    from omegaconf import OmegaConf, open_dict
    from torch.utils.data import DataLoader, Subset

    from ldm_train.data import build_datasets
    from ldm_train.models.autoencoder import Autoencoder
    from ldm_train.pipeline.calibration import calibrate, calibration_sample

    n = int((cfg.get("import") or {}).get("measure_samples", 0) or 0)
    if n <= 0:
        return None
    arch = imported.vae_arch
    resolution = int(imported.interop.get("sample_size") or 0) * arch["f"] or int(arch["resolution"])
    data = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True))
    with open_dict(data):
        data.resolution = resolution
    _, val = build_datasets(data)
    n = min(n, len(val))
    model = Autoencoder(arch)
    model.load_state_dict(imported.vae_state, strict=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.eval().to(device)
    with torch.no_grad():
        cal = calibrate(model, DataLoader(Subset(val, range(n)), batch_size=min(n, 8)), n, device,
                        sample=calibration_sample(cfg), seed=int(cfg.autoencoder.calibration.get("seed", 0)),
                        reconstruct=False)
    measured = {k: cal[k] for k in ("scale_factor", "raw_std", "raw_mean", "num_samples", "latent")}
    measured["on"] = f"data={cfg.data.name}, {n} validation images at {resolution} px"
    log.info("latent scale factor: stored %.5f (used), measured %.5f on %s", imported.calibration["scale_factor"],
             measured["scale_factor"], measured["on"])
    return measured
