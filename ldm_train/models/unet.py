"""SD-style conditional U-Net: time-embedded ResBlocks, cross-attention SpatialTransformers, skip concatenation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm_train.models.norm import GroupNorm
from ldm_train.models.upsample import Upsample

# SD 1.x U-Net (859.52M params); heads are a fixed count of 8 at every width, as in the original config.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "sd15": dict(in_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                 attention_levels=(0, 1, 2), mid_attention=True, num_heads=8, transformer_depth=1,
                 context_dim=768),
    "tiny": dict(in_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                 attention_levels=(1,), mid_attention=True, num_head_channels=16, context_dim=64,
                 num_groups=8),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0,
                       flip_sin_to_cos: bool = False) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) laid out as [sin(t·f_0..f_{h-1}), cos(t·f_0..f_{h-1})], f_i =
    max_period^(−i/h); `flip_sin_to_cos` gives [cos, sin] (the layout Stable Diffusion was trained with)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    parts = [torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)]
    emb = torch.cat(parts, dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def size_features(size_cond: torch.Tensor, dim: int) -> torch.Tensor:
    """SDXL's micro-conditioning features: each of the K numbers (original h, w, crop top, left, target h, w)
    through `timestep_embedding`, concatenated: (B, K) -> (B, K·dim)."""
    return timestep_embedding(size_cond.flatten(), dim).view(size_cond.shape[0], -1)


def pooled_context(context: torch.Tensor) -> torch.Tensor:
    """The caption as one vector: the mean of its (B, L, D) token states -> (B, D) (DiT's and the U-Net's pooled-text
    path)."""
    return context.mean(dim=1)


def _norm_widths(model_channels: int, channel_mult: list[int], num_res_blocks: int) -> list[int]:
    """Every GroupNorm width the U-Net will contain, mirroring UNet.__init__'s skip bookkeeping."""
    widths = [model_channels * m for m in channel_mult]
    skips = [model_channels] + [w for i, w in enumerate(widths)
                                for _ in range(num_res_blocks + (i != len(widths) - 1))]
    ch, concat = widths[-1], []
    for w in reversed(widths):
        for _ in range(num_res_blocks + 1):
            concat.append(ch + skips.pop())
            ch = w
    return sorted({model_channels, *widths, *concat})


def _zero(module: nn.Module) -> nn.Module:
    # Zero-initialised residual branches make every block start as identity (SD/ADM convention).
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _norm(channels: int, num_groups: int, eps: float = 1e-5) -> GroupNorm:
    # Widths below num_groups get one channel per group; larger widths must be divisible (checked in UNet).
    return GroupNorm(min(num_groups, channels), channels, eps=eps)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + time embedding, GroupNorm-SiLU-dropout-conv(zero), + skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, num_groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_ch, num_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = _norm(out_ch, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, H, W), emb (B, E) -> (B, C_out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention over tokens; self-attention when context is None."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, dropout: float = 0.0,
                 upcast: bool = False):
        super().__init__()
        self.heads = heads
        self.upcast = upcast  # softmax(QKᵀ) in fp32 under fp16/bf16 (SD 2.x's 768-px v model overflows otherwise)
        kv_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D), context (B, L, Dc) -> (B, N, D)."""
        ctx = x if context is None else context
        b, n, d = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)  # (B, h, N, d_h)
        k = self.to_k(ctx).view(b, ctx.shape[1], self.heads, -1).transpose(1, 2)  # (B, h, L, d_h)
        v = self.to_v(ctx).view(b, ctx.shape[1], self.heads, -1).transpose(1, 2)
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(v.dtype)  # (B, h, N, d_h)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d_h)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class GEGLU(nn.Module):
    """Gated-GELU feed-forward: Linear(dim, 2·inner) → a·gelu(g) → dropout → Linear(inner, dim)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.proj = nn.Linear(dim, inner * 2)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, D) -> (B, N, D)."""
        a, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(self.dropout(a * F.gelu(gate)))


class BasicTransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention over the context, GEGLU feed-forward; all residual."""

    def __init__(self, dim: int, heads: int, context_dim: int, dropout: float = 0.0, upcast: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, None, dropout, upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, dropout, upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLU(dim, 4, dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, N, D), context (B, L, Dc) -> (B, N, D)."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm → proj_in → transformer blocks over H·W tokens → proj_out(zero) → + input."""

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int, num_groups: int,
                 dropout: float = 0.0, upcast_attention: bool = False):
        super().__init__()
        self.norm = _norm(channels, num_groups, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(BasicTransformerBlock(channels, heads, context_dim, dropout, upcast_attention)
                                    for _ in range(depth))
        self.proj_out = _zero(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), context (B, L, Dc) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        # permute-then-reshape is a free view when x is channels_last, and one copy otherwise
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        tokens = self.proj_in(tokens)
        for block in self.blocks:
            tokens = block(tokens, context)
        tokens = self.proj_out(tokens)
        return x + tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)


