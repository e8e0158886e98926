"""Rectified flow: the objective's formulas against hand-worked cases, the Euler/Heun samplers against the exact
ODE solution of a two-Gaussian mixture (reference: scipy's adaptive RK45 at tight tolerance), guidance batching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from ldm_train.diffusion.guidance import cfg_velocity_fn
from ldm_train.diffusion.parameterization import RectifiedFlow, build_parameterization
from ldm_train.diffusion.samplers import FLOW_SAMPLERS
from ldm_train.diffusion.schedules import FlowSchedule

FLOW_CFG = {"objective": "flow", "flow": {"logit_mean": 0.0, "logit_std": 1.0, "shift": 1.0, "time_scale": 1000}}


def flow(**kw) -> RectifiedFlow:
    return build_parameterization({**FLOW_CFG, "flow": {**FLOW_CFG["flow"], **kw}})


def test_interpolation_and_velocity_target_hand_case():
    # x0 = (1, 2), ε = (3, −1), t = 0.25: x_t = 0.75·x0 + 0.25·ε = (1.5, 1.25); v = ε − x0 = (2, −3)
    p = flow()
    x0, eps, t = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]]), torch.tensor([0.25])
    x_t = p.noised(x0, t, eps)
    torch.testing.assert_close(x_t, torch.tensor([[1.5, 1.25]]))
    v = p.target(x0, t, eps)
    torch.testing.assert_close(v, torch.tensor([[2.0, -3.0]]))
    torch.testing.assert_close(p.to_x0(x_t, t, v), x0)  # 1.5 − 0.25·2 = 1, 1.25 + 0.25·3 = 2
    torch.testing.assert_close(p.to_eps(x_t, t, v), eps)  # 1.5 + 0.75·2 = 3, 1.25 − 0.75·3 = −1
    assert p.model_time(t).item() == 250.0


def test_logit_normal_timesteps_have_configured_parameters():
    p = flow(logit_mean=0.5, logit_std=0.8)
    t = p.sample_timesteps(200_000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and 0 < t.min() and t.max() < 1
    logit = torch.log(t / (1 - t)).double()
    assert abs(logit.mean().item() - 0.5) < 0.01 and abs(logit.std().item() - 0.8) < 0.01


def test_shift_warps_the_training_times_like_the_sampling_grid():
    # t' = 3t/(1 + 2t) ⇔ logit(t') = logit(t) + log 3: training with shift 3 is logit-normal(m + log 3, s), and
    # each drawn time is the warp of the unshifted draw from the same generator (the grid's warp, SD3 / diffusers)
    p, base = flow(logit_mean=0.2, logit_std=0.9, shift=3.0), flow(logit_mean=0.2, logit_std=0.9)
    t = p.sample_timesteps(200_000, generator=torch.Generator().manual_seed(0))
    t0 = base.sample_timesteps(200_000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(t, 3 * t0 / (1 + 2 * t0))
    logit = torch.log(t / (1 - t)).double()
    assert abs(logit.mean().item() - (0.2 + math.log(3))) < 0.01 and abs(logit.std().item() - 0.9) < 0.01
    assert p.schedule.grid(4)[1] == pytest.approx(3 * 0.75 / (1 + 2 * 0.75))


def test_min_snr_weight_weighs_the_x0_error():
    # weight·‖v̂ − v‖² must equal min(SNR, γ)·‖x̂0 − x0‖² with SNR = (1−t)²/t², x̂0 from the output
    p, gamma = flow(), 5.0
    g = torch.Generator().manual_seed(1)
    x0, eps, out = (torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.05, 0.1, 0.3, 0.5, 0.8, 0.95], dtype=torch.float64)
    x_t = p.noised(x0, t, eps)
    lhs = p.min_snr_weight(t, gamma).double() * ((out - p.target(x0, t, eps)) ** 2).sum(1)
    snr = ((1 - t) / t) ** 2
    rhs = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) * ((p.to_x0(x_t, t, out) - x0) ** 2).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-8)


def test_flow_grid_shift_and_img2img_start():
    assert FlowSchedule(1.0).grid(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert FlowSchedule(3.0).warp(0.5) == pytest.approx(0.75)  # 3·0.5 / (1 + 2·0.5)
    shifted = FlowSchedule(3.0).grid(4)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and shifted[2] == pytest.approx(0.75)
    assert FlowSchedule(1.0).grid(4, t_start=0.6) == [0.6, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="shift"):
        FlowSchedule(0.0)


def test_flow_refuses_ddpm_samplers_and_auto_picks_euler():
    p = flow()
    assert p.sampler("auto") is FLOW_SAMPLERS["euler"] and p.sampler_name("auto") == "euler"
    with pytest.raises(ValueError, match="does not apply to diffusion.objective=flow.*euler, heun"):
        p.sampler("ddim")
    ddpm = build_parameterization({"schedule": "linear", "num_timesteps": 10, "beta_start": 1e-4, "beta_end": 0.02,
                                   "prediction_type": "eps"})
    assert ddpm.sampler_name("auto") == "ddim"
    with pytest.raises(ValueError, match="objective=ddpm"):
        ddpm.sampler("heun")
    with pytest.raises(ValueError, match="ddpm, flow"):
        build_parameterization({**FLOW_CFG, "objective": "edm"})


# ------------------------------------------------------------------ a two-Gaussian mixture: exact velocity field
MU = torch.tensor([[1.5, -0.5], [-1.0, 1.0]], dtype=torch.float64)  # component means, equal weights
S = 0.5  # component std


def exact_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v(x, t) = E[ε − x0 | x_t = x] for x0 ~ ½N(μ_1, S²I) + ½N(μ_2, S²I), x_t = (1−t)·x0 + t·ε.

    Per component k, x_t ~ N(a·μ_k, σ²I), a = 1−t, σ² = a²S² + t²; Cov(x0, x_t) = a·S², Cov(ε, x_t) = t, so
    E[x0 | x, k] = μ_k + a·S²/σ²·(x − a·μ_k) and E[ε | x, k] = t/σ²·(x − a·μ_k); the posterior weight of k is the
    softmax of −‖x − a·μ_k‖² / (2σ²) (equal σ)."""
    t = t.double().view(-1, 1, 1)  # (B, 1, 1)
    a, var = 1 - t, (1 - t) ** 2 * S**2 + t**2
    d = x.double()[:, None, :] - a * MU[None]  # (B, K, D)
    w = torch.softmax(-(d**2).sum(-1, keepdim=True) / (2 * var), dim=1)  # (B, K, 1)
    v_k = t / var * d - (MU[None] + a * S**2 / var * d)  # E[ε|x,k] − E[x0|x,k]
    return (w * v_k).sum(1)


