"""Config plumbing: where the configs live, the `f` architecture table, and start-up validation."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ldm_train.errors import UserError

CONF_DIR = Path(__file__).resolve().parent / "conf"
# The per-f architecture table lives outside CONF_DIR: a folder there would be a Hydra config group named `f`,
# and Hydra would then reject the plain value `f=8` ("Config group override must be a string or a list").
ARCH_DIR = Path(__file__).resolve().parent / "arch"
log = logging.getLogger(__name__)
STAGES = ("autoencoder", "calibrate", "diffusion", "sample", "evaluate", "pipeline", "cache_latents", "import",
          "export", "inspect")


class ConfigError(UserError, ValueError):
    """A configuration the framework refuses; the message names the fix."""


def valid_factors() -> list[int]:
    return sorted(int(p.stem[1:]) for p in ARCH_DIR.glob("f*.yaml"))


def autoencoder_arch(f, regularizer: str) -> dict:
    """The architecture of factor `f` for a regularizer, read from ldm_train/arch/f<f>.yaml (data, not code)."""
    valid = valid_factors()
    try:
        f_int = int(f)
    except (TypeError, ValueError):
        f_int = None
    if f_int not in valid or isinstance(f, bool):
        raise ConfigError(f"invalid f={f!r}: valid downsampling factors are {', '.join(map(str, valid))} "
                          f"(e.g. f=8, or -m f=4,8,16)")
    table = OmegaConf.to_container(OmegaConf.load(ARCH_DIR / f"f{f_int}.yaml"))
    if regularizer not in table:
        raise ConfigError(f"f={f_int} has no {regularizer!r} architecture; valid regularizers: {', '.join(table)}")
    return table[regularizer]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("ldm_arch"):
        # a DictConfig, not a dict: OmegaConf.resolve (and so `--cfg job --resolve`) rejects a plain dict result
        OmegaConf.register_new_resolver("ldm_arch", lambda f, reg: OmegaConf.create(autoencoder_arch(f, reg)))


register_resolvers()


def resolved_arch(cfg: DictConfig) -> dict:
    """The full stage-1 architecture dict that goes into the artifact's config.yaml."""
    from ldm_train.models.autoencoder import downsample_factor
    from ldm_train.models.regularizers import regularizer_class

    ae, reg = cfg.autoencoder, OmegaConf.to_container(cfg.regularizer, resolve=True)
    table = OmegaConf.to_container(ae.arch, resolve=True)
    arch = dict(f=int(cfg.f), in_channels=ae.in_channels, resolution=cfg.data.resolution, ch=ae.ch,
                num_res_blocks=ae.num_res_blocks, num_groups=ae.num_groups, dropout=ae.dropout,
                z_channels=int(ae.get("z_channels") or table["z_channels"]), ch_mult=list(table["ch_mult"]),
                attn_resolutions=list(table["attn_resolutions"]),
                regularizer=regularizer_class(reg["name"]).arch_entries(reg, table))
    f = downsample_factor(arch["ch_mult"])
    if f != arch["f"]:
        raise ConfigError(f"ldm_train/arch/f{cfg.f}.yaml has ch_mult {arch['ch_mult']} (f={f}), not f={cfg.f}")
    if cfg.data.resolution % f:
        raise ConfigError(f"data.resolution={cfg.data.resolution} is not divisible by f={f}; "
                          f"use a multiple of {f}")
    return arch


