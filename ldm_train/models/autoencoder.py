"""Stage 1 networks: convolutional Encoder/Decoder and the Autoencoder that joins them via a regularizer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm_train.models.norm import GroupNorm
from ldm_train.models.regularizers import build_regularizer
from ldm_train.models.upsample import Upsample


def downsample_factor(ch_mult: list[int]) -> int:
    """f = 2**(len(ch_mult) − 1): one stride-2 Downsample between consecutive levels. The only place f is derived."""
    return 2 ** (len(ch_mult) - 1)


def group_norm(channels: int, num_groups: int) -> GroupNorm:
    """GroupNorm with an explicit group count; it is part of the architecture recorded in the artifact."""
    if channels % num_groups:
        raise ValueError(f"GroupNorm: {channels} channels are not divisible by num_groups={num_groups}; "
                         "set autoencoder.num_groups to a divisor of autoencoder.ch")
    return GroupNorm(num_groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, num_groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch, num_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention (the mid-block and the named resolutions)."""

    def __init__(self, ch: int, num_groups: int):
        super().__init__()
        self.norm = group_norm(ch, num_groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # (B, HW, C) each
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad keeps H/2 exactly


def _level_blocks(in_ch: int, out_ch: int, n: int, attn: bool, groups: int, dropout: float) -> nn.ModuleList:
    blocks = nn.ModuleList()
    for i in range(n):
        blocks.append(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, dropout))
        if attn:
            blocks.append(AttnBlock(out_ch, groups))
    return blocks


class Encoder(nn.Module):
    """x (B, 3, H, W) → moments (B, z_out, H/f, W/f) with f = downsample_factor(ch_mult)."""

    def __init__(self, *, in_channels: int, ch: int, ch_mult: list[int], num_res_blocks: int,
                 attn_resolutions: list[int], resolution: int, z_out: int, num_groups: int, dropout: float = 0.0):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.levels = nn.ModuleList()
        res, in_ch = resolution, ch
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            level.blocks = _level_blocks(in_ch, ch * mult, num_res_blocks, res in attn_resolutions, num_groups, dropout)
            in_ch = ch * mult
            if i < len(ch_mult) - 1:
                level.down = Downsample(in_ch)
                res //= 2
            self.levels.append(level)
        self.mid = nn.Sequential(ResnetBlock(in_ch, in_ch, num_groups, dropout), AttnBlock(in_ch, num_groups),
                                 ResnetBlock(in_ch, in_ch, num_groups, dropout))
        self.norm_out = group_norm(in_ch, num_groups)
        self.conv_out = nn.Conv2d(in_ch, z_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            for block in level.blocks:
                h = block(h)
            if hasattr(level, "down"):
                h = level.down(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z (B, z_channels, h, w) → x̂ (B, 3, h·f, w·f)."""

    def __init__(self, *, out_channels: int, ch: int, ch_mult: list[int], num_res_blocks: int,
                 attn_resolutions: list[int], resolution: int, z_channels: int, num_groups: int, dropout: float = 0.0):
        super().__init__()
        in_ch = ch * ch_mult[-1]
        res = resolution // downsample_factor(ch_mult)
        self.conv_in = nn.Conv2d(z_channels, in_ch, 3, padding=1)
        self.mid = nn.Sequential(ResnetBlock(in_ch, in_ch, num_groups, dropout), AttnBlock(in_ch, num_groups),
                                 ResnetBlock(in_ch, in_ch, num_groups, dropout))
        self.levels = nn.ModuleList()
        for i, mult in reversed(list(enumerate(ch_mult))):
            level = nn.Module()
            level.blocks = _level_blocks(in_ch, ch * mult, num_res_blocks + 1, res in attn_resolutions,
                                         num_groups, dropout)
            in_ch = ch * mult
            if i > 0:
                level.up = Upsample(in_ch)
                res *= 2
            self.levels.append(level)
        self.norm_out = group_norm(in_ch, num_groups)
        self.conv_out = nn.Conv2d(in_ch, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            for block in level.blocks:
                h = block(h)
            if hasattr(level, "up"):
                h = level.up(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Autoencoder(nn.Module):
    """Encoder → quant_conv → regularizer (KL or VQ) → post_quant_conv → Decoder.

    Built from the resolved architecture dict that is stored in the artifact's config.yaml, so a reload
    rebuilds exactly what was trained (group counts included).
    """

    def __init__(self, arch: dict):
        super().__init__()
        self.arch = dict(arch)
        a = self.arch
        z = a["z_channels"]
        reg = a["regularizer"]
        common = dict(ch=a["ch"], ch_mult=list(a["ch_mult"]), num_res_blocks=a["num_res_blocks"],
                      attn_resolutions=list(a["attn_resolutions"]), resolution=a["resolution"],
                      num_groups=a["num_groups"], dropout=a.get("dropout", 0.0))
        regularizer = build_regularizer(reg, z)
        moments = regularizer.moments_per_channel * z
        self.encoder = Encoder(in_channels=a["in_channels"], z_out=moments, **common)
        self.quant_conv = nn.Conv2d(moments, moments, 1)
        self.regularizer = regularizer
        self.post_quant_conv = nn.Conv2d(z, z, 1)
        self.decoder = Decoder(out_channels=a["in_channels"], z_channels=z, **common)
        self.f = downsample_factor(a["ch_mult"])
        self.z_channels = z

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """x (B, 3, H, W) → (z, log_dict): z sampled (KL, training) or quantized (VQ)."""
        self.check_input(x)
        return self.regularizer(self.quant_conv(self.encoder(x)))

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-regularizer moments (B, 2z or z, h, w): posterior parameters (KL) or unquantized z (VQ)."""
        self.check_input(x)
        return self.quant_conv(self.encoder(x))

    def latent(self, x: torch.Tensor, sample: bool, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Unscaled latent used by stage 2: posterior sample (with `noise` ε if given) or mode (KL); the
        pre-quantisation z or z_q (VQ, by `regularizer.diffuse`)."""
        return self.regularizer.latent(self.encode_moments(x), sample=sample, noise=noise)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Decode a generated latent; VQ snaps it to the codebook first (the LDM paper's decoder-side quantizer)."""
        return self.decode(self.regularizer.snap(z))

    def forward(self, x: torch.Tensor, latent_noise: float = 0.0) -> tuple[torch.Tensor, dict]:
        """x → (reconstruction, log_dict). `latent_noise` s > 0 (training): the decoder gets z + τ·std(z)·ε, τ ~ U(0, s)
        per image, ε ~ N(0, I), std(z) the batch's (so τ is in the units of the scaled latents stage 2 will see):
        a decoder that also renders slightly-off latents cleanly, as stage 2's samples are."""
        z, log = self.encode(x)
        if latent_noise:
            tau = torch.rand(len(z), 1, 1, 1, device=z.device, dtype=z.dtype) * latent_noise
            z = z + tau * z.detach().std() * torch.randn_like(z)
        return self.decode(z), log

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight: L in the adaptive GAN weight."""
        return self.decoder.conv_out.weight

    def check_input(self, x: torch.Tensor) -> None:
        f = self.f
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the downsampling factor f={f}; "
                             f"choose data.resolution as a multiple of {f}")
