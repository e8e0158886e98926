"""FLOPs of a training step (torch's FlopCounterMode) and model-FLOPs utilisation against a device's peak."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) peak TFLOP/s from the vendors' data sheets, SXM parts; "fp32" is the tensor-core TF32 rate
# only when TF32 matmuls are allowed, else the plain FP32 rate. Matched by substring of the CUDA device name.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def precision_class(precision: str | int) -> str:
    """Lightning precision → the peak column it runs at: "bf16" (bf16/fp16 math), "tf32" or "fp32"."""
    p = str(precision)
    if "bf16" in p or p.startswith("16"):
        return "bf16"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def resolve_peak_tflops(setting: float | str | None, device_name: str | None, precision: str | int) -> float | None:
    """`trainer.peak_tflops`: a number is used as given; "auto" looks the device name up in PEAK_TFLOPS; None = none.

    Returns None when no peak is known (e.g. a CPU without a configured figure): MFU is then not logged.
    """
    if setting is None or setting == "none":
        return None
    if setting != "auto":
        peak = float(setting)
        if peak <= 0:
            raise ValueError(f"trainer.peak_tflops must be positive, 'auto' or null, got {setting!r}")
        return peak
    for key, row in PEAK_TFLOPS.items():
        if device_name and key in device_name.upper():
            return row[precision_class(precision)]
    return None


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
