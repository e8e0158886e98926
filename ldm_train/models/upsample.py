"""Nearest ×2 upsampling + 3×3 conv, shared by the autoencoder's decoder and the U-Net, computed without the 4× tensor.

Along one axis, output row 2i reads the upsampled rows 2i−1, 2i, 2i+1 = input rows i−1, i, i, and row 2i+1 reads
i, i, i+1. So each output sees only 2 input rows, with the 3 taps w0, w1, w2 folded to (w0 | w1+w2) for even rows
and (w0+w1 | w2) for odd rows: a stride-2 transposed conv with a 4-tap kernel K = (w2, w1+w2, w0+w1, w0), padding 1.
In 2-D that is 4 multiply-adds per output and input channel instead of 9 (2.25× fewer FLOPs), and the upsampled
activation is never stored. The result equals interpolate-then-conv up to rounding (tested against it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fold_matrix() -> torch.Tensor:
    """(4, 3): entry [k, a] = 1 where 3×3-kernel tap a contributes to transposed-conv tap k (along one axis)."""
    return torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  fold: torch.Tensor | None = None) -> torch.Tensor:
    """conv3x3(padding 1)(nearest×2(x)) for x (B, C_in, H, W) and weight (C_out, C_in, 3, 3) → (B, C_out, 2H, 2W)."""
    fold = (fold_matrix() if fold is None else fold).to(weight)  # pass it on the device: no host copy per call
    kernel = torch.einsum("ka,oiab,lb->iokl", fold, weight, fold)  # (C_in, C_out, 4, 4): conv_transpose2d's layout
    return F.conv_transpose2d(x, kernel, bias, stride=2, padding=1)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 followed by a 3×3 conv (parameters `conv.weight`, `conv.bias`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.register_buffer("fold", fold_matrix(), persistent=False)  # moves with the module; not in state dicts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, 2H, 2W)."""
        return upsample_conv(x, self.conv.weight, self.conv.bias, self.fold)
