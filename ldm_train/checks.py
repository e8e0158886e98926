"""Start-up checks of what a run points at (files, data sizes, sampler settings), before any model or loader is
built: a mistake costs a second and one line (ConfigError), not minutes of loading and a traceback."""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ldm_train.config import ConfigError

READS_DATA = ("autoencoder", "calibrate", "diffusion", "evaluate", "pipeline", "cache_latents")
SAMPLES = ("sample", "evaluate", "pipeline")


def check_run_inputs(cfg: DictConfig) -> None:
    """Every check of this module that applies to `cfg.stage`, except the artifacts (see check_artifacts)."""
    if cfg.logger.name == "tensorboard":
        check_tensorboard()
    if cfg.stage in SAMPLES or cfg.stage == "diffusion":
        check_samplers(cfg)
    if cfg.stage == "sample":
        check_img2img(cfg)
    if cfg.stage in ("evaluate", "pipeline"):
        check_evaluation_size(cfg)
    if cfg.stage in READS_DATA:
        for key in ("root", "urls"):
            if key in cfg.data.keys() and OmegaConf.is_missing(cfg.data, key):
                example = "/path/to/images" if key == "root" else "'/data/shards/train-{000000..000099}.tar'"
                raise ConfigError(f"data={cfg.data.name} needs data.{key}= (e.g. data.{key}={example})")
        if cfg.data.name == "folder":
            check_folder(cfg)
        elif cfg.data.name in ("webdataset", "latents"):
            check_shards(cfg)


def check_tensorboard() -> None:
    """Lightning's TensorBoardLogger needs `tensorboard` (or `tensorboardX`): `make setup` installs it (the dev
    extra), a plain `pip install ldm_train` does not (the `tensorboard` extra does)."""
    import importlib.util

    if not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        raise ConfigError("logger=tensorboard needs the tensorboard package: `pip install tensorboard` (or "
                          "ldm_train's `tensorboard` extra), or choose logger=csv (metrics.csv in the run folder), "
                          "wandb or none")


def check_artifacts(cfg: DictConfig) -> None:
    """The artifact a stage starts from exists (and, for stage 2, is calibrated): the loaders' own messages, raised
    before any model is built. Called by `run`, not by `validate`: a config is valid before its artifacts exist."""
    from ldm_train.config import autoencoder_dir, diffusion_dir
    from ldm_train.pipeline.artifacts import load_autoencoder, read_calibration, read_diffusion

    if cfg.stage in ("calibrate", "diffusion", "cache_latents") and not (
            cfg.stage == "diffusion" and cfg.diffusion.get("init_from")):  # init_from brings its own autoencoder
        artifact = autoencoder_dir(cfg)
        if not (artifact / "model.safetensors").is_file() or not (artifact / "config.yaml").is_file():
            load_autoencoder(artifact, cfg.f, cfg.regularizer.name)  # raises the "train it first with …" error
        if cfg.stage != "calibrate":
            read_calibration(artifact)
    if cfg.stage == "sample" and not (diffusion_dir(cfg) / "model.safetensors").is_file():
        read_diffusion(diffusion_dir(cfg))  # raises the "train one with …" error


def user_path(path: str) -> Path:
    """A path as the user meant it: relative to the folder they launched in (Hydra may change the working dir)."""
    from hydra.utils import to_absolute_path

    try:
        return Path(to_absolute_path(str(path)))
    except ValueError:  # outside a Hydra run
        return Path(path).expanduser().resolve()


def check_samplers(cfg: DictConfig) -> None:
    """The sampler the run will use (`sampling.sampler`: sample, validation, evaluation) is one the framework has."""
    from ldm_train.diffusion.samplers import FLOW_SAMPLERS, SAMPLERS

    value, known = cfg.sampling.sampler, ["auto", *SAMPLERS, *FLOW_SAMPLERS]
    if value not in known:  # which of them fits the model's objective is checked where the objective is known
        raise ConfigError(f"unknown sampler sampling.sampler={value!r}; valid: {', '.join(known)}")