def validate(cfg: DictConfig) -> None:
    """Checks that need no artifact, done before anything heavy starts."""
    if cfg.stage not in STAGES:
        raise ConfigError(f"unknown stage {cfg.stage!r}; valid: {', '.join(STAGES)}")
    autoencoder_arch(cfg.f, cfg.regularizer.name)
    if cfg.data.name == "latents" and cfg.stage not in ("diffusion", "sample"):
        raise ConfigError(f"data=latents (a latent cache) only feeds stage=diffusion; stage={cfg.stage} needs images: "
                          "choose data=shapes, folder or webdataset")
    if cfg.stage in ("autoencoder", "calibrate", "pipeline"):
        from ldm_train.pipeline.calibration import calibration_sample

        calibration_sample(cfg)
    if cfg.stage == "autoencoder" and not cfg.autoencoder.get("init_from"):
        resolved_arch(cfg)  # with init_from, the artifact's architecture applies
    _validate_buckets(cfg)
    if (cfg.diffusion.get("size_conditioning") and cfg.data.name not in ("folder", "webdataset", "latents")
            and cfg.stage in ("diffusion", "pipeline")):  # latents: the cache must hold them (checked at the start)
        raise ConfigError(f"diffusion.size_conditioning=true needs the images' sizes and crops: data=folder, "
                          f"webdataset or latents (not data={cfg.data.name}); set diffusion.size_conditioning=false")
    if cfg.strategy.name == "fsdp" and not _gpu_run(cfg):
        raise ConfigError("strategy=fsdp needs GPUs (Lightning refuses it on the CPU); use strategy=ddp here")
    for stage, section in (("autoencoder", cfg.autoencoder), ("diffusion", cfg.diffusion)):
        devices = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1
        if cfg.stage in (stage, "pipeline") and section.batch_size < 1:
            raise ConfigError(f"{stage}.batch_size must be at least 1")
        if cfg.stage in (stage, "pipeline") and devices > 1 and section.batch_size < devices:
            raise ConfigError(f"{stage}.batch_size={section.batch_size} is the batch per device; it must be at "
                              f"least 1 on each of the {devices} devices")
        if "lr" in section.optimizer:  # the module passes the stage's lr, which would silently win
            raise ConfigError(f"set the learning rate with {stage}.lr, not {stage}.optimizer.lr")
    _validate_distribution(cfg)
    if cfg.stage in ("diffusion", "pipeline") and not cfg.diffusion.get("init_from"):
        _check_unet_fits(cfg)  # with init_from, the artifact's architecture applies (checked at stage start)
    if cfg.stage in ("diffusion", "pipeline"):
        _check_objective(cfg)
    if cfg.stage in ("autoencoder", "pipeline") and (warning := idle_discriminator_warning(cfg.autoencoder)):
        log.warning(warning)
    if cfg.diffusion.get("zero_terminal_snr") and cfg.diffusion.prediction_type != "v":
        # at ᾱ_T = 0 the input is pure noise, so ε = x_T is trivial and x0 cannot be recovered from it
        raise ConfigError(f"diffusion.zero_terminal_snr=true needs diffusion.prediction_type=v (got "
                          f"{cfg.diffusion.prediction_type!r}): at SNR 0 an ε-prediction carries no information about "
                          "the image; set diffusion.prediction_type=v or diffusion.zero_terminal_snr=false")
    disc = cfg.autoencoder.loss.disc
    if cfg.stage in ("autoencoder", "pipeline") and disc.norm == "batch" and cfg.autoencoder.batch_size < 2:
        raise ConfigError("a BatchNorm discriminator cannot train at batch size 1: set autoencoder.batch_size>=2 "
                          "or autoencoder.loss.disc.norm=group")
    from ldm_train.checks import check_run_inputs  # here: checks imports this module

    check_run_inputs(cfg)


def idle_discriminator_warning(ae: DictConfig) -> str | None:
    """The warning for a discriminator that is configured but never trains: the adversarial term starts at batch
    index `disc_start` (0-based) and training ends after `max_steps` batches. None when it runs, or when it is off
    (`loss.disc_start: null`)."""
    start = ae.loss.disc_start
    if start is None or start < ae.max_steps:
        return None
    return (f"autoencoder.loss.disc_start={start} >= autoencoder.max_steps={ae.max_steps}: the discriminator you "
            "configured will never run. Lower disc_start, raise max_steps, or set autoencoder.loss.disc_start=null "
            "to train without the adversarial term.")


