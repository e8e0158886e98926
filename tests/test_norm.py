"""The channels_last GroupNorm backward against autograd through the native kernel (an independent computation)."""

import pytest
import torch
import torch.nn.functional as F

from ldm_train.models import norm
from ldm_train.models.norm import GroupNorm


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("channels,groups,size", [(32, 32, 32), (64, 8, 32), (12, 3, 40)])
def test_fast_backward_matches_native(monkeypatch, channels, groups, size):
    torch.manual_seed(0)
    gn = GroupNorm(groups, channels, eps=1e-6).double()
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    x = _cl(torch.randn(2, channels, size, size, dtype=torch.float64) * 3 + 1).requires_grad_(True)
    dy = _cl(torch.randn_like(x))
    calls, backward = [], norm._GroupNormChannelsLast.backward
    monkeypatch.setattr(norm._GroupNormChannelsLast, "backward",
                        staticmethod(lambda ctx, g: calls.append(1) or backward(ctx, g)))
    y = gn(x)
    got = torch.autograd.grad(y, (x, gn.weight, gn.bias), dy)
    assert calls, "the channels_last path was not taken"
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    want_y = F.group_norm(x, groups, gn.weight, gn.bias, 1e-6)
    want = torch.autograd.grad(want_y, (x, gn.weight, gn.bias), dy)
    torch.testing.assert_close(y, want_y)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gradcheck():
    torch.manual_seed(0)
    x = _cl(torch.randn(1, 4, 32, 32, dtype=torch.float64)).requires_grad_(True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: norm._GroupNormChannelsLast.apply(x, w, b, 2, 1e-5), (x, w, b))


def test_other_inputs_use_the_native_kernel(monkeypatch):
    monkeypatch.setattr(norm._GroupNormChannelsLast, "apply", lambda *a: pytest.fail("fast path taken"))
    gn = GroupNorm(4, 8)
    gn(torch.randn(2, 8, 32, 32, requires_grad=True))  # contiguous
    gn(_cl(torch.randn(2, 8, 8, 8)).requires_grad_(True))  # small map
    with torch.no_grad():
        gn(_cl(torch.randn(2, 8, 32, 32)))
    assert set(GroupNorm(4, 8).state_dict()) == set(torch.nn.GroupNorm(4, 8).state_dict())
