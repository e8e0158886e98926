"""Stage 2 under bf16-mixed with the fused AdamW and gradient clipping (the GPU default: precision auto → bf16-mixed).

Lightning's mixed-precision plugin refuses to clip gradients for a fused optimizer; the same plugin runs bf16-mixed on
the CPU, so this reproduces on the CPU what a first GPU run showed.
"""

import torch
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import OmegaConf

from ldm_train.__main__ import run
from tests.test_stage2 import compose_cfg, copy_autoencoder, overrides


def test_stage2_bf16_mixed_fused_adamw_clips(smoke_autoencoder, tmp_path, monkeypatch):
    clipped = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, norm, *a, **k: clipped.append(norm) or real_clip(params, norm, *a, **k))
    ae = copy_autoencoder(smoke_autoencoder, tmp_path / "ae")
    cfg = compose_cfg(overrides(smoke_autoencoder, tmp_path / "artifacts", "stage=diffusion", f"autoencoder.path={ae}",
                                "trainer.precision=bf16-mixed", "diffusion.max_steps=3", "diffusion.grad_clip=0.5"))
    assert OmegaConf.select(cfg, "diffusion.grad_clip") == 0.5
    metrics = run(cfg)
    assert clipped == [0.5] * 3  # every step clipped, at the configured norm
    assert metrics  # the run finished and reported


def test_fused_optimizer_off_under_fp16_only():
    from types import SimpleNamespace

    from ldm_train.lit.trainer import use_fused_optimizer

    def module(device: str, precision: str | None, strategy=None):
        trainer = None if precision is None else SimpleNamespace(precision=precision, strategy=strategy)
        return SimpleNamespace(device=torch.device(device), _trainer=trainer)

    assert use_fused_optimizer(module("cpu", "32-true")) is True
    assert use_fused_optimizer(module("cpu", "bf16-mixed")) is True
    assert use_fused_optimizer(module("cpu", None)) is True
    assert use_fused_optimizer(module("cpu", "16-mixed")) is None  # the grad scaler must unscale before clipping
    assert use_fused_optimizer(module("meta", "32-true")) is None
    assert use_fused_optimizer(module("cpu", "bf16-mixed", FSDPStrategy())) is None


def stage1_module(*overrides: str):
    from ldm_train.config import resolved_arch
    from ldm_train.lit.autoencoder import AutoencoderModule

    cfg = compose_cfg(["experiment=smoke", "stage=autoencoder", *overrides])
    ae = OmegaConf.to_container(cfg.autoencoder, resolve=True)
    return AutoencoderModule(resolved_arch(cfg), ae["loss"], 1e-6, 1e-3, ae["optimizer"], ae["lr_scheduler"])


def test_no_scalar_parameters_for_fsdp():
    """FSDP refuses 0-d parameters (seen on an H200: loss.logvar); the stage-1 module must have none."""
    module = stage1_module("autoencoder.loss.learn_logvar=true")
    assert [name for name, p in module.named_parameters() if p.ndim == 0] == []
    assert module.loss.logvar.requires_grad  # the learned log-variance is still a trained parameter


def test_resume_from_a_scalar_logvar_checkpoint():
    """A checkpoint written while loss.logvar was 0-d (and its Adam state) loads into the (1,)-shaped parameter."""
    module = stage1_module("autoencoder.loss.learn_logvar=true")
    opt_g = module.configure_optimizers()[0]
    for p in opt_g.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt_g.step()
    index = next(i for i, p in enumerate(opt_g.param_groups[0]["params"]) if p is module.loss.logvar)
    old = {"state_dict": {**module.state_dict(), "loss.logvar": torch.tensor(0.25)},
           "optimizer_states": [opt_g.state_dict()]}
    state = old["optimizer_states"][0]["state"][index]
    state.update(exp_avg=state["exp_avg"].reshape(()), exp_avg_sq=state["exp_avg_sq"].reshape(()))
    module.on_load_checkpoint(old)
    module.load_state_dict(old["state_dict"])
    assert module.loss.logvar.shape == (1,) and float(module.loss.logvar.detach()) == 0.25
    opt_g.load_state_dict(old["optimizer_states"][0])
    opt_g.step()  # the reshaped Adam state fits the parameter (the fused kernel checks shapes)
    assert module.loss.logvar.shape == (1,)
