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


# ------------------------------------------------------------------ schedule_to_time: the schedule ends at the clock


@pytest.mark.parametrize(("step", "elapsed", "remaining", "max_steps", "expected"), [
    (100, 50.0, 50.0, 1000, 200),    # 2 steps/s, 50 s left → 100 more steps
    (100, 50.0, 1000.0, 1000, 1000),  # a fast machine keeps max_steps
    (100, 50.0, -3.0, 1000, 100),    # past the deadline: the schedule ends now
    (0, 0.0, 50.0, 1000, 1000),      # no rate yet
])
def test_projected_total_by_hand(step, elapsed, remaining, max_steps, expected):
    from ldm_train.lit.optim import projected_total

    assert projected_total(step, elapsed, remaining, max_steps) == expected


class _FakeTimer:
    """A lightning Timer whose clock the test sets."""

    def __init__(self, duration: float):
        self.duration, self.now = duration, 0.0

    def time_elapsed(self, stage="train"):
        return self.now

    def time_remaining(self, stage="train"):
        return self.duration - self.now


@pytest.mark.parametrize("steps_per_batch", [1, 2])
def test_schedule_to_time_ends_the_cosine_where_the_clock_stops(monkeypatch, steps_per_batch):
    """At 1 s per batch with a 100 s budget, a warm-up + cosine schedule written for 1000 batches ends at batch
    100: the LR at batch 55 equals the hand value of warmup_cosine(55, 10, 100) (0.5), not of (55, 10, 1000)."""
    from types import SimpleNamespace

    import torch

    import ldm_train.lit.optim as optim
    from ldm_train.lit.optim import ScheduleToTime, warmup_cosine

    monkeypatch.setattr(optim, "Timer", _FakeTimer)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lam = optim.as_partial({"_target_": "ldm_train.lit.optim.warmup_cosine", "_partial_": True,
                            "warmup": 10, "total": 1000})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    timer = _FakeTimer(duration=100.0)
    trainer = SimpleNamespace(callbacks=[timer], global_step=0, max_steps=1000 * steps_per_batch,
                              lr_scheduler_configs=[SimpleNamespace(scheduler=sched)])
    callback = ScheduleToTime(steps_per_batch)
    for batch in range(55):
        opt.step()
        sched.step()
        trainer.global_step, timer.now = (batch + 1) * steps_per_batch, float(batch + 1)
        callback.on_train_batch_end(trainer, None, None, None, batch)
    assert callback.total == 100
    assert opt.param_groups[0]["lr"] == pytest.approx(warmup_cosine(55, 10, 100), abs=1e-12)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5, abs=1e-12)  # the hand value: half-way through


def test_schedule_to_time_is_off_by_default_and_on_in_the_quickstart(compose_cfg):
    """Off by default (a cluster job's max_time is a stop-and-resume point, not the schedule's end)."""
    default = compose_cfg([])
    quick = compose_cfg(["experiment=quickstart"])
    assert not default.autoencoder.schedule_to_time and not default.diffusion.schedule_to_time
    assert quick.autoencoder.schedule_to_time and quick.diffusion.schedule_to_time
