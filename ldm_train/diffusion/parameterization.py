"""The training objective: forward process, what the denoiser predicts, and how its output reaches a sampler.

One object per objective/parameterisation owns these, so the network, the training loop and the pipeline never
branch on a kind (k-diffusion's denoiser wrappers, sgm's `Denoiser`):
- `ddpm` (`DDPMParameterization`): the discrete process x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε of a `NoiseSchedule`,
  t ∈ {0, …, T−1}, with `prediction_type` ε (`EpsPrediction`) or v (`VPrediction`); samplers ddpm | ddim | dpmpp_2m.
- `flow` (`RectifiedFlow`): the straight line x_t = (1−t)·x0 + t·ε, t ∈ [0, 1], velocity target; samplers
  euler | heun.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .samplers import FLOW_SAMPLERS, SAMPLERS, Sampler
from .schedules import FlowSchedule, NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Parameterization:
    """What every objective provides. `schedule` is what its samplers take; `samplers` names the ones that apply."""

    name = ""
    objective = ""
    samplers: dict[str, Sampler] = {}
    default_sampler = ""

    def __init__(self, schedule: Any) -> None:
        self.schedule = schedule

    def sample_timesteps(self, n: int, device: torch.device | str = "cpu",
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """Training times t (n,) on `device`."""
        raise NotImplementedError

    def noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t of the forward process."""
        raise NotImplementedError

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output at (x_t, t)."""
        raise NotImplementedError

    def to_eps(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """ε from the network output."""
        raise NotImplementedError

    def to_x0(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x0 from the network output."""
        raise NotImplementedError

    def min_snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-γ (Hang et al. 2023), (B,): min(SNR_t, γ) / w(t), where ‖out − target‖² = w(t)·‖x̂0 − x0‖², so
        that the x0-error is weighted by min(SNR, γ)."""
        raise NotImplementedError

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the network's embedding sees for process time t."""
        return t

    def start_time(self, strength: float) -> float | int:
        """img2img: the sampler's `t_start` for a strength in (0, 1)."""
        raise NotImplementedError

    def time_batch(self, t: float | int, n: int, device: torch.device | str) -> torch.Tensor:
        """The time t repeated n times, in the dtype `noised` and the network take."""
        raise NotImplementedError

    def guided_model_fn(self, net: Callable[..., torch.Tensor], context: torch.Tensor, null_context: torch.Tensor,
                        guidance_scale: float, guidance_rescale: float = 0.0) -> ModelFn:
        """model_fn(x, t) for this objective's samplers, with classifier-free guidance at `guidance_scale`
        (and the guided output's std rescaled by φ = `guidance_rescale` where the objective supports it)."""
        raise NotImplementedError

    def grid_options(self, sampling: dict) -> dict:
        """The sampling node's inference-grid settings this objective's samplers take (none by default)."""
        return {}

    def sampler(self, name: str) -> Sampler:
        """The sampler function called `name` (`auto`: this objective's default), if it applies here."""
        name = self.default_sampler if name == "auto" else name
        if name not in self.samplers:
            valid = ", ".join(["auto", *self.samplers])
            raise ValueError(f"sampler {name!r} does not apply to diffusion.objective={self.objective}; "
                             f"set sampling.sampler to one of: {valid}")
        return self.samplers[name]

    def sampler_name(self, name: str) -> str:
        """`name` with `auto` resolved to this objective's default sampler."""
        return self.default_sampler if name == "auto" else name


