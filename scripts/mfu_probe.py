"""Where an SD-1.5-size U-Net train step spends its GPU time: the inputs to the MFU work of bench.py's sd15 row.

    python scripts/mfu_probe.py [--batch 32] [--compiled] [--json FILE]      # CUDA only, about a minute

1. Attention at SD-1.5's shapes (64×64 latents: 4096 tokens × 40-dim heads, then 1024 × 80, 256 × 160), forward +
   backward in bf16, per SDPA backend (flash, memory-efficient, cuDNN) and the default choice: ms and TFLOP/s.
2. The eager bf16 train step with cuDNN's autotuner off and on (`torch.backends.cudnn.benchmark`), interleaved;
   then with the channels_last GroupNorm of `models/norm.py` (CUDA_CHANNELS_LAST, off by default: CUDA's own
   GroupNorm works on contiguous NCHW, so every call on channels_last activations copies in and out), checked
   against the native one and timed on its own (GroupNorm + SiLU) and in the step.
3. One profiled eager step: GPU time by kind of kernel (convolution, matmul, attention, normalisation,
   elementwise, optimizer, Triton-fused) and the top kernels; with --compiled, the same for a torch.compile'd step
   (about two more minutes: compilation).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldm_train.models.unet import UNet
from ldm_train.utils.flops import count_flops


def cuda_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds per call, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def attention(batch: int, results: dict) -> None:
    print("== 1. attention, forward + backward, bf16")
    shapes = {"self 4096x40": (4096, 4096, 40), "cross 4096x77": (4096, 77, 40), "self 1024x80": (1024, 1024, 80),
              "self 256x160": (256, 256, 160)}
    backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION}
    for name, (n, n_kv, d) in shapes.items():
        q = torch.randn(batch, 8, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(batch, 8, n_kv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(batch, 8, n_kv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(q)
        flops = 3 * 4 * batch * 8 * n * n_kv * d  # QK^T and PV forward, twice that backward
        row = []

        def step(q=q, k=k, v=v, grad=grad):
            F.scaled_dot_product_attention(q, k, v).backward(grad)

        for bname, backend in backends.items():
            try:
                if backend is None:
                    ms = cuda_ms(step)
                else:
                    with sdpa_kernel(backend):
                        ms = cuda_ms(step)
            except RuntimeError as exc:
                row.append(f"{bname} n/a")
                results[f"attn_{name}_{bname}"] = f"n/a: {str(exc).splitlines()[0][:80]}"
                continue
            results[f"attn_{name}_{bname}_ms"] = ms
            row.append(f"{bname} {ms:.2f} ms ({flops / ms / 1e9:.0f} TF/s)")
        print(f"  {name:<14} " + " | ".join(row), flush=True)


@contextlib.contextmanager
def layout_kept_group_norm():
    """Turn on ldm_train's channels_last CUDA GroupNorm (`models/norm.py`, CUDA_CHANNELS_LAST) while the block runs."""
    from ldm_train.models import norm

    before = norm.CUDA_CHANNELS_LAST
    norm.CUDA_CHANNELS_LAST = True
    try:
        yield
    finally:
        norm.CUDA_CHANNELS_LAST = before


def group_norm_check(b: int, results: dict) -> None:
    """The channels_last GroupNorm on a bf16 SD-1.5-size map: error against F.group_norm in fp32, and the time of
    GroupNorm + SiLU forward and backward, native against layout-kept."""
    from ldm_train.models.norm import GroupNorm

    gn = GroupNorm(32, 320).cuda()
    x = torch.randn(b, 320, 64, 64, device="cuda").add_(3).contiguous(memory_format=torch.channels_last)
    x = x.to(torch.bfloat16).requires_grad_(True)
    dy = torch.randn_like(x)
    ref = F.group_norm(x.detach().float(), 32, gn.weight, gn.bias, gn.eps)
    with layout_kept_group_norm():
        got = gn(x)
    rel = float((got.float() - ref).norm() / ref.norm())
    results["layout_kept_group_norm_rel_err"] = rel
    print(f"  layout-kept GroupNorm vs F.group_norm(fp32) on a bf16 input: relative error {rel:.2e} "
          f"(output {got.dtype}, channels_last {got.is_contiguous(memory_format=torch.channels_last)})")

    def gn_silu():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = F.silu(gn(x))
        y.backward(dy)

    for variant in ("native", "kept"):
        with layout_kept_group_norm() if variant == "kept" else contextlib.nullcontext():
            ms = cuda_ms(gn_silu)
        results[f"group_norm_silu_{variant}_ms"] = ms
        print(f"  GroupNorm+SiLU fwd+bwd, {variant:<6} {ms:.3f} ms ({b}×320×64×64 bf16)")


