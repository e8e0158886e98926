"""Tests for ldm_train.diffusion: schedules, samplers, guidance, EMA.

Expected values come from hand formulas and python-float loops, not the code
under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ldm_train.diffusion.ema import EMA, ema_decay, update_ema
from ldm_train.diffusion.guidance import cfg_combine, cfg_model_fn
from ldm_train.diffusion.parameterization import PARAMETERIZATIONS, build_parameterization
from ldm_train.diffusion.samplers import SAMPLERS, get_sampler, timesteps_for
from ldm_train.diffusion.schedules import NoiseSchedule, make_betas, offset_noise

T = 1000


@pytest.fixture(scope="module")
def sch() -> NoiseSchedule:
    return NoiseSchedule(make_betas("scaled_linear", T))


def _t(*vals: int) -> torch.Tensor:
    return torch.tensor(vals, dtype=torch.long)


# ---------------------------------------------------------------- schedules



def sample(model_fn, x, sch, sampler="ddim", **kwargs):
    """Run the sampler function called `sampler` (every sampler has the same signature)."""
    return get_sampler(sampler)(model_fn, x, sch, **kwargs)

def test_betas_endpoints_and_dtype():
    for name in ("linear", "scaled_linear"):
        b = make_betas(name, T)
        assert b.dtype == torch.float64 and b.shape == (T,)
        assert abs(b[0].item() - 0.00085) < 1e-9
        assert abs(b[-1].item() - 0.012) < 1e-9
    lin, sl = make_betas("linear", T), make_betas("scaled_linear", T)
    assert abs(lin[1].item() - (0.00085 + (0.012 - 0.00085) / (T - 1))) < 1e-12
    # sqrt-space spacing: the midpoint of scaled_linear lies below the linear midpoint
    mid = ((0.00085**0.5 + 0.012**0.5) / 2) ** 2
    b_mid = make_betas("scaled_linear", 3)[1].item()
    assert abs(b_mid - mid) < 1e-12 and sl[T // 2] < lin[T // 2]


def test_unknown_schedule_lists_valid():
    with pytest.raises(ValueError, match="scaled_linear"):
        make_betas("quadratic")


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_alphas_cumprod_matches_hand_loop(name):
    betas = make_betas(name, T)
    sch = NoiseSchedule(betas)
    beta_list = betas.tolist()
    for t in (0, 1, 10, 500, 999):
        prod = 1.0
        for i in range(t + 1):
            prod *= 1.0 - beta_list[i]
        assert abs(sch.alphas_cumprod[t].item() - prod) < 1e-12
    assert sch.alphas_cumprod_f32.dtype == torch.float32
    assert sch.num_timesteps == T


def test_cosine_matches_closed_form():
    s = 0.008
    sch = NoiseSchedule(make_betas("cosine", T))

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    # alphas_cumprod[i] is ᾱ at time (i+1)/T; clipping only bites near the end
    for i in (0, 10, 250, 500, 900):
        expected = f((i + 1) / T) / f(0.0)
        assert abs(sch.alphas_cumprod[i].item() - expected) < 1e-9
    assert make_betas("cosine", T).max().item() <= 0.999


def test_q_sample_and_v_target_hand(sch):
    torch.manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    t = _t(0, 421, 999)
    xt, v = sch.q_sample(x0, t, noise), sch.v_target(x0, t, noise)
    assert xt.shape == x0.shape and xt.dtype == torch.float32
    for b in range(3):
        ab = sch.alphas_cumprod[t[b]].item()
        a, s = math.sqrt(ab), math.sqrt(1 - ab)
        torch.testing.assert_close(xt[b], a * x0[b] + s * noise[b])
        torch.testing.assert_close(v[b], a * noise[b] - s * x0[b])


def test_conversions_round_trip(sch):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 4, 6, 6, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 4, 6, 6, generator=g, dtype=torch.float64)
    t = _t(0, 3, 500, 999)
    xt, v = sch.q_sample(x0, t, noise), sch.v_target(x0, t, noise)
    tol = {"atol": 1e-9, "rtol": 1e-9}
    torch.testing.assert_close(sch.eps_from_v(xt, t, v), noise, **tol)
    torch.testing.assert_close(sch.x0_from_v(xt, t, v), x0, **tol)
    torch.testing.assert_close(sch.x0_from_eps(xt, t, noise), x0, **tol)
    torch.testing.assert_close(sch.eps_from_x0(xt, t, x0), noise, **tol)


def test_parameterization_targets_and_conversions(sch):
    torch.manual_seed(2)
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = _t(17, 800)
    eps_p, v_p = PARAMETERIZATIONS["eps"](sch), PARAMETERIZATIONS["v"](sch)
    xt = eps_p.noised(x0, t, noise)
    torch.testing.assert_close(xt, sch.q_sample(x0, t, noise))
    v = v_p.target(x0, t, noise)
    ab = sch.alphas_cumprod[t].float().view(-1, 1, 1, 1)  # hand: v = √ᾱ·ε − √(1−ᾱ)·x0
    torch.testing.assert_close(v, ab.sqrt() * noise - (1 - ab).sqrt() * x0)
    torch.testing.assert_close(v_p.to_eps(xt, t, v), noise, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_p.to_x0(xt, t, v), x0, atol=1e-5, rtol=1e-5)
    assert torch.equal(eps_p.target(x0, t, noise), noise)
    assert torch.equal(eps_p.to_eps(xt, t, noise), noise)
    torch.testing.assert_close(eps_p.to_x0(xt, t, noise), x0, atol=1e-5, rtol=1e-5)
    d = {"schedule": "scaled_linear", "num_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}
    assert build_parameterization({**d, "prediction_type": "v"}).name == "v"
    with pytest.raises(ValueError, match="eps, v"):
        build_parameterization({**d, "prediction_type": "x0"})


def test_snr_and_min_snr_weight_hand(sch):
    t = _t(0, 300, 999)
    ac = [sch.alphas_cumprod[i].item() for i in t.tolist()]
    snr = [a / (1 - a) for a in ac]
    torch.testing.assert_close(sch.snr(t), torch.tensor(snr, dtype=torch.float32))
    gamma = 5.0
    # t=0: SNR≈1175 → clipped; t=999: SNR≈0.0047 → unclipped (weight 1 for eps)
    assert snr[0] > gamma > snr[2]
    w_eps = [min(x, gamma) / x for x in snr]
    w_v = [min(x, gamma) / (x + 1) for x in snr]
    torch.testing.assert_close(PARAMETERIZATIONS["eps"](sch).min_snr_weight(t, gamma), torch.tensor(w_eps))
    torch.testing.assert_close(PARAMETERIZATIONS["v"](sch).min_snr_weight(t, gamma), torch.tensor(w_v))
    assert abs(w_eps[2] - 1.0) < 1e-7


def test_offset_noise_is_per_channel_constant():
    noise = torch.randn(3, 4, 8, 8)
    out = offset_noise(noise, 0.1, generator=torch.Generator().manual_seed(0))
    diff = out - noise  # (B, C, H, W), constant over H, W
    assert out.shape == noise.shape
    torch.testing.assert_close(diff, diff[:, :, :1, :1].expand_as(diff))
    assert diff.abs().max() > 0
    assert torch.equal(offset_noise(noise, 0.0), noise)


# ---------------------------------------------------------------- samplers


def test_timesteps_for_trailing():
    ts = timesteps_for(50, T)
    assert ts.dtype == torch.long and ts.shape == (50,)
    assert ts[0].item() == T - 1 and ts[-1].item() == T // 50 - 1
    assert (ts[:-1] - ts[1:] == T // 50).all()  # evenly spaced, descending
    assert timesteps_for(T, T).tolist() == list(range(T - 1, -1, -1))
    part = timesteps_for(10, T, t_start=450)
    assert part.tolist() == [450, 299, 199, 99]
    assert (part <= 450).all()
    assert timesteps_for(10, T, t_start=5).tolist() == [5]
    with pytest.raises(ValueError):
        timesteps_for(10, T, t_start=T)


def test_unknown_sampler(sch):
    with pytest.raises(ValueError, match="dpmpp_2m"):
        get_sampler("euler")
    assert tuple(SAMPLERS) == ("ddpm", "ddim", "dpmpp_2m")


def _oracle(sch: NoiseSchedule, x0: torch.Tensor):
    """Exact ε when the answer is known to be x0."""
    return lambda x, t: sch.eps_from_x0(x, t, x0)


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_oracle_recovers_x0(sch, sampler, steps):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    seen = []
    out = sample(
        _oracle(sch, x0), x_T, sch, sampler, steps=steps, eta=0.5,
        generator=torch.Generator().manual_seed(4),
        callback=lambda i, t, x: seen.append((i, t)),
    )  # fmt: skip
    torch.testing.assert_close(out, x0, atol=1e-3, rtol=0)
    assert seen == list(enumerate(timesteps_for(steps, T).tolist()))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_img2img_t_start_recovers_x0(sch, sampler):
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    t_start = 450
    x_start = sch.q_sample(x0, _t(t_start, t_start), torch.randn(2, 4, 8, 8, generator=g))
    calls = []

    def model_fn(x, t):
        calls.append(int(t[0]))
        return sch.eps_from_x0(x, t, x0)

    out = sample(model_fn, x_start, sch, sampler, steps=20, t_start=t_start, generator=g)
    torch.testing.assert_close(out, x0, atol=1e-3, rtol=0)
    assert calls[0] == t_start and max(calls) <= t_start
    assert calls == timesteps_for(20, T, t_start).tolist()


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.5), ("ddpm", 0.0)])
def test_first_step_matches_hand_formula(sch, sampler, eta):
    # steps=2 → grid [999, 499]; the first step is a full stochastic step
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(9))
    got = {}
    sample(
        lambda x, t: 0.3 * x, x_T, sch, sampler, steps=2, eta=eta,
        generator=torch.Generator().manual_seed(10),
        callback=lambda i, t, x: got.setdefault(i, x),
    )  # fmt: skip
    z = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(10))
    a_t, a_p = sch.alphas_cumprod[999].item(), sch.alphas_cumprod[499].item()
    eps = 0.3 * x_T
    x0 = (x_T - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    beta = 1 - a_t / a_p
    if sampler == "ddim":  # Song et al. eq. 12/16
        sigma = eta * math.sqrt((1 - a_p) / (1 - a_t) * beta)
        dir_xt = math.sqrt(1 - a_p - sigma**2) * eps
        expected = math.sqrt(a_p) * x0 + dir_xt + sigma * z
    else:  # Ho et al. eq. 7, with the strided β
        mean = math.sqrt(a_p) * beta / (1 - a_t) * x0 + math.sqrt(1 - beta) * (1 - a_p) / (1 - a_t) * x_T
        expected = mean + math.sqrt((1 - a_p) / (1 - a_t) * beta) * z
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-5)


def test_ddim_eta0_deterministic_eta_positive_random(sch):
    net = nn.Conv2d(4, 4, 3, padding=1)

    def model_fn(x, t):
        return net(x) * 0.1

    x_T = torch.randn(1, 4, 8, 8)

    def run(eta, seed):
        gen = torch.Generator().manual_seed(seed)
        return sample(model_fn, x_T, sch, "ddim", steps=10, eta=eta, generator=gen)

    assert torch.equal(run(0.0, 0), run(0.0, 1))
    assert torch.equal(run(0.7, 0), run(0.7, 0))
    assert not torch.allclose(run(0.7, 0), run(0.7, 1))
    assert not torch.allclose(run(0.7, 0), run(0.0, 0))


# Gaussian data x0 ~ N(μ, σ_d²): E[ε | x_t] has a closed form, and the probability-flow
# ODE keeps z = (x_t − √ᾱ_t μ) / √(ᾱ_t σ_d² + 1 − ᾱ_t) constant: checks solver order.
MU, SD = 0.3, 1.5


def _gauss_eps(sch: NoiseSchedule):
    def model_fn(x, t):
        ab = sch.alphas_cumprod[t].to(x.dtype).view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * MU) / (ab * SD**2 + 1 - ab)

    return model_fn


def _ode_solution(x_T: torch.Tensor, sch: NoiseSchedule, t: int) -> torch.Tensor:
    ac = sch.alphas_cumprod
    z = (x_T - ac[-1].sqrt() * MU) / (ac[-1] * SD**2 + 1 - ac[-1]).sqrt()
    return ac[t].sqrt() * MU + (ac[t] * SD**2 + 1 - ac[t]).sqrt() * z


@pytest.mark.parametrize("sampler,order", [("ddim", 1), ("dpmpp_2m", 2)])
def test_deterministic_solver_order_on_gaussian(sch, sampler, order):
    x_T = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    exact = _ode_solution(x_T, sch, 499)
    errs = []
    for steps in (20, 40, 80):  # 499 is on each trailing grid
        got = {}

        def cb(i, t, x, steps=steps, got=got):
            if t - T // steps == 499:  # x after this step sits at grid point 499
                got["x"] = x

        sample(_gauss_eps(sch), x_T, sch, sampler, steps=steps, callback=cb)
        errs.append((got["x"] - exact).abs().max().item())
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    for r in ratios:  # halving the step divides the error by 2**order
        assert 2**order * 0.8 < r < 2**order * 1.25, (errs, ratios)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_stochastic_samplers_match_gaussian_moments(sch, sampler, eta):
    g = torch.Generator().manual_seed(7)
    x_T = torch.randn(64, 4, 8, 8, generator=g, dtype=torch.float64)
    out = sample(_gauss_eps(sch), x_T, sch, sampler, steps=200, eta=eta, generator=g)
    assert abs(out.mean().item() - MU) < 0.05
    assert abs(out.std().item() / SD - 1) < 0.03


# ---------------------------------------------------------------- guidance


def test_cfg_combine_hand():
    u, c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    assert torch.equal(cfg_combine(u, c, 1.0), c)
    assert torch.equal(cfg_combine(u, c, 0.0), u)
    torch.testing.assert_close(cfg_combine(u, c, 3.0), torch.tensor([7.0, 4.0]))


class _ContextNet:
    """Fake net: output = per-sample context mean, broadcast over x; records calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context):
        self.calls.append((x.shape[0], t.clone(), context.clone()))
        return context.mean(dim=(1, 2)).view(-1, 1, 1, 1).expand_as(x).clone()


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_cfg_model_fn_batches_and_orders(sch, prediction_type):
    B = 2
    ctx = torch.full((B, 3, 5), 2.0)
    null = torch.full((1, 3, 5), -1.0)  # batch-1 null context is broadcast
    net = _ContextNet()
    x, t = torch.randn(B, 4, 4, 4), _t(100, 700)
    s = 4.0
    eps = cfg_model_fn(net, ctx, null, s, PARAMETERIZATIONS[prediction_type](sch))(x, t)

    assert len(net.calls) == 1
    n, t_in, ctx_in = net.calls[0]
    assert n == 2 * B and torch.equal(t_in, torch.cat([t, t]))
    assert (ctx_in[:B] == -1.0).all() and (ctx_in[B:] == 2.0).all()  # uncond first

    out_u, out_c = torch.full_like(x, -1.0), torch.full_like(x, 2.0)
    if prediction_type == "v":  # hand ε = √(1-ᾱ)x_t + √ᾱ·v
        ab = sch.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        out_u = (1 - ab).sqrt() * x + ab.sqrt() * out_u
        out_c = (1 - ab).sqrt() * x + ab.sqrt() * out_c
    torch.testing.assert_close(eps, out_u + s * (out_c - out_u))
    # guided ε lies on the ray uncond → cond, past cond
    direction = out_c - out_u
    assert ((eps - out_c) * direction).sum() > 0
    assert (eps - out_u).norm() > direction.norm()


