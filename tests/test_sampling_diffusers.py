"""Sampling equal to diffusers' schedulers: the inference grids (timestep_spacing, steps_offset) and the DDIM and
DPM-Solver++(2M) trajectories, in float64, on a fixed nonlinear ε-model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm_train.diffusion.samplers import SPACINGS, ddim, dpmpp_2m, timesteps_for
from ldm_train.diffusion.schedules import NoiseSchedule

diffusers = pytest.importorskip("diffusers")
T = 1000
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_name("scaled_linear", T, beta_start=0.00085, beta_end=0.012)


def eps_model(x: torch.Tensor, t) -> torch.Tensor:
    """A fixed nonlinear ε(x, t): both samplers see the same function."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.6 * torch.tanh(x) + 0.2 * torch.sin(t / 37.0) + 0.05 * x * torch.cos(t / 91.0)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [7, 10, 30, 50])
def test_grids_equal_diffusers(spacing, steps):
    offset = 1 if spacing == "leading" else 0
    ddim_s = diffusers.DDIMScheduler(**BETAS, timestep_spacing=spacing, steps_offset=offset)
    ddim_s.set_timesteps(steps)
    assert timesteps_for(steps, T, spacing=spacing, steps_offset=offset).tolist() == ddim_s.timesteps.tolist()
    dpm = diffusers.DPMSolverMultistepScheduler(**BETAS, timestep_spacing=spacing, steps_offset=offset)
    dpm.set_timesteps(steps)
    ours = timesteps_for(steps, T, spacing=spacing, steps_offset=offset, intervals=steps + 1)
    assert ours.tolist() == dpm.timesteps.tolist()


def test_schedule_table_equals_diffusers(schedule):
    """Our float64 ᾱ table is diffusers' float32 one up to float32 rounding."""
    ref = diffusers.DDIMScheduler(**BETAS).alphas_cumprod.double()
    torch.testing.assert_close(schedule.alphas_cumprod, ref, rtol=2e-6, atol=0)


def x_T() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


@pytest.mark.parametrize("final_alpha_one", [False, True])
@pytest.mark.parametrize("spacing,steps", [("leading", 10), ("leading", 50), ("trailing", 10), ("trailing", 50)])
def test_ddim_trajectory_equals_diffusers(schedule, spacing, steps, final_alpha_one):
    """Same ᾱ table (ours, float64, handed to the scheduler) so the comparison measures the sampler alone."""
    offset = 1 if spacing == "leading" else 0
    sch = diffusers.DDIMScheduler(**BETAS, timestep_spacing=spacing, steps_offset=offset,
                                  set_alpha_to_one=final_alpha_one, clip_sample=False)
    sch.alphas_cumprod = schedule.alphas_cumprod.clone()
    sch.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if final_alpha_one else sch.alphas_cumprod[0]
    sch.set_timesteps(steps)
    ref = x_T()
    for t in sch.timesteps:
        ref = sch.step(eps_model(ref, t), t, ref, eta=0.0).prev_sample
    ours = ddim(eps_model, x_T(), schedule, steps, timestep_spacing=spacing, steps_offset=offset,
                final_alpha_one=final_alpha_one)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [8, 20])
def test_dpmpp_2m_trajectory_equals_diffusers(schedule, spacing, steps):
    """diffusers' DPM-Solver step computes in float32 (it casts the sample and its σ table), so the comparison
    is at float32 precision; a different solver order at any step differs by > 1e-3."""
    offset = 1 if spacing == "leading" else 0
    sch = diffusers.DPMSolverMultistepScheduler(**BETAS, timestep_spacing=spacing, steps_offset=offset,
                                                algorithm_type="dpmsolver++", solver_order=2)
    sch.alphas_cumprod = schedule.alphas_cumprod.clone()
    sch.set_timesteps(steps)
    ref = x_T()
    for t in sch.timesteps:
        ref = sch.step(eps_model(ref, t), t, ref).prev_sample
    ours = dpmpp_2m(eps_model, x_T(), schedule, steps, timestep_spacing=spacing, steps_offset=offset)
    assert np.isfinite(ours.numpy()).all()
    torch.testing.assert_close(ours, ref.double(), rtol=2e-5, atol=2e-5)


def test_offset_beyond_the_schedule_is_refused():
    with pytest.raises(ValueError, match="steps_offset"):
        timesteps_for(1000, T, spacing="leading", steps_offset=1)