def _validate_buckets(cfg: DictConfig) -> None:
    inspect = cfg.stage == "inspect"  # reports the bucket set whether buckets are on or not, a square-only one too
    if not (cfg.data.get("aspect_buckets") or inspect and cfg.data.get("buckets")):
        return
    if not inspect and cfg.data.name not in ("folder", "webdataset"):
        # a latent cache is batched by bucket when it was written with buckets (its cache.json says so)
        raise ConfigError(f"data.aspect_buckets=true applies to images (data=folder or webdataset), not "
                          f"data={cfg.data.name}; set data.aspect_buckets=false"
                          + (" (a latent cache written with buckets is read by bucket anyway)"
                             if cfg.data.name == "latents" else ""))
    from ldm_train.data import config_buckets
    from ldm_train.data.buckets import suggested_buckets

    multiple = size_multiple(cfg)
    try:
        buckets = config_buckets(cfg.data, multiple, force=inspect)
    except ValueError as e:
        raise ConfigError(f"{e}: stage={cfg.stage} needs every image side divisible by {multiple} (f times what the "
                          "denoiser needs of the latent); change those sizes") from None
    if len(buckets) == 1 and not inspect:
        r, d = int(cfg.data.resolution), cfg.data
        listing = ",".join(f"[{h},{w}]" for h, w in suggested_buckets(r, multiple, d.bucket_aspect_range))
        raise ConfigError(f"data.aspect_buckets=true, but at data.resolution={r} with sides multiples of {multiple} "
                          f"and aspect w/h in {list(d.bucket_aspect_range)} the only size of about {r}² pixels is "
                          f"{r}x{r}: every image would be center-cropped as without buckets. List the sizes yourself, "
                          f"e.g. data.buckets=[{listing}] (h, w; each side a multiple of {multiple}), or raise "
                          "data.resolution")


def _validate_distribution(cfg: DictConfig) -> None:
    t, trains_stage1 = cfg.trainer, cfg.stage in ("autoencoder", "pipeline")
    devices = t.devices if isinstance(t.devices, int) else len(t.devices) if not isinstance(t.devices, str) else 1
    if cfg.strategy.name == "auto" and (devices != 1 or t.num_nodes > 1):  # -1: all devices
        raise ConfigError(f"trainer.devices={t.devices} trainer.num_nodes={t.num_nodes} needs strategy=ddp "
                          "(or strategy=fsdp on GPUs)")
    if cfg.strategy.name == "fsdp" and (devices != 1 or t.num_nodes > 1):
        # with more than one shard, the EMA update and the artifact export would see only this rank's shard
        raise ConfigError("strategy=fsdp is supported on one GPU only (trainer.devices=1, trainer.num_nodes=1): "
                          "the EMA and the artifact export do not gather sharded weights yet; use strategy=ddp")
    if trains_stage1 and cfg.strategy.name == "fsdp":
        # seen on an H200 (torch 2.11, Lightning 2.6.6): the first manual_backward of stage 1 stops in FSDP's
        # post-backward hook ("Expects BACKWARD_PRE or BACKWARD_POST state but got HandleTrainingState.FORWARD")
        raise ConfigError(f"strategy=fsdp trains stage 2 only (stage={cfg.stage} trains the autoencoder, whose two-"
                          "optimizer step fails under FSDP): train the autoencoder with strategy=auto or ddp (it "
                          "fits one device), then run stage=diffusion strategy=fsdp")
    if trains_stage1 and t.get("accumulate_grad_batches", 1) != 1:
        raise ConfigError("stage 1 steps both optimizers on every batch and cannot accumulate gradients: set "
                          "trainer.accumulate_grad_batches=1 and raise autoencoder.batch_size or trainer.devices")
    if trains_stage1 and cfg.autoencoder.loss.disc.get("sync_batchnorm") and not _gpu_run(cfg):
        raise ConfigError("autoencoder.loss.disc.sync_batchnorm needs GPUs (torch's SyncBatchNorm refuses CPU "
                          "tensors); set it to false, or use autoencoder.loss.disc.norm=group")


