"""Diffusion Transformer (Peebles & Xie 2023) over patchified latents, with text conditioning.

Patchify (a p×p stride-p conv) → N = (h/p)·(w/p) tokens + 2-D sin-cos positions → `depth` blocks → adaLN final
layer → unpatchify. Each block: adaLN-Zero self-attention (shift/scale/gate from the timestep + pooled-text
embedding), cross-attention to the text tokens, adaLN-Zero MLP. Every modulation's gate and the output projection
start at zero, so a fresh network outputs exactly zero and every block starts as the identity.

Cross-attention (as in PixArt-α), not MM-DiT's joint attention (SD3): it keeps the U-Net's interface
net(x, t, context), so cached text embeddings, CFG batching and the text encoders work unchanged, and it costs
N·L attention scores per layer instead of (N+L)², with no second weight stream for the text tokens. MM-DiT's gain
(text tokens refined through the depth) matters for long prompts of a large pretrained encoder, not for ours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm_train.models.unet import Attention, pooled_context, timestep_embedding


def sincos_2d(grid_h: int, grid_w: int, dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Positions (grid_h·grid_w, dim), row-major: the first dim/2 channels encode the row, the rest the column, each
    as [sin(p·ω_k), cos(p·ω_k)] with ω_k = 10000^(−k/(dim/4)), k < dim/4 and p the integer patch index.

    Integer positions: any latent size (aspect buckets) gets a grid, and a larger one extends a smaller one."""
    if dim % 4:
        raise ValueError(f"hidden_size {dim} must be divisible by 4 for 2-D sin-cos positions")
    omega = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim // 4))  # (dim/4,)

    def axis(n: int) -> torch.Tensor:
        args = torch.arange(n, dtype=torch.float64, device=device)[:, None] * omega[None]  # (n, dim/4)
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (n, dim/2)

    rows = axis(grid_h)[:, None, :].expand(grid_h, grid_w, dim // 2)
    cols = axis(grid_w)[None, :, :].expand(grid_h, grid_w, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(grid_h * grid_w, dim).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x·(1 + scale) + shift, with (B, D) modulation broadcast over the N tokens of x (B, N, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused, biased qkv projection (the paper's), through SDPA."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, D) -> (B, N, D)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, N, d_h)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """x += g1·attn(mod(LN(x))); x += xattn(LN(x), context); x += g2·mlp(mod(LN(x))). (shift, scale, gate) × 2
    come from one zero-initialised Linear of the conditioning embedding c (adaLN-Zero)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, context_dim: int | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads)
        self.cross = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
            self.cross = Attention(dim, heads, context_dim)
            _zero(self.cross.to_out)  # the text path also starts closed
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), _zero(nn.Linear(dim, 6 * dim)))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """x (B, N, D), c (B, D), context (B, L, Dc) -> (B, N, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), context)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


def _zero(module: nn.Module) -> nn.Module:
    """Marks `module` to be zero-initialised (done last in DiT._init_weights, after the general init)."""
    module._zero_init = True
    return module


class DiT(nn.Module):
    """Text-conditional DiT: (B, C, h, w) latents, t (B,), context (B, L, context_dim) -> (B, out_channels, h, w).

    `context_dim=None` builds the text-free network (no cross-attention, no pooled-text projection)."""

    def __init__(self, in_channels: int, hidden_size: int, depth: int, num_heads: int, patch_size: int = 2,
                 mlp_ratio: float = 4.0, context_dim: int | None = 768, out_channels: int | None = None,
                 frequency_dim: int = 256, gradient_checkpointing: bool = False):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels or in_channels
        self.patch_size, self.hidden_size, self.context_dim = patch_size, hidden_size, context_dim
        self.frequency_dim, self.gradient_checkpointing = frequency_dim, gradient_checkpointing
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.time_embed = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(),
                                        nn.Linear(hidden_size, hidden_size))
        self.text_embed = None if context_dim is None else nn.Sequential(
            nn.Linear(context_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, context_dim) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), _zero(nn.Linear(hidden_size, 2 * hidden_size)))
        self.proj_out = _zero(nn.Linear(hidden_size, patch_size * patch_size * self.out_channels))
        self._init_weights()
        self._pos: dict[tuple, torch.Tensor] = {}

    def _init_weights(self) -> None:
        # the paper's: Xavier-uniform linears with zero bias, the patch embedding as a linear, N(0, 0.02) for the
        # timestep MLP; then the adaLN-Zero modulations, the text path's output and the output projection to zero
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.hidden_size, -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.time_embed[0], self.time_embed[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for m in self.modules():
            if getattr(m, "_zero_init", False):
                for p in m.parameters():
                    nn.init.zeros_(p)

    def positions(self, grid_h: int, grid_w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(1, grid_h·grid_w, D) sin-cos positions, computed once per grid size, device and dtype."""
        key = (grid_h, grid_w, device, dtype)
        if key not in self._pos:
            self._pos[key] = sincos_2d(grid_h, grid_w, self.hidden_size, device).to(dtype)[None]
        return self._pos[key]

    def condition(self, t: torch.Tensor, context: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """c (B, D) = MLP(sinusoid(t)) + MLP(mean of the context tokens)."""
        c = self.time_embed(timestep_embedding(t, self.frequency_dim).to(dtype))
        if self.text_embed is not None:
            c = c + self.text_embed(pooled_context(context))
        return c

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"DiT input {h}x{w} must be divisible by patch_size={p}; resize or crop the latents")
        if self.context_dim is not None and (context is None or context.ndim != 3 or context.shape[0] != b
                                             or context.shape[-1] != self.context_dim):
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"context must be (B={b}, L, context_dim={self.context_dim}), got {got}")
        dtype = self.patch_embed.weight.dtype  # bf16/fp16 weights work without autocast
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.ndim == 0 else t
        context = None if context is None else context.to(dtype)
        c = self.condition(t, context, dtype)  # (B, D)
        tokens = self.patch_embed(x.to(dtype)).flatten(2).transpose(1, 2)  # (B, N, D), row-major
        tokens = tokens + self.positions(h // p, w // p, x.device, dtype)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, context, use_reentrant=False)
            else:
                tokens = block(tokens, c, context)
        shift, scale = self.ada_out(c).chunk(2, dim=1)
        out = self.proj_out(modulate(self.norm_out(tokens), shift, scale))  # (B, N, p·p·C_out)
        return self.unpatchify(out, h // p, w // p)

    def unpatchify(self, out: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """(B, gh·gw, p·p·C) -> (B, C, gh·p, gw·p); channel layout (p_row, p_col, C) per token."""
        b, p, c = out.shape[0], self.patch_size, self.out_channels
        out = out.view(b, grid_h, grid_w, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
        return out.reshape(b, c, grid_h * p, grid_w * p)
