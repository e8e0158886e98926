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
    _assert_matches_native(y, got, x, gn.weight, gn.bias, groups, dy)


def _assert_matches_native(y, grads, x, w, b, groups, dy):
    """Output and (x, w, b) gradients equal autograd through F.group_norm (eps 1e-6) to float64 rounding."""
    want_y = F.group_norm(x, groups, w, b, 1e-6)
    torch.testing.assert_close(y, want_y)
    for got, want in zip(grads, torch.autograd.grad(want_y, (x, w, b), dy)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


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


# ---- the layout-keeping path (CUDA-only in the module; the Function itself is device-agnostic) ---------------
@pytest.mark.parametrize("channels,groups,size", [(32, 32, 8), (64, 8, 16), (12, 3, 5)])
def test_layout_kept_matches_native_float64(channels, groups, size):
    torch.manual_seed(0)
    x = _cl(torch.randn(2, channels, size, size, dtype=torch.float64) * 3 + 5).requires_grad_(True)
    w = torch.randn(channels, dtype=torch.float64, requires_grad=True)
    b = torch.randn(channels, dtype=torch.float64, requires_grad=True)
    dy = _cl(torch.randn_like(x))
    y = norm._GroupNormLayoutKept.apply(x, w, b, groups, 1e-6)
    got = torch.autograd.grad(y, (x, w, b), dy)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    _assert_matches_native(y, got, x, w, b, groups, dy)


def test_layout_kept_gradcheck():
    torch.manual_seed(0)
    x = _cl(torch.randn(1, 4, 3, 5, dtype=torch.float64)).requires_grad_(True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: norm._GroupNormLayoutKept.apply(x, w, b, 2, 1e-5), (x, w, b))


def test_layout_kept_bf16_keeps_precision_under_a_large_mean():
    """bf16 in and out (as under autocast), a mean 50× the spread: against a float64 GroupNorm of the same bf16
    input, the output is off by bf16 rounding only and the gradients by bf16/fp32 rounding, not by the
    cancellation error of statistics or coefficients held in low precision."""
    torch.manual_seed(0)
    x16 = _cl(torch.randn(2, 16, 8, 8) + 50).to(torch.bfloat16).requires_grad_(True)
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    dy16 = _cl(torch.randn(2, 16, 8, 8)).to(torch.bfloat16)
    y = norm._GroupNormLayoutKept.apply(x16, w, b, 4, 1e-5)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x16, w, b))
    want_y = F.group_norm(x64, 4, w64, b64, 1e-5)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), want_y, rtol=8e-3, atol=8e-3)
    dx, dw, db = torch.autograd.grad(y, (x16, w, b), dy16)
    want_dx, want_dw, want_db = torch.autograd.grad(want_y, (x64, w64, b64), dy16.double())
    assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    torch.testing.assert_close(dx.double(), want_dx, rtol=1e-2, atol=1e-2 * want_dx.abs().max().item())
    torch.testing.assert_close(dw.double(), want_dw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db.double(), want_db, rtol=1e-5, atol=1e-5)


def test_layout_kept_path_is_cuda_only(monkeypatch):
    monkeypatch.setattr(norm, "CUDA_CHANNELS_LAST", True)
    monkeypatch.setattr(norm._GroupNormLayoutKept, "apply", lambda *a: pytest.fail("CUDA path taken on the CPU"))
    gn = GroupNorm(4, 8)
    gn(_cl(torch.randn(2, 8, 32, 32)).requires_grad_(True))
