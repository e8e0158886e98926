"""Noise schedules of the discrete forward process and its x0 / ε / v conversions.

What the network predicts (its target, ε and x0 from its output) is owned by parameterization.py.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "scaled_linear", "cosine")


def make_betas(
    schedule: str,
    num_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    zero_terminal_snr: bool = False,
) -> torch.Tensor:
    """Betas (T,) float64: linear, scaled_linear = linspace(√b0, √b1)², or cosine; with zero_terminal_snr,
    rescaled by `rescale_zero_terminal_snr` so that ᾱ_{T−1} = 0."""
    if zero_terminal_snr:
        return rescale_zero_terminal_snr(make_betas(schedule, num_timesteps, beta_start, beta_end))
    T = num_timesteps
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if schedule == "cosine":
        # Nichol & Dhariwal: ᾱ(u) = f(u)/f(0), f(u) = cos²((u+s)/(1+s)·π/2);
        # betas[i] links u=i/T to (i+1)/T, so alphas_cumprod[i] = ᾱ((i+1)/T).
        # beta_start/beta_end are ignored.
        s = 0.008
        u = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        betas = 1 - f[1:] / f[:-1]
        # near u=1 f→0 and betas→1, which would make ᾱ_T exactly 0 (infinite -log SNR)
        return betas.clamp(max=0.999)
    raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last step has SNR 0 (Lin et al. 2024, "Common Diffusion Noise Schedules are Flawed", Alg. 1).

    √ᾱ is shifted so its last value is 0 and scaled so its first is unchanged:
    √ᾱ'_t = (√ᾱ_t − √ᾱ_{T−1}) · √ᾱ_0 / (√ᾱ_0 − √ᾱ_{T−1}); then β'_t = 1 − ᾱ'_t / ᾱ'_{t−1} (β'_0 = β_0, β'_{T−1} = 1).
    """
    sqrt_ab = torch.cumprod(1 - betas.to(torch.float64), dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    ab = ((sqrt_ab - last) * (first / (first - last))) ** 2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


class NoiseSchedule:
    """Discrete forward process x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε, ᾱ_t = ∏_{i≤t}(1-β_i)."""

    def __init__(self, betas: torch.Tensor) -> None:
        betas = betas.detach().to("cpu", torch.float64)
        self.betas = betas  # (T,) float64
        self.num_timesteps = betas.shape[0]
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # (T,) float64
        self.alphas_cumprod_f32 = self.alphas_cumprod.float()
        # √ᾱ, √(1-ᾱ) in float64 before any cast, so 1-ᾱ near t=0 keeps its digits
        self._sqrt_ac = self.alphas_cumprod.sqrt()
        self._sqrt_1m_ac = (1 - self.alphas_cumprod).sqrt()
        self._snr = self.alphas_cumprod / (1 - self.alphas_cumprod)
        self._cache: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    @classmethod
    def from_name(cls, schedule: str, num_timesteps: int = 1000, **kwargs: float) -> NoiseSchedule:
        """NoiseSchedule(make_betas(schedule, num_timesteps, ...))."""
        return cls(make_betas(schedule, num_timesteps, **kwargs))

    def _table(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        # cached per device: the hot path never re-uploads (and MPS lacks float64)
        key = (name, device, dtype)
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(device=device, dtype=dtype)
        return self._cache[key]

    def _coefs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(√ᾱ_t, √(1-ᾱ_t)) at t (B,), shaped (B, 1, 1, ...) to broadcast over like."""
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        t = t.to(like.device)
        shape = (t.shape[0],) + (1,) * (like.ndim - 1)
        a = self._table("_sqrt_ac", like.device, dtype)[t].view(shape)
        s = self._table("_sqrt_1m_ac", like.device, dtype)[t].view(shape)
        return a, s

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε."""
        a, s = self._coefs(t, x0)
        return (a * x0 + s * noise).to(x0.dtype)  # (B, C, H, W)

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """v = √ᾱ_t·ε − √(1-ᾱ_t)·x0."""
        a, s = self._coefs(t, x0)
        return (a * noise - s * x0).to(x0.dtype)

    def eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """ε = √(1-ᾱ_t)·x_t + √ᾱ_t·v."""
        a, s = self._coefs(t, x_t)
        return (s * x_t + a * v).to(x_t.dtype)

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x0 = √ᾱ_t·x_t − √(1-ᾱ_t)·v."""
        a, s = self._coefs(t, x_t)
        return (a * x_t - s * v).to(x_t.dtype)

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t − √(1-ᾱ_t)·ε) / √ᾱ_t."""
        a, s = self._coefs(t, x_t)
        return ((x_t - s * eps) / a).to(x_t.dtype)

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """ε = (x_t − √ᾱ_t·x0) / √(1-ᾱ_t)."""
        a, s = self._coefs(t, x_t)
        return ((x_t - a * x0) / s).to(x_t.dtype)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR_t = ᾱ_t / (1-ᾱ_t), float32 (B,) on t's device."""
        return self._table("_snr", t.device, torch.float32)[t]


def offset_noise(noise: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ε + strength·N(0, 1) of shape (B, C, 1, 1), so per-channel means can shift."""
    shape = noise.shape[:2] + (1,) * (noise.ndim - 2)  # (B, C, 1, 1)
    device = generator.device if generator is not None else noise.device
    extra = torch.randn(shape, generator=generator, device=device, dtype=noise.dtype)
    return noise + strength * extra.to(noise.device)


class FlowSchedule:
    """Time grid of the rectified-flow ODE x_t = (1−t)·x0 + t·ε, integrated from t = 1 (noise) to t = 0 (data).

    `shift` warps a uniform grid towards the noise end, t' = shift·t / (1 + (shift−1)·t) (SD3, Esser et al. 2024,
    who use shift 3 at 1024 px); shift 1 is the uniform grid. The training times are warped the same way
    (RectifiedFlow.sample_timesteps).
    """

    def __init__(self, shift: float = 1.0) -> None:
        if shift <= 0:
            raise ValueError(f"diffusion.flow.shift must be positive, got {shift}")
        self.shift = float(shift)

    def warp(self, t: float | torch.Tensor) -> float | torch.Tensor:
        """t' = shift·t / (1 + (shift−1)·t), for a float or elementwise for a tensor."""
        return self.shift * t / (1 + (self.shift - 1) * t)

    def grid(self, steps: int, t_start: float | None = None) -> list[float]:
        """Descending times [t_0, …, t_k = 0]: the warped uniform grid of `steps` intervals from 1.

        With t_start (img2img) only the grid points below t_start are kept and t_start is put first, so the first
        model call sees exactly the noise level the caller used; fewer than `steps` intervals are run.
        """
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        ts = [self.warp(1 - i / steps) for i in range(steps + 1)]
        ts[-1] = 0.0
        if t_start is None:
            return ts
        if not 0 < t_start <= 1:
            raise ValueError(f"t_start must be in (0, 1], got {t_start}")
        return [float(t_start)] + [t for t in ts if t < t_start]
