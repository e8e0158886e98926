"""What the denoiser predicts: its training target, the ε and x0 the samplers need, and the min-SNR weight.

One object per parameterisation owns these conversions, so the network and the samplers never branch on a kind
(k-diffusion's denoiser wrappers, sgm's `Denoiser`). The forward process is the discrete one of `NoiseSchedule`:
x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε.
"""

from __future__ import annotations

import torch

from .schedules import NoiseSchedule


class Parameterization:
    """The forward process x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε with uniform t, and a network output type (subclasses)."""

    name = ""

    def __init__(self, schedule: NoiseSchedule) -> None:
        self.schedule = schedule

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def sample_timesteps(self, n: int, device: torch.device | str = "cpu",
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """t ~ U{0, …, T−1}, LongTensor (n,)."""
        gen_device = generator.device if generator is not None else device
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=gen_device).to(device)

    def noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε."""
        return self.schedule.q_sample(x0, t, noise)

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output at (x_t, t)."""
        raise NotImplementedError

    def to_eps(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """ε from the network output."""
        raise NotImplementedError

    def to_x0(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t from the network output."""
        return self.schedule.x0_from_eps(x_t, t, self.to_eps(x_t, t, out))

    def snr_loss_factor(self, snr: torch.Tensor) -> torch.Tensor:
        """The factor w(t) by which this loss weighs the x0-error: ‖out − target‖² = w(t)·‖x̂0 − x0‖²."""
        raise NotImplementedError

    def min_snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-γ (Hang et al. 2023), (B,): min(SNR_t, γ) / w(t), so that the x0-error is weighted by min(SNR, γ)."""
        snr = self.schedule.snr(t)
        return snr.clamp(max=gamma) / self.snr_loss_factor(snr)


class EpsPrediction(Parameterization):
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


class VPrediction(Parameterization):
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


PARAMETERIZATIONS: dict[str, type[Parameterization]] = {"eps": EpsPrediction, "v": VPrediction}


def build_parameterization(diffusion: dict) -> Parameterization:
    """The parameterisation named by `diffusion.prediction_type` over the schedule of the `diffusion` config."""
    kind = diffusion["prediction_type"]
    if kind not in PARAMETERIZATIONS:
        raise ValueError(f"unknown diffusion.prediction_type {kind!r}; valid: {', '.join(PARAMETERIZATIONS)}")
    schedule = NoiseSchedule.from_name(diffusion["schedule"], diffusion["num_timesteps"],
                                       beta_start=diffusion["beta_start"], beta_end=diffusion["beta_end"],
                                       zero_terminal_snr=bool(diffusion.get("zero_terminal_snr", False)))
    return PARAMETERIZATIONS[kind](schedule)