class DDPMParameterization(Parameterization):
    """The discrete process x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε with uniform t; the output type is the subclass's."""

    objective = "ddpm"
    samplers = SAMPLERS
    default_sampler = "ddim"

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def sample_timesteps(self, n, device="cpu", generator=None):
        """t ~ U{0, …, T−1}, LongTensor (n,)."""
        gen_device = generator.device if generator is not None else device
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=gen_device).to(device)

    def noised(self, x0, t, noise):
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε."""
        return self.schedule.q_sample(x0, t, noise)

    def to_x0(self, x_t, t, out):
        """x0 = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t from the network output."""
        return self.schedule.x0_from_eps(x_t, t, self.to_eps(x_t, t, out))

    def snr_loss_factor(self, snr: torch.Tensor) -> torch.Tensor:
        """The factor w(t) by which this loss weighs the x0-error: ‖out − target‖² = w(t)·‖x̂0 − x0‖²."""
        raise NotImplementedError

    def min_snr_weight(self, t, gamma):
        snr = self.schedule.snr(t)
        return snr.clamp(max=gamma) / self.snr_loss_factor(snr)

    def start_time(self, strength):
        """t_start = round(strength·T) − 1, within [0, T−1]."""
        T = self.num_timesteps
        return min(T - 1, max(0, round(strength * T) - 1))

    def time_batch(self, t, n, device):
        return torch.full((n,), int(t), dtype=torch.long, device=device)

    def guided_model_fn(self, net, context, null_context, guidance_scale, guidance_rescale=0.0):
        """Guided (ε, x0), both from the network output (no division at SNR 0; the DDPM-family samplers take it)."""
        from .guidance import cfg_model_fn  # guidance.py imports this module for its type hints

        return cfg_model_fn(net, context, null_context, guidance_scale, self, guidance_rescale=guidance_rescale,
                            with_x0=True)

    def grid_options(self, sampling):
        """timestep_spacing, steps_offset and final_alpha_one (diffusers' scheduler conventions)."""
        return {"timestep_spacing": sampling["timestep_spacing"], "steps_offset": int(sampling["steps_offset"]),
                "final_alpha_one": bool(sampling["final_alpha_one"])}


class EpsPrediction(DDPMParameterization):
    """The network predicts the noise ε."""

    name = "eps"

    def target(self, x0, t, noise):
        """ε."""
        return noise

    def to_eps(self, x_t, t, out):
        return out

    def snr_loss_factor(self, snr):
        """‖ε̂ − ε‖² = SNR_t·‖x̂0 − x0‖²."""
        return snr


class VPrediction(DDPMParameterization):
    """The network predicts v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 (Salimans & Ho 2022)."""

    name = "v"

    def target(self, x0, t, noise):
        """v = √ᾱ_t·ε − √(1−ᾱ_t)·x0."""
        return self.schedule.v_target(x0, t, noise)

    def to_eps(self, x_t, t, out):
        """ε = √(1−ᾱ_t)·x_t + √ᾱ_t·v."""
        return self.schedule.eps_from_v(x_t, t, out)

    def to_x0(self, x_t, t, out):
        """x0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v."""
        return self.schedule.x0_from_v(x_t, t, out)

    def snr_loss_factor(self, snr):
        """‖v̂ − v‖² = (SNR_t + 1)·‖x̂0 − x0‖²."""
        return snr + 1


class RectifiedFlow(Parameterization):
    """Rectified flow (Liu et al. 2023; SD3, Esser et al. 2024): x_t = (1−t)·x0 + t·ε, the network predicts the
    velocity v = dx_t/dt = ε − x0, and t is logit-normal: t = sigmoid(m + s·n), n ~ N(0, 1), warped by the
    schedule's shift (training and sampling alike)."""

    name = "velocity"
    objective = "flow"
    samplers = FLOW_SAMPLERS
    default_sampler = "euler"

    def __init__(self, schedule: FlowSchedule, logit_mean: float = 0.0, logit_std: float = 1.0,
                 time_scale: float = 1000.0) -> None:
        super().__init__(schedule)
        if logit_std <= 0:
            raise ValueError(f"diffusion.flow.logit_std must be positive, got {logit_std}")
        self.logit_mean, self.logit_std, self.time_scale = float(logit_mean), float(logit_std), float(time_scale)

    @staticmethod
    def _view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(device=like.device, dtype=torch.float32).view(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(self, n, device="cpu", generator=None):
        """t = warp(sigmoid(m + s·n)), n ~ N(0, 1): float32 (n,) in (0, 1). The schedule's `shift` warps the
        training times as it warps the sampling grid (SD3; diffusers' flow-matching scheduler trains on its shifted
        sigmas): in logit space the warp adds log(shift), so training with shift is logit-normal(m + log shift, s)."""
        gen_device = generator.device if generator is not None else device
        normal = torch.randn((n,), generator=generator, device=gen_device)
        return self.schedule.warp(torch.sigmoid(self.logit_mean + self.logit_std * normal)).to(device)

    def noised(self, x0, t, noise):
        """x_t = (1−t)·x0 + t·ε."""
        t = self._view(t, x0)
        return ((1 - t) * x0 + t * noise).to(x0.dtype)

    def target(self, x0, t, noise):
        """v = ε − x0."""
        return noise - x0

    def to_eps(self, x_t, t, out):
        """ε = x_t + (1−t)·v."""
        return (x_t + (1 - self._view(t, x_t)) * out).to(x_t.dtype)

    def to_x0(self, x_t, t, out):
        """x0 = x_t − t·v."""
        return (x_t - self._view(t, x_t) * out).to(x_t.dtype)

    def min_snr_weight(self, t, gamma):
        """SNR_t = (1−t)²/t² and ‖v̂ − v‖² = ‖x̂0 − x0‖²/t², so the weight is min(SNR_t, γ)·t²."""
        t = t.float()
        snr = ((1 - t) / t) ** 2
        return snr.clamp(max=gamma) * t**2

    def model_time(self, t):
        """time_scale·t: the sinusoidal embedding is laid out for timesteps in [0, 1000)."""
        return t.float() * self.time_scale

    def start_time(self, strength):
        """t_start = strength."""
        return float(strength)

    def time_batch(self, t, n, device):
        return torch.full((n,), float(t), dtype=torch.float32, device=device)

    def guided_model_fn(self, net, context, null_context, guidance_scale, guidance_rescale=0.0):
        """Guided velocity (the flow samplers take v)."""
        from .guidance import cfg_velocity_fn

        if guidance_rescale:
            raise ValueError("sampling.guidance_rescale applies to diffusion.objective=ddpm (v-prediction with zero "
                             "terminal SNR); set it to 0 for a flow model")

        return cfg_velocity_fn(net, context, null_context, guidance_scale, self.model_time)


PARAMETERIZATIONS: dict[str, type[DDPMParameterization]] = {"eps": EpsPrediction, "v": VPrediction}


def _ddpm(diffusion: Mapping[str, Any]) -> Parameterization:
    kind = diffusion["prediction_type"]
    if kind not in PARAMETERIZATIONS:
        raise ValueError(f"unknown diffusion.prediction_type {kind!r}; valid: {', '.join(PARAMETERIZATIONS)}")
    schedule = NoiseSchedule.from_name(diffusion["schedule"], diffusion["num_timesteps"],
                                       beta_start=diffusion["beta_start"], beta_end=diffusion["beta_end"],
                                       zero_terminal_snr=bool(diffusion.get("zero_terminal_snr", False)))
    return PARAMETERIZATIONS[kind](schedule)


def _flow(diffusion: Mapping[str, Any]) -> Parameterization:
    f = diffusion["flow"]
    return RectifiedFlow(FlowSchedule(f["shift"]), f["logit_mean"], f["logit_std"], f["time_scale"])


OBJECTIVES: dict[str, Callable[[Mapping[str, Any]], Parameterization]] = {"ddpm": _ddpm, "flow": _flow}


def build_parameterization(diffusion: Mapping[str, Any]) -> Parameterization:
    """The parameterisation of a `diffusion` config: `objective` (ddpm when absent: artifacts from before flow) and,
    for ddpm, `prediction_type` over its noise schedule; for flow, `diffusion.flow`."""
    objective = diffusion.get("objective", "ddpm")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown diffusion.objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[objective](diffusion)
