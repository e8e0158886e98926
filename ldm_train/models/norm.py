"""GroupNorm with a faster CPU backward for channels_last activations.

PyTorch's CPU GroupNorm backward for channels_last tensors is several times slower than for contiguous
ones (8 ms against 1.2 ms for an 8×32×64×64 fp32 tensor on 2 cores), and channels_last is what makes
the convolutions fast. For large spatial sizes this module computes the backward from per-channel sums
over a (B, HW, C) view instead: a handful of bandwidth-bound passes that stay in channels_last.
Everything else (contiguous inputs, small maps, no grad, and CUDA but for the option below) goes to
`F.group_norm` unchanged.
The parameters and state-dict keys are nn.GroupNorm's, so saved artifacts load either way.

On CUDA the native kernel works on contiguous NCHW only: for channels_last activations every call copies its
input to NCHW and returns NCHW (which the next convolution copies back), and under bf16 autocast it also runs in
fp32. With `CUDA_CHANNELS_LAST = True`, channels_last CUDA inputs are normalised in their own layout and dtype
(statistics and arithmetic in fp32). It stays off until a GPU measurement shows it pays: `scripts/mfu_probe.py`
A/B-tests it on the SD-1.5 train step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Below this many pixels per map the native kernel is as fast or faster (measured on 2 cores).
MIN_PIXELS = 1024
# Experimental channels_last GroupNorm for CUDA (see the module docstring); process-wide, off by default.
CUDA_CHANNELS_LAST = False


def _sums_per_group(ctx, s_dy: torch.Tensor, s_dyxhat: torch.Tensor):
    """P = Σ γ·dy and Q = Σ γ·dy·x̂ per (sample, group), (B, G), from their per-channel sums (B, C)."""
    weight = ctx.saved_tensors[1]
    b, c = s_dy.shape
    p = (weight * s_dy).view(b, ctx.groups, c // ctx.groups).sum(-1)  # (B, G)
    q = (weight * s_dyxhat).view(b, ctx.groups, c // ctx.groups).sum(-1)
    return p, q


class _GroupNormChannelsLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float):
        b, c, h, w = x.shape
        y, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, b, c, h * w, groups, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.groups = groups
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        # With x̂ = (x - μ)·r per (sample, group) of M elements and y = γ·x̂ + β:
        #   dx = r·γ·dy - r·(P + x̂·Q)/M,  P = Σ γ·dy,  Q = Σ γ·dy·x̂  (sums over the group)
        # which is dx = A[b,c]·dy + Bg[b,g]·x + Cg[b,g], built from per-channel sums over the pixels.
        x, weight, mean, rstd = ctx.saved_tensors
        b, c, h, w = x.shape
        cg, m = c // ctx.groups, h * w * (c // ctx.groups)
        xv = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view for channels_last x
        dyv = dy.permute(0, 2, 3, 1).reshape(b, h * w, c)
        buf = torch.mul(dyv, xv)  # one (B, HW, C) buffer: dy·x for its sums, then dx
        s_dy, s_dyx = dyv.sum(1), buf.sum(1)  # (B, C)
        mean_c, rstd_c = mean.repeat_interleave(cg, 1), rstd.repeat_interleave(cg, 1)  # (B, C)
        s_dyxhat = rstd_c * (s_dyx - mean_c * s_dy)  # Σ dy·x̂ per channel
        p, q = _sums_per_group(ctx, s_dy, s_dyxhat)
        coef_x = (-rstd * rstd * q / m).repeat_interleave(cg, 1)  # multiplies x
        coef_1 = (rstd * (rstd * mean * q - p) / m).repeat_interleave(cg, 1)
        dx = torch.mul(dyv, (rstd_c * weight)[:, None], out=buf)
        dx.addcmul_(xv, coef_x[:, None]).add_(coef_1[:, None])
        dx = dx.view(b, h, w, c).permute(0, 3, 1, 2)  # channels_last (B, C, H, W)
        return dx, s_dyxhat.sum(0), s_dy.sum(0), None, None


class _GroupNormLayoutKept(torch.autograd.Function):
    """GroupNorm in x's channels_last layout and dtype, with statistics and arithmetic in (at least) fp32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float):
        b, c, h, w = x.shape
        cg = c // groups
        acc = torch.promote_types(x.dtype, torch.float32)
        x_hwc = x.to(acc).permute(0, 2, 3, 1)  # (B, H, W, C): a view when x is channels_last
        var, mean = torch.var_mean(x_hwc.reshape(b, h * w, groups, cg), dim=(1, 3), correction=0)  # (B, G)
        rstd = torch.rsqrt(var + eps)
        scale = (rstd[:, :, None] * weight.to(acc).view(groups, cg)).reshape(b, c)  # y = x·scale + shift
        shift = bias.to(acc) - mean.repeat_interleave(cg, 1) * scale
        y = torch.addcmul(shift[:, None, None, :], x_hwc, scale[:, None, None, :])  # (B, H, W, C) in acc
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.groups = groups
        return y.to(x.dtype).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        # The formula of _GroupNormChannelsLast, written with the centred input x − μ so that a large mean does
        # not cancel in low precision: dx = r·γ·dy − (r/M)·P − (r²·Q/M)·(x − μ). (The CPU class keeps the
        # uncentred form: in fp32 it is exact enough and 15–55% faster there, one buffer instead of two.)
        x, weight, mean, rstd = ctx.saved_tensors
        b, c, h, w = x.shape
        cg, m = c // ctx.groups, h * w * (c // ctx.groups)
        acc = mean.dtype
        dyv = dy.permute(0, 2, 3, 1).reshape(b, h * w, c)
        mean_c, rstd_c = mean.repeat_interleave(cg, 1), rstd.repeat_interleave(cg, 1)  # (B, C)
        xc = x.to(acc).permute(0, 2, 3, 1).reshape(b, h * w, c) - mean_c[:, None]  # a new (B, HW, C) tensor
        s_dy = dyv.sum(1, dtype=acc)  # (B, C)
        s_dyxhat = rstd_c * (dyv * xc).sum(1)  # Σ dy·x̂ per channel
        p, q = _sums_per_group(ctx, s_dy, s_dyxhat)
        coef_xc = (-rstd * rstd * q / m).repeat_interleave(cg, 1)
        coef_1 = (-rstd * p / m).repeat_interleave(cg, 1)
        dx = xc.mul_(coef_xc[:, None]).add_(coef_1[:, None]).addcmul_(dyv, (rstd_c * weight)[:, None])
        dx = dx.to(x.dtype).view(b, h, w, c).permute(0, 3, 1, 2)
        return dx, s_dyxhat.sum(0).to(weight.dtype), s_dy.sum(0).to(weight.dtype), None, None


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm; channels_last CPU inputs of ≥ MIN_PIXELS pixels take the faster backward above, and
    channels_last CUDA inputs the layout-keeping path when CUDA_CHANNELS_LAST is set."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (CUDA_CHANNELS_LAST and x.ndim == 4 and x.is_cuda and self.affine and x.shape[1] > 1
                and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()):
            with torch.autocast("cuda", enabled=False):  # x keeps its dtype (bf16 under autocast)
                return _GroupNormLayoutKept.apply(x, self.weight, self.bias, self.num_groups, self.eps)
        if (x.ndim == 4 and x.device.type == "cpu" and self.affine and torch.is_grad_enabled()
                and x.dtype == self.weight.dtype and not torch.is_autocast_enabled("cpu")
                and x.shape[2] * x.shape[3] >= MIN_PIXELS and x.shape[1] > 1
                and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()):
            return _GroupNormChannelsLast.apply(x, self.weight, self.bias, self.num_groups, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
