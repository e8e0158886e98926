"""FLOP counting and MFU: hand-computed counts of a linear and a conv layer, the MFU formula, peak look-up."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm_train.utils.flops import count_flops, mfu, resolve_peak_tflops


def test_linear_flops_forward_and_backward_by_hand():
    torch.manual_seed(0)
    layer = nn.Linear(3, 5)
    x = torch.randn(4, 3, requires_grad=True)
    # forward: 4·5 outputs of 3 multiply-adds = 60 MACs = 120 FLOPs; backward: dX (4×5 @ 5×3) and dW (5×4 @ 4×3)
    assert count_flops(lambda: layer(x)) == 2 * 4 * 3 * 5
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * 4 * 3 * 5


def test_conv_flops_by_hand():
    conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
    x = torch.randn(1, 2, 4, 4)
    # 3·4·4 = 48 outputs, each 2·3·3 = 18 multiply-adds
    assert count_flops(lambda: conv(x)) == 2 * 48 * 18


def test_cpu_attention_is_counted():
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 32, 8), torch.randn(2, 4, 32, 8)
    # Q·Kᵀ and P·V: 2 matmuls of B·h·N·L·d multiply-adds each
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * 2 * (2 * 4 * 16 * 32 * 8)


def test_mfu_formula_by_hand():
    # 10 steps of 1e12 FLOPs in 20 s = 0.5 TFLOP/s, against a 2 TFLOP/s peak: 25%
    assert mfu(1e12, 10, 20.0, 2.0) == pytest.approx(0.25)


def test_peak_lookup_is_lightnings(monkeypatch):
    """"auto" is Lightning's table by device name (dense data-sheet figures: H100 SXM bf16 989.4, A100 bf16 312), so
    GPUs beyond A100/H100 get MFU too (an RTX 4090: 82.6 bf16); a number is used as given."""
    from lightning.fabric.utilities import throughput

    cuda = torch.device("cuda", 0)
    for name, peak in (("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0),
                       ("NVIDIA GeForce RTX 4090", 82.6), ("NVIDIA L4", 121.0)):
        monkeypatch.setattr(throughput.torch.cuda, "get_device_name", lambda *a, n=name: n)
        assert resolve_peak_tflops("auto", cuda, "bf16-mixed") == pytest.approx(peak), name
    monkeypatch.setattr(throughput.torch.cuda, "get_device_name", lambda *a: "NVIDIA Mystery GPU")
    assert resolve_peak_tflops("auto", cuda, "bf16-mixed") is None  # unknown: no MFU, said once (below)
    assert resolve_peak_tflops("auto", torch.device("cpu"), "32-true") is None  # a CPU: no figure unless configured
    assert resolve_peak_tflops(1.5, torch.device("cpu"), "32-true") == 1.5
    assert resolve_peak_tflops(None, cuda, "bf16-mixed") is None
    with pytest.raises(ValueError, match="peak_tflops"):
        resolve_peak_tflops(-1, torch.device("cpu"), "32-true")


def test_without_a_peak_mfu_is_absent_and_the_reason_said_once(caplog):
    from types import SimpleNamespace

    from ldm_train.lit.mfu import MFUMonitor

    trainer = SimpleNamespace(precision="32-true", is_global_zero=True)
    with caplog.at_level("INFO"):
        MFUMonitor("auto").on_fit_start(trainer, SimpleNamespace(device=torch.device("cpu")))
    lines = [r.getMessage() for r in caplog.records if "perf/mfu" in r.getMessage()]
    assert lines == ["perf/tflops is logged, perf/mfu is not: Lightning's get_available_flops knows no peak for "
                     "'cpu' at torch.float32; set trainer.peak_tflops=<the device's dense peak TFLOP/s> for MFU"]


def test_callback_logs_mfu_from_tflops(compose_cfg, tmp_path):
    from ldm_train.__main__ import run

    run(compose_cfg(["experiment=smoke", "stage=autoencoder", "logger=csv", f"paths.artifacts={tmp_path / 'a'}",
                     f"paths.run_dir={tmp_path / 'run'}", "trainer.peak_tflops=0.5", "autoencoder.max_steps=8",
                     "trainer.log_every_n_steps=2"]))
    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "autoencoder" / "metrics.csv")))
    logged = [r for r in rows if r.get("perf/mfu")]
    assert len(logged) >= 2, rows[:3]
    for r in logged:
        tflops, util = float(r["perf/tflops"]), float(r["perf/mfu"])
        assert tflops > 0 and util == pytest.approx(tflops / 0.5, rel=1e-5)