def command_line_overrides(cfg: DictConfig) -> list[str]:
    """The overrides the user typed (`f=8`, …): Hydra's task overrides, or a composed config's `hydra` node."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # no Hydra run (tests, scripts): compose(..., return_hydra_config=True) keeps them
        hydra = cfg.get("hydra") or {}
        return list((hydra.get("overrides") or {}).get("task") or [])


def check_against_artifact(cfg: DictConfig, artifact: Path, values: dict) -> None:
    """A command-line `f=` / `regularizer=` that disagrees with the artifact a run starts from is an error (the
    artifact decides; leaving them out takes its values)."""
    given = dict(o.split("=", 1) for o in command_line_overrides(cfg) if "=" in o and not o.startswith("+"))
    for key, value in values.items():
        if key in given and str(given[key]) != str(value):
            raise ConfigError(f"{key}={given[key]} on the command line, but {artifact} has {key}={value}: drop "
                              f"{key}= (the artifact's architecture is used) or start from another artifact")


def size_multiple(cfg: DictConfig) -> int:
    """What every image side must divide by: f for stage 1 alone, else f times what the denoiser needs of the
    latent (2^(levels − 1) for a U-Net, the patch size for a DiT)."""
    from ldm_train.models.denoisers import latent_multiple

    f = int(cfg.f)
    return f if cfg.stage == "autoencoder" else f * latent_multiple(OmegaConf.to_container(cfg.unet, resolve=True))[0]


def _check_unet_fits(cfg: DictConfig) -> None:
    """The image must divide by f (the autoencoder) times the multiple the denoiser needs of the latent
    (2^(levels − 1) for a U-Net, the patch size for a DiT)."""
    from ldm_train.models.denoisers import latent_multiple

    f, res = int(cfg.f), int(cfg.data.resolution)
    multiple, why = latent_multiple(OmegaConf.to_container(cfg.unet, resolve=True))
    need = f * multiple
    if res % need:
        near = [r for r in (res // need * need, res // need * need + need) if r > 0]
        raise ConfigError(f"data.resolution={res} does not fit f={f} with this denoiser: {why}, so the latent "
                          f"(resolution/f) must be divisible by {multiple}, and the image by {need}; use "
                          f"data.resolution={' or '.join(map(str, near))}, or a smaller unet option")


def _check_objective(cfg: DictConfig) -> None:
    """The objective builds and `sampling.sampler` applies to it: refused before training, not at the first grid."""
    from ldm_train.diffusion.parameterization import build_parameterization

    try:
        build_parameterization(OmegaConf.to_container(cfg.diffusion, resolve=True)).sampler(cfg.sampling.sampler)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _gpu_run(cfg: DictConfig) -> bool:
    import torch

    return cfg.trainer.accelerator in ("gpu", "cuda") or (cfg.trainer.accelerator == "auto"
                                                          and torch.cuda.is_available())


def artifacts_root(cfg: DictConfig) -> Path:
    from hydra.utils import to_absolute_path

    try:
        return Path(to_absolute_path(cfg.paths.artifacts))
    except ValueError:  # outside a Hydra run (tests, scripts)
        return Path(cfg.paths.artifacts).resolve()


def autoencoder_artifact(cfg: DictConfig, regularizer: str, f: int) -> Path:
    """Where stage 1 writes the autoencoder of `regularizer` and `f`: <paths.artifacts>/autoencoder/<reg>_f<f>."""
    return artifacts_root(cfg) / "autoencoder" / f"{regularizer}_f{f}"


def autoencoder_dir(cfg: DictConfig) -> Path:
    path = cfg.autoencoder.get("path")
    return Path(path).resolve() if path else autoencoder_artifact(cfg, cfg.regularizer.name, cfg.f)


def diffusion_dir(cfg: DictConfig) -> Path:
    path = cfg.get("diffusion_path")
    return Path(path).resolve() if path else artifacts_root(cfg) / "diffusion" / cfg.name


def run_dir(cfg: DictConfig) -> Path:
    try:
        return Path(cfg.paths.run_dir)
    except Exception:  # ${hydra:...} is unavailable outside a Hydra run
        return Path.cwd()
