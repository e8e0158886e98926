"""scripts/bench.py compares like with like; the fast paths keep their meaning (counters across a resume, precision)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from ldm_train.diffusion.ema import EMA, ema_decay
from ldm_train.lit.trainer import resolve_precision
from ldm_train.models.regularizers import VectorQuantizer


def _script(name: str):
    """Import scripts/<name>.py (the scripts folder is not a package)."""
    path = Path(__file__).parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_matched_sizes_are_within_three_percent():
    diffusers = pytest.importorskip("diffusers")
    bench = _script("bench")
    count = bench._params
    assert count(bench.UNet(**bench.UNET_OURS)) == pytest.approx(
        count(diffusers.UNet2DConditionModel(**bench.UNET_DIFFUSERS)), rel=0.03)
    assert count(bench.Autoencoder(bench.AE_OURS)) == pytest.approx(
        count(diffusers.AutoencoderKL(**bench.AE_DIFFUSERS)), rel=0.03)


def test_missing_package_skips_the_row_with_its_name():
    bench = _script("bench")
    with pytest.raises(bench.Skip, match="no_such_package_xyz"):
        bench._import("no_such_package_xyz")
    b = bench.Bench("cpu", quick=True, compile_ours=False)
    with pytest.raises(bench.Skip, match="CUDA"):
        b.sd15()


def test_ema_warmup_position_survives_a_state_dict_load():
    model = nn.Linear(2, 2)
    ema = EMA(model, max_decay=0.999)
    for _ in range(3):
        ema.update(model)
    assert int(ema.num_updates) == 3
    fresh = EMA(model, max_decay=0.999)
    fresh.load_state_dict(ema.state_dict())
    assert fresh.update(model) == ema_decay(3, 0.999)  # continues at n = 3, not at 0
    assert int(fresh.num_updates) == 4


def test_vq_restart_clock_survives_a_state_dict_load():
    vq = VectorQuantizer(4, 2, restart=True, restart_every=3)
    vq.train()
    z = torch.randn(2, 2, 2, 2)
    vq(z)
    vq(z)
    fresh = VectorQuantizer(4, 2, restart=True, restart_every=3)
    fresh.load_state_dict(vq.state_dict())
    fresh.train()
    fresh(z)  # the third step since the start: the restart happens now (not 3 steps after the load)
    assert int(fresh.steps) == 3 and fresh.usage.sum() == 0  # usage is cleared by a restart only


def test_precision_auto():
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert resolve_precision("auto", "cpu") == "32-true"
    expected = "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    assert resolve_precision("auto", "auto") == expected


def test_mfu_probe_sorts_kernels_by_kind():
    """Kernel names as the H200 profile printed them (and cuBLAS/cuDNN names of the same families), labelled by hand."""
    probe = _script("mfu_probe")
    labelled = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1_cga1x1x1_kernel0_0":
            "attention",
        "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false>>": "attention",
        "sm90_xmma_wgrad_indexed_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "convolution",
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize256x128x64": "convolution",
        "nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_NNT": "matmul",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "matmul",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float, false>": "normalisation",
        "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float, float>": "normalisation",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>, "
        "FusedAdamMathFunctor<float, 4, ADAM_MODE::ADAMW, false>>": "optimizer",
        "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_"
        "kernel_cuda>>": "elementwise/other",
    }
    assert {name: probe.kind_of(name) for name in labelled} == labelled


def test_probe_turns_the_cuda_group_norm_on_and_back_off():
    """The probe's A/B switch sets models/norm.py's CUDA_CHANNELS_LAST inside the block only, even on an error."""
    from ldm_train.models import norm

    probe = _script("mfu_probe")
    assert norm.CUDA_CHANNELS_LAST is False  # the default the probe measures against
    with probe.layout_kept_group_norm():
        assert norm.CUDA_CHANNELS_LAST is True
    assert norm.CUDA_CHANNELS_LAST is False
    with pytest.raises(RuntimeError), probe.layout_kept_group_norm():
        raise RuntimeError("boom")
    assert norm.CUDA_CHANNELS_LAST is False


def test_interop_bench_reports_the_stage_process_own_peak_memory():
    """Linux folds a forking parent's RSS into the child's ru_maxrss at exec: measured that way, every stage of
    bench_interop reported the 14.8 GiB of the parent's full fine-tuning row. The child's VmHWM is its own."""
    bench = _script("bench_interop")
    ballast = torch.ones(2 * 2**30 // 4)  # 2 GiB, every page touched, in this (the parent) process
    _, peak_gib = bench.timed_stage(["--help"])  # Hydra's help: a small process (~30 MB), runs nothing
    assert ballast.sum() > 0
    assert 0 < peak_gib < 1.0, f"the stage process reported {peak_gib:.2f} GiB: the parent's 2 GiB leaked in"
