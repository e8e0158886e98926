"""LR schedules of both stages against hand values; optimizers and schedules built from their config nodes."""

import math

import pytest

from ldm_train.lit.optim import cosine_decay
from tests.conftest import STAGE1_COSINE


@pytest.mark.parametrize(("step", "total", "expected"), [
    (0, 100, 1.0), (50, 100, 0.5), (25, 100, 0.5 * (1 + math.cos(math.pi / 4))), (100, 100, 0.0), (150, 100, 0.0),
])
def test_stage1_cosine_decay(step, total, expected):
    assert cosine_decay(step, total) == pytest.approx(expected, abs=1e-12)


def test_stage1_cosine_schedule_reaches_zero_in_a_smoke_run(compose_cfg, tmp_path):
    """The logged LR of a cosine smoke run falls from the base LR to ~0 at max_steps."""
    import csv

    from ldm_train.__main__ import run

    cfg = compose_cfg(["experiment=smoke", "logger=csv", STAGE1_COSINE,
                       "autoencoder.max_steps=8", "trainer.log_every_n_steps=1",
                       f"paths.artifacts={tmp_path}/a", f"paths.run_dir={tmp_path}/r"])
    run(cfg)
    rows = list(csv.DictReader(open(tmp_path / "r" / "csv" / "autoencoder" / "metrics.csv")))
    lrs = [float(r["train/lr"]) for r in rows if r.get("train/lr")]
    base = cfg.autoencoder.lr
    assert lrs[0] == pytest.approx(base)
    assert lrs[-1] == pytest.approx(base * cosine_decay(7, 8), rel=1e-6)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


# ------------------------------------------------------------------ optimizers and schedules from config


def _stage1_optimizers(*overrides: str):
    from omegaconf import OmegaConf

    from ldm_train.config import resolved_arch
    from ldm_train.lit.autoencoder import AutoencoderModule
    from tests.conftest import compose_cfg

    cfg = compose_cfg(["experiment=smoke", "stage=autoencoder", *overrides])
    ae = OmegaConf.to_container(cfg.autoencoder, resolve=True)
    module = AutoencoderModule(resolved_arch(cfg), ae["loss"], 1e-6, 0.25, ae["optimizer"], ae["lr_scheduler"])
    return module, module.configure_optimizers()


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_stage1_optimizers_come_from_the_config_node():
    import torch

    module, (opt_g, opt_d) = _stage1_optimizers()  # CompVis: Adam, betas (0.5, 0.9), constant LR
    for opt in (opt_g, opt_d):
        assert type(opt) is torch.optim.Adam
        group = opt.param_groups[0]
        assert group["betas"] == (0.5, 0.9) and group["lr"] == 0.25 and group["fused"] is True
    assert {id(p) for p in opt_d.param_groups[0]["params"]} == {id(p) for p in module.loss.discriminator.parameters()}

    _, ((opt_g, _), scheds) = _stage1_optimizers("autoencoder.optimizer._target_=torch.optim.AdamW",
                                                 "autoencoder.optimizer.betas=[0.9,0.99]", STAGE1_COSINE,
                                                 "autoencoder.max_steps=4")
    assert type(opt_g) is torch.optim.AdamW and opt_g.param_groups[0]["betas"] == (0.9, 0.99)
    lrs = []
    for _ in range(5):
        lrs.append(opt_g.param_groups[0]["lr"])
        scheds[0].step()
    assert lrs == pytest.approx([0.25 * cosine_decay(s, 4) for s in range(5)])


def test_default_logvar_is_fixed_and_not_optimised():
    """learn_logvar false by default (CompVis; kl_weight keeps the paper's meaning): no gradient, no optimizer."""
    module, (opt_g, _) = _stage1_optimizers()
    assert not module.loss.logvar.requires_grad
    assert all(p is not module.loss.logvar for group in opt_g.param_groups for p in group["params"])
    module, (opt_g, _) = _stage1_optimizers("autoencoder.loss.learn_logvar=true")  # the documented option
    assert module.loss.logvar.requires_grad
    assert any(p is module.loss.logvar for group in opt_g.param_groups for p in group["params"])


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_stage2_optimizer_and_warmup_come_from_the_config_node():
    from types import SimpleNamespace

    import torch
    from omegaconf import OmegaConf

    from ldm_train.lit.diffusion import DiffusionModule
    from tests.conftest import compose_cfg

    d = OmegaConf.to_container(compose_cfg(["experiment=smoke", "diffusion.lr=0.5", "diffusion.warmup_steps=3",
                                            "diffusion.max_steps=9"]).diffusion, resolve=True)
    net = torch.nn.ModuleDict({"unet": torch.nn.Linear(2, 2)})
    module = SimpleNamespace(cfg=d, trainable=lambda: net, device=torch.device("cpu"), _trainer=None)
    out = DiffusionModule.configure_optimizers(module)
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert type(opt) is torch.optim.AdamW and out["lr_scheduler"]["interval"] == "step"
    group = opt.param_groups[0]
    assert group["weight_decay"] == 0.0 and group["fused"] is True and group["betas"] == (0.9, 0.999)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    # hand values: warm-up 1/3, 2/3, 1 (steps 0-2), then ½(1 + cos(π·(s − 3)/6)) from 1 at step 3 to 0 at step 9
    r3 = math.sqrt(3) / 4  # ½·cos(π/6)
    expected = [1 / 3, 2 / 3, 1.0, 1.0, 0.5 + r3, 0.75, 0.5, 0.25, 0.5 - r3, 0.0]
    assert lrs == pytest.approx([0.5 * e for e in expected], abs=1e-12)
