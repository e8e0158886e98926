"""DDPM, DDIM and DPM-Solver++(2M) samplers over a discrete NoiseSchedule.

One function per sampler, one signature (k-diffusion's convention):
    sampler(model_fn, x, schedule, steps, *, eta, generator, t_start, callback) -> x0
`model_fn(x, t) -> ε` with x (B, C, H, W) and t a LongTensor (B,); guidance and the parameterisation live in the
caller's wrapper (guidance.py). x starts at t = T−1 (or t_start, img2img: pre-noised by the caller). The step after
the last grid timestep goes to ᾱ = 1 (clean data) and adds no noise. callback(i, t, x) runs after step i.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .schedules import FlowSchedule, NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor], None]


def timesteps_for(steps: int, num_timesteps: int, t_start: int | None = None) -> torch.Tensor:
    """Trailing grid t_i = round(T − i·T/steps) − 1, i < steps; descending, t_0 = T−1.

    With t_start (img2img) only grid points ≤ t_start are kept and the first kept one is
    moved up to t_start itself, so the first model call sees exactly the noise level the
    caller used for x_T; fewer than `steps` steps are run (like diffusers' `strength`).
    """
    T = num_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    i = torch.arange(steps, dtype=torch.float64)
    ts = torch.round(T - i * (T / steps)).long() - 1
    if t_start is None:
        return ts
    if not 0 <= t_start < T:
        raise ValueError(f"t_start must be in [0, {T - 1}], got {t_start}")
    ts = ts[ts <= t_start]
    if ts.numel() == 0:
        return torch.tensor([t_start], dtype=torch.long)
    ts[0] = t_start
    return ts


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # draw on the generator's device so a CPU generator can seed a CUDA sample
    device = generator.device if generator is not None else x.device
    z = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
    return z.to(x.device)


def _grid(schedule: NoiseSchedule, steps: int, t_start: int | None):
    """(i, t, ᾱ_t, ᾱ_prev) along the grid; ᾱ_prev = 1 after the last point. Python floats (float64): per-step
    coefficients never round to the sample dtype."""
    ts = timesteps_for(steps, schedule.num_timesteps, t_start).tolist()
    ac = schedule.alphas_cumprod.tolist()
    for i, t in enumerate(ts):
        yield i, t, ac[t], ac[ts[i + 1]] if i + 1 < len(ts) else 1.0


def _predict(model_fn: ModelFn, x: torch.Tensor, t: int, a_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε, x0) at grid timestep t: x0 = (x − √(1−ᾱ_t)·ε) / √ᾱ_t."""
    eps = model_fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
    return eps, (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)


@torch.no_grad()
def ddim(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, steps: int = 50, *, eta: float = 0.0,
         generator: torch.Generator | None = None, t_start: int | None = None,
         callback: Callback | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021): x' = √ᾱ'·x0 + √(1−ᾱ'−σ²)·ε + σ·z, σ² = η²·(1−ᾱ')/(1−ᾱ)·(1−ᾱ/ᾱ');
    η = 0 is deterministic."""
    for i, t, a_t, a_prev in _grid(schedule, steps, t_start):
        eps, x0 = _predict(model_fn, x, t, a_t)
        var = eta**2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - var, 0.0)) * eps
        if var > 0:
            x = x + math.sqrt(var) * _noise_like(x, generator)
        if callback is not None:
            callback(i, t, x)
    return x


@torch.no_grad()
def ddpm(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, steps: int = 50, *, eta: float = 0.0,
         generator: torch.Generator | None = None, t_start: int | None = None,
         callback: Callback | None = None) -> torch.Tensor:
    """Ancestral DDPM on the strided grid: x' ~ q(x' | x, x0) with β = 1 − ᾱ/ᾱ', variance β̃ = (1−ᾱ')/(1−ᾱ)·β.
    `eta` is ignored (the variance is DDPM's)."""
    for i, t, a_t, a_prev in _grid(schedule, steps, t_start):
        eps, x0 = _predict(model_fn, x, t, a_t)
        beta = 1 - a_t / a_prev
        c0 = math.sqrt(a_prev) * beta / (1 - a_t)
        ct = math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)
        var = (1 - a_prev) / (1 - a_t) * beta  # β̃
        x = c0 * x0 + ct * x
        if var > 0:
            x = x + math.sqrt(var) * _noise_like(x, generator)
        if callback is not None:
            callback(i, t, x)
    return x