def train_step(unet, opt, x, t, ctx):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.mse_loss(unet(x, t, ctx).float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


KINDS = [("attention", ("flash", "fmha", "attention", "sdpa", "attn")),
         ("optimizer", ("adam",)),
         ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit")),
         ("matmul", ("gemm", "cutlass", "cublas", "nvjet", "xmma")),
         ("triton (fused)", ("triton",)),
         ("normalisation", ("norm", "moments")),
         ("elementwise/other", ("",))]


def kind_of(kernel: str) -> str:
    low = kernel.lower()
    return next(kind for kind, keys in KINDS if any(key in low for key in keys))


def profile_step(label: str, step, flops: int, results: dict) -> None:
    """One profiled step: GPU time by kind of kernel, and the top kernels."""
    print(f"== 3. one profiled {label} step (cudnn.benchmark on): GPU time by kind of kernel")
    torch.backends.cudnn.benchmark = True
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = defaultdict(float)
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if us > 0:
            kernels[event.key] += us
    total = sum(kernels.values())
    by_kind = defaultdict(float)
    for name, us in kernels.items():
        by_kind[kind_of(name)] += us
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        results[f"profile_{label}_{kind}_ms"] = us / 1e3
        print(f"  {kind:<18} {us / 1e3:8.1f} ms  {us / total:6.1%}")
    print(f"  GPU busy {total / 1e3:.1f} ms ({flops / total / 1e6:.0f} TFLOP/s over busy time); top kernels:")
    for name, us in sorted(kernels.items(), key=lambda kv: -kv[1])[:15]:
        print(f"    {us / 1e3:7.2f} ms  {kind_of(name):<14} {name[:110]}")
    results[f"profile_{label}_total_ms"] = total / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--compiled", action="store_true", help="also profile a torch.compile'd step")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("mfu_probe.py needs a CUDA GPU")
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch}
    attention(args.batch, results)

    print("== 2. eager SD-1.5 train step, cudnn.benchmark off / on")
    torch.manual_seed(0)
    unet = UNet.from_preset("sd15").cuda().to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
    b = args.batch
    x = torch.randn(b, 4, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (b,), device="cuda")
    ctx = torch.randn(b, 77, 768, device="cuda")
    step = train_step(unet, opt, x, t, ctx)
    flops = count_flops(step)
    times = defaultdict(list)
    for flag in (False, True):  # one warm-up pass per setting (the autotuner searches on its first calls)
        torch.backends.cudnn.benchmark = flag
        cuda_ms(step, warmup=3, reps=1)
    for _ in range(3):
        for flag in (False, True):
            torch.backends.cudnn.benchmark = flag
            times[flag].append(cuda_ms(step, warmup=1, reps=3))
    for flag in (False, True):
        ms = statistics.median(times[flag])
        results[f"eager_benchmark_{flag}_ms"] = ms
        print(f"  cudnn.benchmark={flag!s:<5}  {ms:.1f} ms  {flops / ms / 1e9:.0f} TFLOP/s", flush=True)

    print("   channels_last GroupNorm for CUDA (models/norm.py, off by default), interleaved with the native one")
    try:  # a failure here is reported and the probe goes on to the profiles
        group_norm_check(b, results)
        times = defaultdict(list)
        for _ in range(3):
            for variant in ("native", "kept"):
                with layout_kept_group_norm() if variant == "kept" else contextlib.nullcontext():
                    times[variant].append(cuda_ms(step, warmup=1, reps=3))
        for variant in ("native", "kept"):
            ms = statistics.median(times[variant])
            results[f"eager_groupnorm_{variant}_ms"] = ms
            print(f"  GroupNorm {variant:<7} {ms:.1f} ms  {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
    except Exception as exc:  # noqa: BLE001 - a probe row, not a product path
        results["layout_kept_group_norm_error"] = repr(exc)[:300]
        print(f"  layout-kept GroupNorm FAILED: {exc!r}"[:300], flush=True)

    profile_step("eager", step, flops, results)
    if args.compiled:
        compiled = torch.compile(unet)
        step = train_step(compiled, opt, x, t, ctx)
        cuda_ms(step, warmup=3, reps=1)  # compiles forward and backward
        ms = cuda_ms(step, warmup=1, reps=5)
        results["compiled_ms"] = ms
        print(f"== compiled step {ms:.1f} ms  {flops / ms / 1e9:.0f} TFLOP/s")
        profile_step("compiled", step, flops, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