def check_img2img(cfg: DictConfig) -> None:
    """`0 ≤ strength ≤ 1`, and `init_image` is a file."""
    strength = cfg.get("strength")
    if strength is not None and not 0.0 <= float(strength) <= 1.0:
        raise ConfigError(f"strength={strength} is outside [0, 1]: 0 returns the init_image's reconstruction, 1 "
                          "ignores it (e.g. strength=0.75)")
    if cfg.get("init_image"):
        path = user_path(cfg.init_image)
        if not path.is_file():
            raise ConfigError(f"init_image={cfg.init_image}: no such file ({path}); give an image file, or "
                              "init_image=null for text-to-image")


def check_folder(cfg: DictConfig) -> None:
    """`data.root` is a folder of images, and its validation split holds at least `data.min_val_images`."""
    from ldm_train.data import folder_val_size
    from ldm_train.data.folder import list_images

    root = user_path(cfg.data.root)
    if not root.is_dir():
        raise ConfigError(f"data.root={cfg.data.root}: no such folder ({root}); give a folder of images with "
                          "same-name .txt captions (cat.jpg + cat.txt)")
    n = len(list_images(root))
    if n == 0:
        raise ConfigError(f"data.root={cfg.data.root} holds no images (.jpg, .jpeg, .png, .webp, .bmp, searched "
                          "recursively)")
    need, fraction = int(cfg.data.get("min_val_images", 1)), float(cfg.data.val_fraction)
    n_val = folder_val_size(n, fraction)
    if n_val < need:
        if n > need:
            fix = f"data.val_fraction={math.ceil(need / n * 100) / 100:g} ({need} of {n}), or add images"
        else:
            fix = f"add images (at least {need + 1}), or lower data.min_val_images"
        raise ConfigError(f"data.root={cfg.data.root} holds {n} images: data.val_fraction={fraction:g} holds out "
                          f"{n_val} for validation, calibration and evaluation, fewer than data.min_val_images="
                          f"{need}. Fix: {fix}")


def world_size(cfg: DictConfig) -> int | None:
    """Training processes (devices × nodes), or None when the device count is only known at run time."""
    devices = cfg.trainer.devices
    if isinstance(devices, int) and devices > 0:
        return devices * int(cfg.trainer.num_nodes)
    if not isinstance(devices, (int, str)):  # a list of device ids
        return len(devices) * int(cfg.trainer.num_nodes)
    return None


def check_shards(cfg: DictConfig) -> None:
    """Local shards exist, and every (rank, worker) reader gets at least one shard."""
    from ldm_train.data.webdataset import expand_urls, local_path

    data = cfg.data
    for key in ("urls", "val_urls"):
        if not data.get(key):
            continue
        try:
            urls = expand_urls(data[key])
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        paths = [user_path(p) for u in urls if (p := local_path(u)) is not None]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise ConfigError(f"data.{key}: {len(missing)} of {len(urls)} shards do not exist (first: {missing[0]}); "
                              "check the path and the {000000..N} range")
        world = world_size(cfg)
        readers = (world or 1) * max(1, int(data.num_workers))
        if world is not None and len(urls) < readers:
            if data.name == "latents":
                fix = ("rebuild the cache with smaller shards (stage=cache_latents cache.shard_size=<samples / "
                       f"{readers}>)")
            else:
                fix = f"write smaller shards (python -m ldm_train.data.make_shards --shard-size <samples / {readers}>)"
            fits = len(urls) // world  # workers per rank that the shards can feed (0 and 1 both mean one reader)
            fix = f"set data.num_workers={fits}, or {fix}" if fits else fix
            raise ConfigError(f"data.{key} has {len(urls)} shard(s) for {world} rank(s) × {max(1, data.num_workers)} "
                              f"worker(s) = {readers} readers, and every reader needs a shard: {fix}")


def check_evaluation_size(cfg: DictConfig) -> None:
    """A Fréchet distance needs a covariance: at least 2 generated and 2 real images."""
    if cfg.eval.features != "none" and int(cfg.eval.num_samples) < 2:
        raise ConfigError(f"eval.num_samples={cfg.eval.num_samples}: a Fréchet distance needs at least 2 images; "
                          "raise it, or set eval.features=none")