@torch.no_grad()
def dpmpp_2m(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, steps: int = 50, *, eta: float = 0.0,
             generator: torch.Generator | None = None, t_start: int | None = None,
             callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), deterministic: `eta` and `generator` are ignored."""
    old_x0: torch.Tensor | None = None  # previous data prediction
    old_h: float | None = None
    for i, t, a_t, a_prev in _grid(schedule, steps, t_start):
        _, x0 = _predict(model_fn, x, t, a_t)
        x, old_x0, old_h = _dpmpp_2m_step(x, x0, a_t, a_prev, old_x0, old_h)
        if callback is not None:
            callback(i, t, x)
    return x


Sampler = Callable[..., torch.Tensor]
SAMPLERS: dict[str, Sampler] = {"ddpm": ddpm, "ddim": ddim, "dpmpp_2m": dpmpp_2m}


def get_sampler(name: str) -> Sampler:
    """The sampler function called `name`; every one has the signature of `ddim`."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def _dpmpp_2m_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    a_t: float,
    a_prev: float,
    old_x0: torch.Tensor | None,
    old_h: float | None,
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """One DPM-Solver++(2M) step in λ = log(α/σ): x' = (σ'/σ)·x − α'·(e^{−h} − 1)·D."""
    if a_prev >= 1.0:
        # λ' = ∞ on the last step: the exact first-order limit is x' = D, no final noise
        return x0, x0, None
    alpha, sigma = math.sqrt(a_t), math.sqrt(1 - a_t)
    alpha_p, sigma_p = math.sqrt(a_prev), math.sqrt(1 - a_prev)
    h = math.log(alpha_p / sigma_p) - math.log(alpha / sigma)
    d = x0
    if old_x0 is not None and old_h is not None:
        # linear extrapolation of the data prediction in λ, first step stays first order
        r = old_h / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
    x = (sigma_p / sigma) * x - alpha_p * math.expm1(-h) * d
    return x, x0, h


# ------------------------------------------------------------------------------------------- rectified flow
# Same signature, over a FlowSchedule: `model_fn(x, t) -> velocity v = dx/dt` with t a float tensor (B,) in [0, 1];
# x starts at t = 1 (or t_start) and the ODE dx/dt = v is integrated down to t = 0. `eta` and `generator` are
# ignored (deterministic ODE solvers). callback(i, t, x) runs after step i.


def _velocity(model_fn: ModelFn, x: torch.Tensor, t: float) -> torch.Tensor:
    return model_fn(x, torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device))


@torch.no_grad()
def euler(model_fn: ModelFn, x: torch.Tensor, schedule: FlowSchedule, steps: int = 50, *, eta: float = 0.0,
          generator: torch.Generator | None = None, t_start: float | None = None,
          callback: Callback | None = None) -> torch.Tensor:
    """Euler: x' = x + (t' − t)·v(x, t); first order, one network call per step."""
    ts = schedule.grid(steps, t_start)
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        x = x + (t_next - t) * _velocity(model_fn, x, t)
        if callback is not None:
            callback(i, t, x)
    return x


@torch.no_grad()
def heun(model_fn: ModelFn, x: torch.Tensor, schedule: FlowSchedule, steps: int = 50, *, eta: float = 0.0,
         generator: torch.Generator | None = None, t_start: float | None = None,
         callback: Callback | None = None) -> torch.Tensor:
    """Heun (explicit trapezoid): x̃ = x + h·v(x, t), x' = x + h/2·(v(x, t) + v(x̃, t')), h = t' − t; second order,
    two network calls per step (the velocity is defined at t = 0, so the last step is Heun too)."""
    ts = schedule.grid(steps, t_start)
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        h = t_next - t
        v = _velocity(model_fn, x, t)
        v_next = _velocity(model_fn, x + h * v, t_next)
        x = x + (h / 2) * (v + v_next)
        if callback is not None:
            callback(i, t, x)
    return x


FLOW_SAMPLERS: dict[str, Sampler] = {"euler": euler, "heun": heun}
