"""FLOPs of a training step (torch's FlopCounterMode) and model-FLOPs utilisation against a device's peak (Lightning's
table, or `trainer.peak_tflops`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode


def compute_dtype(precision: str | int) -> torch.dtype:
    """Lightning precision → the dtype its matmuls run in: "bf16-mixed" → bfloat16, "16-mixed" → float16, …"""
    p = str(precision)
    if "bf16" in p:
        return torch.bfloat16
    if p.startswith("16"):
        return torch.float16
    return torch.float64 if p.startswith("64") else torch.float32


def resolve_peak_tflops(setting: float | str | None, device: torch.device, precision: str | int) -> float | None:
    """`trainer.peak_tflops`: a number is used as given; "auto" asks Lightning's `get_available_flops` (its table of
    GPUs and TPUs, by device name and compute dtype; fp32 counts at the TF32 rate when matmuls may use it); None =
    none. Returns None when no peak is known (a CPU, a GPU Lightning's table lacks): MFU is then not logged."""
    if setting is None or setting == "none":
        return None
    if setting != "auto":
        peak = float(setting)
        if peak <= 0:
            raise ValueError(f"trainer.peak_tflops must be positive, 'auto' or null, got {setting!r}")
        return peak
    from lightning.fabric.utilities.throughput import get_available_flops

    flops = get_available_flops(torch.device(device), compute_dtype(precision))
    return flops / 1e12 if flops else None


def mfu(flops_per_step: float, steps: int, seconds: float, peak_tflops: float) -> float:
    """Model-FLOPs utilisation = flops_per_step · steps / seconds / (peak_tflops · 10¹²)."""
    return flops_per_step * steps / seconds / (peak_tflops * 1e12)


def _register_cpu_attention() -> None:
    # torch counts the CUDA SDPA kernels but not the CPU flash kernel, which would leave attention out of CPU counts;
    # the formulas torch applies to its CUDA SDPA kernels
    ops = torch.ops.aten
    fwd = getattr(ops, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is None or bwd is None or fwd in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(fwd)
    def _fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    @flop_counter.register_flop_formula(bwd)
    def _bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


try:
    _register_cpu_attention()
except (AttributeError, RuntimeError):  # another torch's private helpers: CPU attention just goes uncounted
    pass


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs (multiply-add = 2) of the matmul/conv/attention ops that `fn()` runs, backward included."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()