class Downsample(nn.Module):
    """Strided 3x3 conv halving H and W."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.conv(x)


class UNet(nn.Module):
    """Conditional U-Net predicting a (B, out_channels, H, W) target from x_t, t and a (B, L, context_dim) context."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        model_channels: int = 320,
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (0, 1, 2),
        mid_attention: bool = True,
        num_head_channels: int = 64,
        transformer_depth: int = 1,
        context_dim: int = 768,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        num_groups: int = 32,
        num_heads: int | None = None,
        flip_sin_to_cos: bool = False,
        upcast_attention: bool = False,
        size_conditioning: bool = False,
        pooled_text: bool = False,
    ):
        super().__init__()
        channel_mult = list(channel_mult)
        attention_levels = sorted(set(attention_levels))
        if not channel_mult:
            raise ValueError("channel_mult must have at least one level")
        bad = [lvl for lvl in attention_levels if not 0 <= lvl < len(channel_mult)]
        if bad:
            raise ValueError(f"attention_levels {bad} out of range for {len(channel_mult)} levels "
                             f"(valid: 0..{len(channel_mult) - 1})")
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.model_channels = model_channels
        self.context_dim = context_dim
        self.num_levels = len(channel_mult)
        self.gradient_checkpointing = gradient_checkpointing
        self.flip_sin_to_cos = flip_sin_to_cos  # timestep embedding [cos, sin] (SD's) instead of [sin, cos]
        self._num_heads, self._num_head_channels = num_heads, num_head_channels
        self._check_groups(num_groups, _norm_widths(model_channels, channel_mult, num_res_blocks))

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # size conditioning: Fourier features of 6 numbers, embedded like t and added to its embedding
        self.size_embed = nn.Sequential(nn.Linear(6 * model_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim)) if size_conditioning else None
        # pooled text: the mean caption token through an MLP, added to the timestep embedding (as DiT's
        # conditioning and SDXL's pooled text embedding): every ResBlock sees the caption, not only the attention
        self.text_embed = nn.Sequential(nn.Linear(context_dim, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim)) if pooled_text else None
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)

        def stage(in_ch: int, out_ch: int, attn: bool) -> nn.ModuleList:
            layers = nn.ModuleList([ResBlock(in_ch, out_ch, emb_dim, num_groups, dropout)])
            if attn:
                layers.append(SpatialTransformer(out_ch, self._heads(out_ch), context_dim, transformer_depth,
                                                 num_groups, dropout, upcast_attention))
            return layers

        # Down path; skip_chs records the width of every tensor pushed onto the skip stack (conv_in included).
        self.down_blocks = nn.ModuleList()
        ch, skip_chs = model_channels, [model_channels]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down_blocks.append(stage(ch, model_channels * mult, level in attention_levels))
                ch = model_channels * mult
                skip_chs.append(ch)
            if level != self.num_levels - 1:
                self.down_blocks.append(nn.ModuleList([Downsample(ch)]))
                skip_chs.append(ch)

        self.mid_block = stage(ch, ch, mid_attention)
        self.mid_block.append(ResBlock(ch, ch, emb_dim, num_groups, dropout))

        # Up path: num_res_blocks + 1 blocks per level, each consuming one skip; Upsample closes all but level 0.
        self.up_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = stage(ch + skip_chs.pop(), model_channels * mult, level in attention_levels)
                ch = model_channels * mult
                if level != 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                self.up_blocks.append(layers)

        self.norm_out = _norm(ch, num_groups)
        self.conv_out = _zero(nn.Conv2d(ch, self.out_channels, 3, padding=1))
        self._has_attention = any(isinstance(m, SpatialTransformer) for m in self.modules())

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> UNet:
        """Build a named size from UNET_PRESETS with keyword overrides."""
        if name not in UNET_PRESETS:
            raise ValueError(f"unknown U-Net preset {name!r}; valid: {sorted(UNET_PRESETS)}")
        return cls(**{**UNET_PRESETS[name], **overrides})

    def _heads(self, channels: int) -> int:
        if self._num_heads is not None:
            heads = self._num_heads
            if heads < 1 or channels % heads:
                raise ValueError(f"num_heads={heads} must divide the attention width {channels}")
            return heads
        heads = max(1, channels // self._num_head_channels)
        if channels % heads:
            raise ValueError(f"attention width {channels} is not divisible into {heads} heads of "
                             f"num_head_channels={self._num_head_channels}; pick num_head_channels dividing it")
        return heads

    @staticmethod
    def _check_groups(num_groups: int, widths: list[int]) -> None:
        # Checked before building so the error names the fix instead of GroupNorm's bare complaint.
        bad = [c for c in widths if c % min(num_groups, c)]
        if bad:
            raise ValueError(f"num_groups={num_groups} does not divide U-Net widths {bad} "
                             f"(skip concatenations included); set num_groups={math.gcd(num_groups, *widths)} "
                             f"or make model_channels a multiple of {num_groups}")

    def _run(self, layer: nn.Module, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if isinstance(layer, ResBlock):
            args: tuple[torch.Tensor, ...] = (h, emb)
        elif isinstance(layer, SpatialTransformer):
            args = (h, context)
        else:
            return layer(h)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def _run_stage(self, layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor,
                   context: torch.Tensor | None) -> torch.Tensor:
        for layer in layers:
            h = self._run(layer, h, emb, context)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor | None = None,
                size_cond: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) or scalar, context (B, L, context_dim) -> (B, out_channels, H, W); size_cond (B, 6)
        with size conditioning (zeros: dropped)."""
        b, _, height, width = x.shape
        div = 2 ** (self.num_levels - 1)
        if height % div or width % div:
            raise ValueError(f"U-Net input spatial size {height}x{width} must be divisible by {div} "
                             f"(2**(len(channel_mult)-1)); resize or crop the latents")
        if context is not None:
            if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != self.context_dim:
                raise ValueError(f"context must be (B={b}, L, context_dim={self.context_dim}), "
                                 f"got {tuple(context.shape)}")
        elif self._has_attention or self.text_embed is not None:
            raise ValueError("this U-Net has cross-attention layers or a pooled-text path and needs a context "
                             "(B, L, context_dim)")

        # Cast inputs to the parameter dtype so a bf16/fp16 model works without autocast (no-op under autocast).
        dtype = self.conv_in.weight.dtype
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        t_emb = timestep_embedding(t, self.model_channels, flip_sin_to_cos=self.flip_sin_to_cos)  # (B, mc)
        emb = self.time_embed(t_emb.to(dtype))  # (B, 4·mc)
        if self.size_embed is not None:
            if size_cond is None or size_cond.shape != (b, 6):
                raise ValueError(f"this U-Net is size-conditioned and needs size_cond (B={b}, 6): original h, w, "
                                 f"crop top, left, target h, w; got {None if size_cond is None else size_cond.shape}")
            emb = emb + self.size_embed(size_features(size_cond.to(x.device), self.model_channels).to(dtype))
        context = None if context is None else context.to(dtype)
        if self.text_embed is not None:
            emb = emb + self.text_embed(pooled_context(context))

        h = self.conv_in(x.to(dtype))  # (B, mc, H, W)
        skips = [h]
        for layers in self.down_blocks:
            h = self._run_stage(layers, h, emb, context)
            skips.append(h)
        h = self._run_stage(self.mid_block, h, emb, context)
        for layers in self.up_blocks:
            h = self._run_stage(layers, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, H, W)
