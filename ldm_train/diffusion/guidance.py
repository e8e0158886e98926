"""Classifier-free guidance: wrap a conditional network into a sampler `model_fn`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .parameterization import Parameterization


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """ε = ε_u + s·(ε_c − ε_u)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def cfg_model_fn(
    net: Callable[..., torch.Tensor],
    context: torch.Tensor,
    null_context: torch.Tensor,
    guidance_scale: float,
    parameterization: Parameterization,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """model_fn(x, t) -> guided ε for the samplers, from net(x, t, context=...) -> the parameterisation's output.

    null_context may have batch 1; it is expanded to context's batch.
    """
    if null_context.shape[0] == 1 and context.shape[0] != 1:
        null_context = null_context.expand(context.shape[0], *null_context.shape[1:])
    ctx_in = torch.cat([null_context, context])  # (2B, L, D), uncond first

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guidance_scale == 1.0:
            # s = 1 is exactly ε_c, so skip the unconditional half
            return parameterization.to_eps(x, t, net(x, t, context=context))
        # one batched call (uncond first): half the launches of two separate calls
        out = net(torch.cat([x, x]), torch.cat([t, t]), context=ctx_in)  # (2B, C, H, W)
        out_u, out_c = out.chunk(2)
        eps_u = parameterization.to_eps(x, t, out_u)
        eps_c = parameterization.to_eps(x, t, out_c)
        return cfg_combine(eps_u, eps_c, guidance_scale)

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
