"""Zero terminal SNR and rescaled guidance (Lin et al. 2024, "Common Diffusion Noise Schedules are Flawed").

Expected values come from the paper's algorithms worked in python floats, and from diffusers' implementations.
"""

from __future__ import annotations

import math

import pytest
import torch

from ldm_train.config import ConfigError, validate
from ldm_train.diffusion.guidance import cfg_model_fn, rescale_guidance
from ldm_train.diffusion.parameterization import VPrediction, build_parameterization
from ldm_train.diffusion.samplers import SAMPLERS, get_sampler, timesteps_for
from ldm_train.diffusion.schedules import NoiseSchedule, make_betas, rescale_zero_terminal_snr

T = 1000


def _algorithm_1(betas: list[float]) -> list[float]:
    """Lin et al. Algorithm 1, in python floats."""
    ab, acc = [], 1.0
    for b in betas:
        acc *= 1 - b
        ab.append(acc)
    s = [math.sqrt(a) for a in ab]
    s0, sT = s[0], s[-1]
    s = [(v - sT) * s0 / (s0 - sT) for v in s]
    ab = [v * v for v in s]
    alphas = [ab[0]] + [ab[i] / ab[i - 1] for i in range(1, len(ab))]
    return [1 - a for a in alphas]


@pytest.fixture(scope="module")
def zsch() -> NoiseSchedule:
    return NoiseSchedule(make_betas("scaled_linear", T, zero_terminal_snr=True))


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_rescale_matches_algorithm_1(schedule):
    base = make_betas(schedule, 50)
    got = make_betas(schedule, 50, zero_terminal_snr=True)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(_algorithm_1(base.tolist()), dtype=torch.float64),
                               atol=1e-12, rtol=1e-10)
    sch, old = NoiseSchedule(got), NoiseSchedule(base)
    assert sch.alphas_cumprod[-1].item() == 0.0 and got[-1].item() == pytest.approx(1.0)
    assert sch.snr(torch.tensor([49])).item() == 0.0
    assert sch.alphas_cumprod[0].item() == pytest.approx(old.alphas_cumprod[0].item(), rel=1e-12)


def test_rescale_matches_diffusers():
    ddim_mod = pytest.importorskip("diffusers.schedulers.scheduling_ddim")
    base = make_betas("scaled_linear", T)
    torch.testing.assert_close(rescale_zero_terminal_snr(base), ddim_mod.rescale_zero_terminal_snr(base.clone()),
                               atol=1e-12, rtol=1e-10)


def test_default_schedule_unchanged():
    assert torch.equal(make_betas("scaled_linear", T), make_betas("scaled_linear", T, zero_terminal_snr=False))
    d = {"schedule": "scaled_linear", "num_timesteps": T, "beta_start": 0.00085, "beta_end": 0.012,
         "prediction_type": "v"}
    assert build_parameterization(d).schedule.alphas_cumprod[-1] > 0  # old artifacts have no key: off
    z = build_parameterization({**d, "zero_terminal_snr": True}).schedule
    assert z.alphas_cumprod[-1].item() == 0.0


