"""DDPM, DDIM and DPM-Solver++(2M) samplers over a discrete NoiseSchedule.

One function per sampler, one signature (k-diffusion's convention):
    sampler(model_fn, x, schedule, steps, *, eta, generator, t_start, callback) -> x0
`model_fn(x, t) -> ε` with x (B, C, H, W) and t a LongTensor (B,), or `-> (ε, x0)` when the wrapper knows its
parameterisation (guidance.py, `with_x0=True`): then x0 is never recovered by dividing by √ᾱ_t, which a
zero-terminal-SNR schedule (ᾱ_{T−1} = 0) requires. Guidance and the parameterisation live in the caller's wrapper.
x starts at t = T−1 (or t_start, img2img: pre-noised by the caller). The step after the last grid timestep goes to
ᾱ = 1 (clean data) and adds no noise. callback(i, t, x) runs after step i.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .schedules import FlowSchedule, NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]
Callback = Callable[[int, int, torch.Tensor], None]


SPACINGS = ("trailing", "leading", "linspace")


def timesteps_for(steps: int, num_timesteps: int, t_start: int | None = None, spacing: str = "trailing",
                  steps_offset: int = 0, intervals: int | None = None) -> torch.Tensor:
    """The descending inference grid of `steps` timesteps (the spacings of Lin et al. 2024, Table 2, as
    diffusers' schedulers compute them):

        trailing  t_i = round(T − i·T/steps) − 1                       (t_0 = T−1; our default)
        leading   t_i = (n−1−i)·⌊T/n⌋ + steps_offset                   (SD's scheduler config: offset 1)
        linspace  t_i = round((n−1−i)·(T−1)/(n−1))
    for i < steps, with n = `intervals` (default `steps`; DPM-Solver's grids use n = steps + 1 and drop the
    last point, as diffusers' DPMSolverMultistepScheduler does).

    With t_start (img2img) only grid points ≤ t_start are kept and the first kept one is
    moved up to t_start itself, so the first model call sees exactly the noise level the
    caller used for x_T; fewer than `steps` steps are run (like diffusers' `strength`).
    """
    T = num_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    n = intervals or steps
    i = torch.arange(steps, dtype=torch.float64)
    if spacing == "trailing":
        ts = torch.round(T - i * (T / steps)).long() - 1
    elif spacing == "leading":
        ts = ((n - 1 - i) * (T // n)).long() + steps_offset
    elif spacing == "linspace":
        ts = torch.round((n - 1 - i) * ((T - 1) / max(n - 1, 1))).long()
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    if int(ts.max()) >= T or int(ts.min()) < 0:
        raise ValueError(f"timestep_spacing={spacing} with steps_offset={steps_offset} puts grid points outside "
                         f"[0, {T - 1}] for steps={steps}; lower steps_offset")
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


def _grid(schedule: NoiseSchedule, steps: int, t_start: int | None, spacing: str = "trailing",
          steps_offset: int = 0, final_alpha_one: bool = True, intervals: int | None = None):
    """(i, t, ᾱ_t, ᾱ_prev) along the grid; ᾱ_prev after the last point is 1 (clean data), or ᾱ_0 when
    `final_alpha_one` is false (diffusers' `set_alpha_to_one=False`, SD's DDIM config). Python floats (float64):
    per-step coefficients never round to the sample dtype."""
    ts = timesteps_for(steps, schedule.num_timesteps, t_start, spacing, steps_offset, intervals).tolist()
    ac = schedule.alphas_cumprod.tolist()
    final = 1.0 if final_alpha_one else ac[0]
    for i, t in enumerate(ts):
        yield i, t, ac[t], ac[ts[i + 1]] if i + 1 < len(ts) else final


def _predict(model_fn: ModelFn, x: torch.Tensor, t: int, a_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε, x0) at grid timestep t: as the model_fn gives them, or x0 = (x − √(1−ᾱ_t)·ε) / √ᾱ_t."""
    out = model_fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
    if isinstance(out, tuple):
        return out
    if a_t <= 0:
        raise ValueError(f"ᾱ_t = 0 at t={t} (a zero-terminal-SNR schedule): x0 cannot be recovered from ε there; "
                         "pass a model_fn that returns (ε, x0), e.g. cfg_model_fn(..., with_x0=True)")
    return out, (x - math.sqrt(1 - a_t) * out) / math.sqrt(a_t)


def _with_noise(mean: torch.Tensor, var: float, generator: torch.Generator | None) -> torch.Tensor:
    """mean + √var·z, z ~ N(0, I) from `generator` (the stochastic part of the DDIM and DDPM steps)."""
    return mean + math.sqrt(var) * _noise_like(mean, generator) if var > 0 else mean


@torch.no_grad()
def ddim(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, steps: int = 50, *, eta: float = 0.0,
         generator: torch.Generator | None = None, t_start: int | None = None,
         callback: Callback | None = None, timestep_spacing: str = "trailing", steps_offset: int = 0,
         final_alpha_one: bool = True) -> torch.Tensor:
    """DDIM (Song et al. 2021): x' = √ᾱ'·x0 + √(1−ᾱ'−σ²)·ε + σ·z, σ² = η²·(1−ᾱ')/(1−ᾱ)·(1−ᾱ/ᾱ');
    η = 0 is deterministic."""
    for i, t, a_t, a_prev in _grid(schedule, steps, t_start, timestep_spacing, steps_offset, final_alpha_one):
        eps, x0 = _predict(model_fn, x, t, a_t)
        var = eta**2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        x = _with_noise(math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - var, 0.0)) * eps, var, generator)
        if callback is not None:
            callback(i, t, x)
    return x


@torch.no_grad()
def ddpm(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, steps: int = 50, *, eta: float = 0.0,
         generator: torch.Generator | None = None, t_start: int | None = None,
         callback: Callback | None = None, timestep_spacing: str = "trailing", steps_offset: int = 0,
         final_alpha_one: bool = True) -> torch.Tensor:
    """Ancestral DDPM on the strided grid: x' ~ q(x' | x, x0) with β = 1 − ᾱ/ᾱ', variance β̃ = (1−ᾱ')/(1−ᾱ)·β.
    `eta` is ignored (the variance is DDPM's)."""
    for i, t, a_t, a_prev in _grid(schedule, steps, t_start, timestep_spacing, steps_offset, final_alpha_one):
        eps, x0 = _predict(model_fn, x, t, a_t)
        beta = 1 - a_t / a_prev
        c0 = math.sqrt(a_prev) * beta / (1 - a_t)
        ct = math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)
        var = (1 - a_prev) / (1 - a_t) * beta  # β̃
        x = _with_noise(c0 * x0 + ct * x, var, generator)
        if callback is not None:
            callback(i, t, x)
    return x


@torch.no_grad()
def dpmpp_2m(model_fn: ModelFn, x: torch.Tensor, schedule: NoiseSchedule, steps: int = 50, *, eta: float = 0.0,
             generator: torch.Generator | None = None, t_start: int | None = None,
             callback: Callback | None = None, timestep_spacing: str = "trailing", steps_offset: int = 0,
             final_alpha_one: bool = True) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), deterministic: `eta` and `generator` are ignored. The last step goes
    to clean data (first order, whatever `final_alpha_one`). Leading / linspace grids split T into steps + 1
    intervals (diffusers' DPMSolverMultistepScheduler)."""
    old_x0: torch.Tensor | None = None  # previous data prediction
    old_h: float | None = None
    grid = list(_grid(schedule, steps, t_start, timestep_spacing, steps_offset, True, steps + 1))
    for i, t, a_t, a_prev in grid:
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
    # ᾱ_t = 0 (zero terminal SNR): λ = −∞, h = ∞, and the step is x' = σ'·x + α'·D (first order, exact limit)
    lam = math.log(alpha / sigma) if alpha > 0 else -math.inf
    h = math.log(alpha_p / sigma_p) - lam
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