def test_cfg_scale_one_single_cond_call(sch):
    net = _ContextNet()
    ctx, null = torch.ones(2, 3, 5), torch.zeros(2, 3, 5)
    x = torch.randn(2, 4, 4, 4)
    eps = cfg_model_fn(net, ctx, null, 1.0, PARAMETERIZATIONS["eps"](sch))(x, _t(5, 6))
    assert len(net.calls) == 1 and net.calls[0][0] == 2
    assert torch.equal(net.calls[0][2], ctx)
    assert torch.equal(eps, torch.ones_like(x))


# ---------------------------------------------------------------- EMA


def test_ema_decay_hand():
    # CompVis LitEma: num_updates += 1, then decay = (1 + num_updates) / (10 + num_updates) → 2/11 first
    assert ema_decay(0) == pytest.approx(2 / 11)
    assert ema_decay(1) == pytest.approx(3 / 12)
    assert ema_decay(10) == pytest.approx(12 / 21)
    assert ema_decay(10**7) == 0.9999
    assert ema_decay(10**7, max_decay=0.999) == 0.999


@pytest.mark.parametrize("device_path", [False, True])
def test_ema_first_updates_hand_worked(device_path):
    """A scalar weight w, EMA e starting at w = 0; w becomes 1, 2, 3 before the updates 1, 2, 3.
    CompVis' decays 2/11, 3/12, 4/13: e1 = 9/11, e2 = 3/12·9/11 + 9/12·2, e3 = 4/13·e2 + 9/13·3."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model)
    e = 0.0
    for w, decay in [(1.0, 2 / 11), (2.0, 3 / 12), (3.0, 4 / 13)]:
        with torch.no_grad():
            model.weight.fill_(w)
        used = ema.update(model, torch.tensor(1.0) if device_path else None)
        e = decay * e + (1 - decay) * w
        assert float(used) == pytest.approx(decay)
        assert float(ema.module.weight) == pytest.approx(e, rel=1e-6)
    assert e == pytest.approx(4 / 13 * (3 / 12 * 9 / 11 + 9 / 12 * 2) + 9 / 13 * 3)
    assert int(ema.num_updates) == 3


def _tiny() -> nn.Module:
    torch.manual_seed(8)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_update_ema_hand():
    model, ema = _tiny(), _tiny()
    with torch.no_grad():
        for p in ema.parameters():
            p.zero_()
    model[1].weight.requires_grad_(False)  # frozen params are still averaged
    hand = {n: p.detach().clone() for n, p in ema.named_parameters()}
    for step, decay in enumerate([0.5, 0.9, 0.25]):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(step + 1.0)
        model(torch.randn(4, 3))  # BN running stats change
        update_ema(ema, model, decay)
        for n, p in model.named_parameters():
            hand[n] = decay * hand[n] + (1 - decay) * p.detach()
    for n, p in ema.named_parameters():
        torch.testing.assert_close(p, hand[n])
    for (n, b), (_, mb) in zip(ema.named_buffers(), model.named_buffers()):
        assert torch.equal(b, mb), n


def test_update_ema_name_mismatch():
    with pytest.raises(AssertionError):
        update_ema(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), 0.5)


def test_ema_module_state_and_decays():
    model = _tiny()
    ema = EMA(model)
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert not ema.module.training
    ema.train()
    assert not ema.module.training  # parent .train() leaves the copy in eval
    before = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert ema.update(model) == pytest.approx(2 / 11)
    for e, b, p in zip(ema.module.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 2 / 11 * b + 9 / 11 * p)
    assert ema.update(model) == pytest.approx(3 / 12)
    sd = ema.state_dict()
    assert sd["num_updates"].item() == 2 and sd["num_updates"].dtype == torch.long
    fresh = EMA(_tiny(), max_decay=0.2)
    fresh.load_state_dict(sd)
    assert int(fresh.num_updates) == 2
    # min(0.2, 4/13): capped at max_decay
    assert fresh.update(model) == pytest.approx(0.2)
