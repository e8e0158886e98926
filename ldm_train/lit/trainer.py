"""Lightning Trainer and logger construction shared by both training stages."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf

from ldm_train.config import ConfigError, run_dir
from ldm_train.lit.mfu import MFUMonitor
from ldm_train.lit.nonfinite import NonFiniteGuard
from ldm_train.lit.optim import ScheduleToTime
from ldm_train.lit.progress import StepProgress
from ldm_train.lit.resume import ResumeCallback

log = logging.getLogger(__name__)

# Lightning notices that are expected here: frozen modules (LPIPS, the first stage, frozen text encoders) sit in
# eval mode by design, and checkpoints of manual optimisation hold the post-step state, which is what resume needs.
_EXPECTED = (r".*module\(s\) in eval mode.*", r".*ModelCheckpoint with manual optimization.*",
             r".*isinstance\(treespec, LeafSpec\).*",
             r".*The dirpath has changed from.*")  # each run has its own folder; resuming reads another one


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def quiet_lightning() -> None:
    """One copy of each Lightning log line (through Hydra's handlers), without advertising tips."""
    root = logging.getLogger()
    if root.handlers:  # under Hydra the root logger prints; Lightning's own handlers would double every line
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).handlers.clear()
            logging.getLogger(name).propagate = True
        for handler in root.handlers:
            if not any(isinstance(f, _DropTips) for f in handler.filters):
                handler.addFilter(_DropTips())
    for pattern in _EXPECTED:
        warnings.filterwarnings("ignore", message=pattern)


def wandb_mode(requested: str) -> str:
    """auto → online only when credentials or WANDB_MODE are configured, so no run ever blocks on a login prompt."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
    return "online" if has_key else "offline"


def build_logger(cfg: DictConfig, job_type: str):
    name = cfg.logger.name
    save_dir = str(run_dir(cfg))
    if name == "none":
        return False
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir, name="csv", version=job_type)  # <run dir>/csv/<stage>/metrics.csv
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir, name="tensorboard", version=job_type)
    if name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        mode = wandb_mode(cfg.logger.get("mode", "auto"))
        group = sweep_group(cfg)
        if mode == "offline" and group is None:  # in a sweep, one command for all jobs is printed at its end
            log.info("wandb runs offline (no API key or WANDB_MODE); upload later with `wandb sync %s/wandb`",
                     save_dir)
        return WandbLogger(project=cfg.logger.project, name=f"{cfg.name}-{job_type}", job_type=job_type,
                           group=group, tags=[f"f{cfg.f}", cfg.regularizer.name], save_dir=save_dir, mode=mode,
                           config=OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))
    raise ConfigError(f"unknown logger {name!r}; valid: wandb, csv, tensorboard, none")


def sweep_group(cfg: DictConfig) -> str | None:
    """wandb group: `logger.group` when set, else in a multirun the sweep's readable name (swept keys and values,
    recorded in sweep.json before the first job) or the sweep folder's name (one group per ablation)."""
    if cfg.logger.get("group"):
        return str(cfg.logger.group)
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        from ldm_train.evaluation.sweep import read_sweep

        sweep = Path(HydraConfig.get().sweep.dir)
        return read_sweep(sweep).get("group") or sweep.name
    return None


def finish_logger(summary: dict | None = None) -> None:
    """End this stage's wandb run with its returned metrics as the run summary; the next stage opens its own."""
    import sys

    if "wandb" not in sys.modules:  # nothing logged to wandb in this process
        return
    import wandb

    if wandb.run is None:
        return
    if summary:
        wandb.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
    wandb.finish()


def build_strategy(cfg: DictConfig, find_unused_parameters: bool = False):
    """`strategy` group → Lightning strategy. `find_unused_parameters`: a stage whose backward passes each use only
    part of the parameters (stage 1: generator, then discriminator) needs DDP to look for the unused ones."""
    s = cfg.strategy
    if s.name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=find_unused_parameters or s.get("find_unused_parameters", False),
                           broadcast_buffers=s.get("broadcast_buffers", False))
    if s.name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        return FSDPStrategy(sharding_strategy=s.get("sharding_strategy", "FULL_SHARD"))
    return s.name


