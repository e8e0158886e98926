"""Classifier-free guidance: wrap a conditional network into a sampler `model_fn`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .parameterization import Parameterization


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """ε = ε_u + s·(ε_c − ε_u)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2024, eq. 15–16): x_r = x_cfg·σ(x_c)/σ(x_cfg), out = φ·x_r + (1−φ)·x_cfg,
    σ the standard deviation of each sample over all its elements; undoes the over-exposure of large scales."""
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def cfg_model_fn(
    net: Callable[..., torch.Tensor],
    context: torch.Tensor,
    null_context: torch.Tensor,
    guidance_scale: float,
    parameterization: Parameterization,
    *,
    guidance_rescale: float = 0.0,
    with_x0: bool = False,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """model_fn(x, t) -> guided ε for the samplers, from net(x, t, context=...) -> the parameterisation's output.

    Guidance combines the network outputs (ε or v: the conversions are affine in them, so this equals combining
    ε), then rescales them by `guidance_rescale` φ (0: off). with_x0: return (ε, x0), both converted from the
    guided output, so x0 needs no division by √ᾱ_t (exact at zero terminal SNR). null_context may have batch 1;
    it is expanded to context's batch.
    """
    if null_context.shape[0] == 1 and context.shape[0] != 1:
        null_context = null_context.expand(context.shape[0], *null_context.shape[1:])
    ctx_in = torch.cat([null_context, context])  # (2B, L, D), uncond first

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guidance_scale == 1.0:
            # s = 1 is exactly the conditional output (and φ has nothing to rescale), so skip the unconditional half
            return net(x, t, context=context)
        # one batched call (uncond first): half the launches of two separate calls
        out_u, out_c = net(torch.cat([x, x]), torch.cat([t, t]), context=ctx_in).chunk(2)  # (B, C, H, W) each
        out = cfg_combine(out_u, out_c, guidance_scale)
        return rescale_guidance(out, out_c, guidance_rescale) if guidance_rescale else out

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = guided(x, t)
        eps = parameterization.to_eps(x, t, out)
        return (eps, parameterization.to_x0(x, t, out)) if with_x0 else eps

    return model_fn


def cfg_velocity_fn(
    net: Callable[..., torch.Tensor],
    context: torch.Tensor,
    null_context: torch.Tensor,
    guidance_scale: float,
    model_time: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """model_fn(x, t) -> guided velocity v = v_u + s·(v_c − v_u) for the flow samplers, from net(x, model_time(t),
    context=...) -> v. At fixed (x, t), ε and x0 are affine in v with one coefficient pair for both branches, so
    guiding v is guiding ε. null_context may have batch 1; one batched call (uncond first) per step."""
    if null_context.shape[0] == 1 and context.shape[0] != 1:
        null_context = null_context.expand(context.shape[0], *null_context.shape[1:])
    ctx_in = torch.cat([null_context, context])  # (2B, L, D), uncond first

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guidance_scale == 1.0:
            return net(x, model_time(t), context=context)
        v_u, v_c = net(torch.cat([x, x]), model_time(torch.cat([t, t])), context=ctx_in).chunk(2)
        return cfg_combine(v_u, v_c, guidance_scale)

    return model_fn