def reference_solution(x1: torch.Tensor) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t = 1 to 0 with RK45 at rtol 1e-11."""
    shape = x1.shape

    def rhs(t, y):
        x = torch.from_numpy(y).view(shape)
        return exact_velocity(x, torch.full((shape[0],), t)).numpy().ravel()

    sol = solve_ivp(rhs, (1.0, 0.0), x1.double().numpy().ravel(), method="RK45", rtol=1e-11, atol=1e-12)
    assert sol.success
    return torch.from_numpy(sol.y[:, -1]).view(shape)


@pytest.mark.parametrize("sampler,order", [("euler", 1), ("heun", 2)])
def test_flow_samplers_converge_with_their_order(sampler, order):
    x1 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = reference_solution(x1)
    errors = []
    for steps in (16, 32, 64):
        x0 = FLOW_SAMPLERS[sampler](exact_velocity, x1.clone(), FlowSchedule(1.0), steps)
        errors.append((x0 - exact).abs().max().item())
    for coarse, fine in zip(errors[:-1], errors[1:]):
        assert 2**order * 0.8 < coarse / fine < 2**order * 1.25, (sampler, errors)
    # and the end points are samples of the mixture: each near one component mean
    assert errors[-1] < (1e-3 if order == 2 else 5e-2)


def test_flow_samplers_with_shift_reach_the_same_solution():
    x1 = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = FLOW_SAMPLERS["heun"](exact_velocity, x1.clone(), FlowSchedule(3.0), 128)
    torch.testing.assert_close(out, reference_solution(x1), atol=1e-3, rtol=0)


class _ContextNet:
    """Fake velocity net: output = per-sample context mean, broadcast over x; records calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context):
        self.calls.append((x.shape[0], t.clone(), context.clone()))
        return context.mean(dim=(1, 2)).view(-1, 1, 1, 1).expand_as(x).clone()


def test_flow_cfg_one_batched_call_uncond_first_scaled_time():
    B, s = 2, 4.0
    ctx, null = torch.full((B, 3, 5), 2.0), torch.full((1, 3, 5), -1.0)
    net, p = _ContextNet(), flow()
    x, t = torch.randn(B, 4, 4, 4), torch.tensor([0.2, 0.9])
    v = p.guided_model_fn(net, ctx, null, s)(x, t)
    assert len(net.calls) == 1
    n, t_in, ctx_in = net.calls[0]
    assert n == 2 * B and torch.allclose(t_in, torch.tensor([200.0, 900.0, 200.0, 900.0]))
    assert (ctx_in[:B] == -1.0).all() and (ctx_in[B:] == 2.0).all()
    torch.testing.assert_close(v, torch.full_like(x, -1.0 + s * 3.0))  # v_u + s·(v_c − v_u)
    net1 = _ContextNet()
    v1 = cfg_velocity_fn(net1, ctx, null, 1.0, p.model_time)(x, t)
    assert len(net1.calls) == 1 and net1.calls[0][0] == B and torch.equal(v1, torch.full_like(x, 2.0))


def test_ddim_on_the_flow_path_is_euler():
    # a check of the Euler step from another derivation: DDIM's x' = α'·x̂0 + σ'·ε̂ with α = 1−t, σ = t and
    # x̂0 = x − t·v, ε̂ = x + (1−t)·v equals x + (t' − t)·v
    x, t, t2 = torch.randn(8, 2, dtype=torch.float64), 0.7, 0.4
    v = exact_velocity(x, torch.full((8,), t))
    ddim = (1 - t2) * (x - t * v) + t2 * (x + (1 - t) * v)
    one_step = FLOW_SAMPLERS["euler"](lambda y, tt: exact_velocity(y, tt), x, FlowSchedule(1.0), 1,
                                      t_start=t)  # t → 0 in one step
    torch.testing.assert_close(one_step, x - t * v)
    torch.testing.assert_close(ddim, x + (t2 - t) * v)
    assert math.isclose(FlowSchedule(1.0).grid(1)[0], 1.0)
    assert np.isfinite(one_step.numpy()).all()


def test_start_up_refuses_a_sampler_of_the_other_objective(compose_cfg, tmp_path):
    from ldm_train.config import ConfigError, validate

    base = ["experiment=smoke", "stage=diffusion", "diffusion.objective=flow", f"paths.run_dir={tmp_path}"]
    validate(compose_cfg(base))  # sampler auto → euler
    validate(compose_cfg([*base, "sampling.sampler=heun"]))
    with pytest.raises(ConfigError, match="sampler 'dpmpp_2m' does not apply to diffusion.objective=flow"):
        validate(compose_cfg([*base, "sampling.sampler=dpmpp_2m"]))
    with pytest.raises(ConfigError, match="unknown diffusion.objective 'edm'"):
        validate(compose_cfg([*base, "diffusion.objective=edm"]))