class _OracleV:
    """net(x, t, context) -> the exact v for a known x0: ε = (x − √ᾱ·x0)/√(1−ᾱ), v = √ᾱ·ε − √(1−ᾱ)·x0."""

    def __init__(self, sch: NoiseSchedule, x0: torch.Tensor):
        self.sch, self.x0 = sch, x0

    def __call__(self, x, t, context):
        a = self.sch.alphas_cumprod[t].view(-1, 1, 1, 1).to(x.dtype)
        eps = (x - a.sqrt() * self.x0) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * self.x0


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_start_at_snr_zero_without_dividing(zsch, sampler):
    g = torch.Generator().manual_seed(0)
    x0, x_T = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.zeros(2, 3, 5)
    fn = cfg_model_fn(_OracleV(zsch, x0), ctx, ctx[:1], 1.0, VPrediction(zsch), with_x0=True)
    eps, x0_hat = fn(x_T, torch.full((2,), T - 1))
    torch.testing.assert_close(eps, x_T)  # at ᾱ = 0, x_T is the noise itself
    torch.testing.assert_close(x0_hat, x0)  # x0 = −v, no 0/0
    out = get_sampler(sampler)(fn, x_T, zsch, 10, eta=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    # an ε-only model_fn cannot give x0 at SNR 0: one clear error instead of NaNs
    eps_only = cfg_model_fn(_OracleV(zsch, x0), ctx, ctx[:1], 1.0, VPrediction(zsch))
    with pytest.raises(ValueError, match="with_x0=True"):
        get_sampler(sampler)(eps_only, x_T, zsch, 10)


def test_ddim_first_step_hand_on_zero_snr(zsch):
    # at t = T−1: ᾱ = 0, so x0 = −v and ε = x_T; DDIM (η=0) x' = √ᾱ'·x0 + √(1−ᾱ')·ε
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    v = torch.full_like(x_T, 0.25)
    ctx = torch.zeros(1, 3, 5)
    fn = cfg_model_fn(lambda x, t, context: v.expand_as(x), ctx, ctx, 1.0, VPrediction(zsch), with_x0=True)
    got = {}
    get_sampler("ddim")(fn, x_T, zsch, 4, callback=lambda i, t, x: got.setdefault(i, x))
    a_p = zsch.alphas_cumprod[timesteps_for(4, T)[1]].item()
    torch.testing.assert_close(got[0], math.sqrt(a_p) * (-v) + math.sqrt(1 - a_p) * x_T)


def test_ddim_trailing_matches_diffusers_on_zero_snr(zsch):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                    timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(10)
    assert sched.timesteps.tolist() == timesteps_for(10, T).tolist()
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(3)) * 0.3

    def net(x, t, context=None):  # a fixed linear "network" so both loops see the same outputs
        return torch.einsum("oc,bchw->bohw", w, x) + 0.1 * t.view(-1, 1, 1, 1) / T

    x_T = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(4))
    ctx = torch.zeros(2, 3, 5)
    ours = get_sampler("ddim")(cfg_model_fn(net, ctx, ctx[:1], 1.0, VPrediction(zsch), with_x0=True), x_T, zsch, 10)
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(net(x, torch.full((2,), int(t))), t, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


def test_rescale_guidance_hand():
    guided = torch.tensor([[1.0, 3.0]])  # std (unbiased) √2
    cond = torch.tensor([[0.0, 1.0]])  # std 1/√2
    # x_r = x_cfg · (1/√2)/√2 = x_cfg/2; φ = 0.5 → 0.5·x_cfg/2 + 0.5·x_cfg = 0.75·x_cfg
    torch.testing.assert_close(rescale_guidance(guided, cond, 0.5), torch.tensor([[0.75, 2.25]]))
    torch.testing.assert_close(rescale_guidance(guided, cond, 0.0), guided)
    torch.testing.assert_close(rescale_guidance(guided, cond, 1.0), torch.tensor([[0.5, 1.5]]))


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_guided_rescale_matches_diffusers(zsch, phi):
    sd = pytest.importorskip("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
    g = torch.Generator().manual_seed(5)
    out_u, out_c = torch.randn(3, 4, 5, 5, generator=g), 2 * torch.randn(3, 4, 5, 5, generator=g) + 0.5
    s = 7.5
    expected_out = sd.rescale_noise_cfg(out_u + s * (out_c - out_u), out_c, guidance_rescale=phi)

    def net(x, t, context):  # uncond rows (context −1) get out_u, cond rows out_c
        return torch.where(context[:, :1, :1, None] < 0, out_u.repeat(2, 1, 1, 1), out_c.repeat(2, 1, 1, 1))

    x, t = torch.randn(3, 4, 5, 5, generator=g), torch.tensor([999, 500, 10])
    param = VPrediction(zsch)
    fn = cfg_model_fn(net, torch.ones(3, 2, 2), -torch.ones(1, 2, 2), s, param, guidance_rescale=phi, with_x0=True)
    eps, x0 = fn(x, t)
    torch.testing.assert_close(eps, param.to_eps(x, t, expected_out), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x0, param.to_x0(x, t, expected_out), atol=1e-5, rtol=1e-5)


def test_zero_terminal_snr_needs_v(compose_cfg):
    with pytest.raises(ConfigError, match="prediction_type=v"):
        validate(compose_cfg(["experiment=smoke", "stage=diffusion", "diffusion.zero_terminal_snr=true"]))
    validate(compose_cfg(["experiment=smoke", "stage=diffusion", "diffusion.zero_terminal_snr=true",
                          "diffusion.prediction_type=v"]))


def test_pipeline_samples_zero_snr_at_a_bucket_size(smoke_autoencoder, compose_cfg):
    from omegaconf import OmegaConf

    from ldm_train.models.text import build_text_encoder
    from ldm_train.pipeline.first_stage import FirstStage
    from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline

    cfg = compose_cfg(["experiment=smoke", "diffusion.prediction_type=v", "diffusion.zero_terminal_snr=true",
                       "sampling.guidance_rescale=0.7", "sampling.height=16", "sampling.width=24"])
    first = FirstStage.from_artifact(smoke_autoencoder["artifact"], sample_posterior=False)
    enc = build_text_encoder(OmegaConf.to_container(cfg.text_encoder, resolve=True)).eval()
    seen = []

    class Stub(torch.nn.Module):  # a v-"network": the conditioning's mean, so CFG and φ have something to act on
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, context):
            seen.append((tuple(x.shape), int(t[0])))
            return context.mean(dim=(1, 2)).view(-1, 1, 1, 1) * torch.ones_like(x) + 0.1 * x

    d = OmegaConf.to_container(cfg.diffusion, resolve=True)
    sampling = OmegaConf.to_container(cfg.sampling, resolve=True)
    pipe = LatentDiffusionPipeline(first, Stub(), enc, build_parameterization(d),
                                   {"diffusion": d, "resolution": 16, "sampling": sampling})
    images = pipe.generate(["a red circle on the left"] * 2, **{**sampling, "steps": 3})
    assert images.shape == (2, 3, 16, 24) and torch.isfinite(images).all()
    assert seen[0] == ((4, first.latent_channels, 4, 6), T - 1)  # CFG batch, latent 16/4 × 24/4, starts at SNR 0
    with pytest.raises(ValueError, match="not divisible"):
        pipe.generate(["x"], height=18, width=24, steps=1)