def resolve_precision(precision: str | int, accelerator: str) -> str | int:
    """`trainer.precision: auto` → bf16-mixed where the run lands on a CUDA GPU with bf16, else 32-true."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if on_cuda(accelerator) and torch.cuda.is_bf16_supported() else "32-true"


def on_cuda(accelerator: str) -> bool:
    """Whether `trainer.accelerator` lands this run on a CUDA GPU."""
    return torch.cuda.is_available() and accelerator in ("gpu", "cuda", "auto")


def use_fused_optimizer(module: L.LightningModule) -> bool | None:
    """Fused Adam/AdamW (one kernel for all parameters) on CUDA and the CPU, except (None: torch's foreach default)
    - under fp16 mixed precision: the grad scaler unscales inside a fused step, after clipping saw scaled gradients;
    - under FSDP: its first step failed on an H200 ("params, grads, exp_avgs, and exp_avg_sqs must have same dtype,
      device, and layout")."""
    if module.device.type not in ("cuda", "cpu"):
        return None
    trainer = module._trainer
    if trainer is None:
        return True
    if str(trainer.precision) in ("16-mixed", "16") or isinstance(trainer.strategy, FSDPStrategy):
        return None
    return True


def clip_gradients(optimizer: torch.optim.Optimizer, value: float | None, algorithm: str | None) -> None:
    """Gradient clipping for `configure_gradient_clipping`. Lightning's mixed-precision plugin refuses any fused
    optimizer (it assumes fp16 unscaling inside the step); with `use_fused_optimizer` the gradients here are true
    values (bf16 has no scaler; fp16 gets an unfused optimizer, unscaled by Lightning before this hook)."""
    if not value:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(params, value)
    else:
        torch.nn.utils.clip_grad_norm_(params, value)  # no host synchronisation


def global_batch(trainer: L.Trainer, batch_size: int, stage: str) -> int:
    """Images per optimizer step = batch per device × devices × nodes × accumulation; logged at the start."""
    devices, nodes = trainer.num_devices, trainer.num_nodes
    accumulate = trainer.accumulate_grad_batches
    total = batch_size * devices * nodes * accumulate
    log.info("%s: global batch %d = %d per device × %d device(s) × %d node(s) × %d accumulation", stage, total,
             batch_size, devices, nodes, accumulate)
    return total


def build_trainer(cfg: DictConfig, *, job_type: str, max_steps: int, val_every: int, callbacks=(),
                  limit_val_batches: int | None = None, max_time: str | None = None,
                  steps_per_batch: int = 1, gradient_clip_val: float | None = None,
                  find_unused_parameters: bool = False, sync_batchnorm: bool = False,
                  schedule_to_time: bool = False) -> L.Trainer:
    """A Trainer for one stage; the stage's own `max_time` (if set) wins over `trainer.max_time`.

    `steps_per_batch`: optimizer steps per batch (2 in stage 1), so checkpoints follow `val_every` batches.
    `sync_batchnorm`: Lightning converts every BatchNorm to SyncBatchNorm (GPU only; stage 1's discriminator).
    `schedule_to_time`: the LR schedule ends where `max_time` will stop the run (ScheduleToTime).
    """
    quiet_lightning()
    t = cfg.trainer
    ckpt = ModelCheckpoint(dirpath=run_dir(cfg) / "checkpoints", save_last=True, save_top_k=0,
                           every_n_train_steps=max(1, val_every) * steps_per_batch)
    checkpoints = run_dir(cfg) / "checkpoints"
    guard = NonFiniteGuard(checkpoints, t.get("max_nonfinite_steps", 10))
    # after the guard, so the counts a preemption checkpoint holds are current
    resume = ResumeCallback(job_type, checkpoints, run_stage=cfg.stage, steps_per_batch=steps_per_batch)
    callbacks = [ckpt, guard, resume, *callbacks]
    if on_cuda(t.accelerator):
        torch.set_float32_matmul_precision(t.get("float32_matmul_precision", "high"))
    if schedule_to_time and (max_time or t.max_time):
        callbacks.append(ScheduleToTime(steps_per_batch))
    if t.get("mfu", True):
        callbacks.append(MFUMonitor(t.get("peak_tflops", "auto")))
    # the bar reads its metrics (a host sync) at each refresh: refresh when logging
    callbacks.append(StepProgress(job_type, max_steps // steps_per_batch, steps_per_batch,
                                  refresh_every=max(1, t.log_every_n_steps), bar=bool(t.enable_progress_bar)))
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        precision=resolve_precision(t.precision, t.accelerator),
        strategy=build_strategy(cfg, find_unused_parameters), sync_batchnorm=sync_batchnorm,
        accumulate_grad_batches=t.get("accumulate_grad_batches", 1), max_steps=max_steps,
        max_time=max_time or t.max_time,
        val_check_interval=val_every, check_val_every_n_epoch=None, limit_val_batches=limit_val_batches,
        log_every_n_steps=t.log_every_n_steps, enable_progress_bar=False,  # StepProgress draws the bar
        deterministic=t.deterministic, benchmark=bool(t.get("benchmark", True)) and not t.deterministic,
        gradient_clip_val=gradient_clip_val, logger=build_logger(cfg, job_type),
        callbacks=callbacks,
        default_root_dir=str(run_dir(cfg)), num_sanity_val_steps=0, enable_model_summary=False,
    )


def save_final_checkpoint(trainer: L.Trainer, cfg: DictConfig) -> None:
    """`last.ckpt` at the very end too (periodic saves can miss the last steps); all ranks must call it."""
    trainer.save_checkpoint(run_dir(cfg) / "checkpoints" / "last.ckpt", weights_only=False)
