"""The folded upsample conv equals nearest ×2 then a 3×3 conv: values and gradients, both memory layouts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm_train.models.upsample import Upsample, upsample_conv


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (1, 5, 3, 6)])
def test_matches_interpolate_then_conv_with_gradients(shape, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(4, shape[1], 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    out_grad = torch.randn(shape[0], 4, 2 * shape[2], 2 * shape[3], generator=g, dtype=torch.float64)
    grads = []
    for fn in (upsample_conv, reference):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        out = fn(*leaves)
        out.backward(out_grad)
        grads.append((out.detach(), *[t.grad for t in leaves]))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_state_dict_keys_unchanged():
    assert set(Upsample(8).state_dict()) == {"conv.weight", "conv.bias"}
