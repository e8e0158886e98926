"""DiT denoiser: shapes at any latent size, adaLN-Zero start, the paper's DiT-XL/2 size and FLOPs, positions,
gradient checkpointing, CFG batching, and the config checks that apply to it."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from ldm_train.config import ConfigError, validate
from ldm_train.diffusion.parameterization import build_parameterization
from ldm_train.models.denoisers import build_network, latent_multiple
from ldm_train.models.dit import DiT, sincos_2d
from ldm_train.utils.flops import count_flops

SMALL = dict(in_channels=4, hidden_size=32, depth=2, num_heads=4, patch_size=2, context_dim=16)


def randomised(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn from N(0, 0.1²): the zero-initialised paths open, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize("h,w", [(8, 8), (4, 12), (10, 6)])
def test_shapes_square_and_non_square(h, w):
    net = randomised(DiT(**SMALL))
    x, ctx = torch.randn(3, 4, h, w), torch.randn(3, 5, 16)
    out = net(x, torch.tensor([1, 500, 999]), ctx)
    assert out.shape == (3, 4, h, w) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="patch_size=2"):
        net(torch.randn(1, 4, 7, 8), torch.tensor([1]), ctx[:1])
    with pytest.raises(ValueError, match="context_dim=16"):
        net(x, torch.tensor([1, 2, 3]), torch.randn(3, 5, 8))


def test_unpatchify_inverts_patchify_layout():
    # the output token of patch (i, j) holds pixels (i·p + r, j·p + c) in channel order (r, c, C)
    net = DiT(**{**SMALL, "out_channels": 3})
    gh, gw, p, C = 2, 3, 2, 3
    img = torch.arange(C * gh * p * gw * p, dtype=torch.float32).view(1, C, gh * p, gw * p)
    tokens = img.view(1, C, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(1, gh * gw, p * p * C)
    assert torch.equal(net.unpatchify(tokens, gh, gw), img)


def test_adaln_zero_fresh_network_outputs_exactly_zero_and_blocks_are_identity():
    net = DiT(**SMALL)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    assert torch.equal(net(x, torch.tensor([3, 700]), ctx), torch.zeros_like(x))
    tokens, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in net.blocks:
        assert torch.equal(block(tokens, c, ctx), tokens)
    assert not torch.equal(randomised(net)(x, torch.tensor([3, 700]), ctx), torch.zeros_like(x))


def test_dit_xl2_matches_the_paper_in_parameters_and_flops():
    # the reference DiT-XL/2 (class-conditional, learned Σ: 8 output channels) has 675,129,632 parameters: ours
    # without the text layers, plus its 1001×1152 class table and its 256×1152 position table (a frozen parameter
    # there, computed here); forward 118.6 GFLOPs at 32×32 latents (multiply-adds; the counter counts 2 per MAC)
    with torch.device("meta"):
        net = DiT(in_channels=4, hidden_size=1152, depth=28, num_heads=16, patch_size=2, context_dim=None,
                  out_channels=8)
        x, t = torch.randn(1, 4, 32, 32), torch.ones(1)
    ours = sum(p.numel() for p in net.parameters())
    assert ours + 1001 * 1152 + 256 * 1152 == 675_129_632
    assert round((ours + 1001 * 1152 + 256 * 1152) / 1e6) == 675
    with torch.no_grad():
        gflops = count_flops(lambda: net(x, t)) / 2e9
    assert gflops == pytest.approx(118.6, abs=0.05)


def test_sincos_positions_hand_values_and_any_grid():
    pos = sincos_2d(2, 3, 8)  # ω = (1, 10000^(−1/2) = 0.01); token 5 is row 1, column 2
    r, c = 1.0, 2.0
    expected = [math.sin(r), math.sin(r * 0.01), math.cos(r), math.cos(r * 0.01),
                math.sin(c), math.sin(c * 0.01), math.cos(c), math.cos(c * 0.01)]
    torch.testing.assert_close(pos[5], torch.tensor(expected))
    big = sincos_2d(4, 5, 8).view(4, 5, 8)
    torch.testing.assert_close(big[:2, :3].reshape(6, 8), pos)  # a larger grid extends a smaller one
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 2, 6)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 4, 6), torch.tensor([10, 900]), torch.randn(2, 3, 16)
    grads = []
    for ckpt in (False, True):
        net = randomised(DiT(**SMALL, gradient_checkpointing=ckpt)).train()
        net(x, t, ctx).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


DDPM = {"objective": "ddpm", "schedule": "scaled_linear", "num_timesteps": 1000, "beta_start": 0.00085,
        "beta_end": 0.012, "prediction_type": "eps"}
FLOW = {"objective": "flow", "flow": {"logit_mean": 0.0, "logit_std": 1.0, "shift": 1.0, "time_scale": 1000}}


@pytest.mark.parametrize("diffusion", [DDPM, FLOW], ids=["ddpm", "flow"])
def test_cfg_batched_call_equals_two_separate_calls(diffusion):
    net = randomised(DiT(**SMALL)).eval()
    param = build_parameterization(diffusion)
    x, ctx, null = torch.randn(3, 4, 6, 4), torch.randn(3, 5, 16), torch.randn(1, 5, 16)
    t = torch.tensor([10, 400, 900]) if diffusion is DDPM else torch.tensor([0.1, 0.4, 0.9])
    s = 3.0
    with torch.no_grad():
        guided = param.guided_model_fn(net, ctx, null, s)(x, t)
        guided = guided[0] if isinstance(guided, tuple) else guided  # ddpm: (ε, x0)
        tm = param.model_time(t)
        out_c, out_u = net(x, tm, ctx), net(x, tm, null.expand(3, -1, -1))
    expected = out_u + s * (out_c - out_u)  # ε (eps-prediction) or v (flow): the output itself
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)


def test_registry_builds_dit_and_checks_patch_fit(compose_cfg, tmp_path):
    cfg = compose_cfg(["experiment=smoke", "stage=diffusion", "unet=dit_tiny", f"paths.run_dir={tmp_path}"])
    unet = OmegaConf.to_container(cfg.unet, resolve=True)
    assert isinstance(build_network(unet, 4), DiT) and latent_multiple(unet)[0] == 2
    validate(cfg)  # 16 px, f=4: 4×4 latents, patch 2
    bad = compose_cfg(["experiment=smoke", "stage=diffusion", "unet=dit_tiny", "f=8", "data.resolution=24",
                       f"paths.run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="patch_size=2.*divisible by 2.*data.resolution=16 or 32"):
        validate(bad)


@pytest.mark.parametrize("option,width,depth", [("dit_s2", 384, 12), ("dit_b2", 768, 12), ("dit_l2", 1024, 24),
                                                ("dit_xl2", 1152, 28)])
def test_paper_sizes_compose(compose_cfg, tmp_path, option, width, depth):
    cfg = compose_cfg(["experiment=smoke", f"unet={option}", f"paths.run_dir={tmp_path}"])
    assert (cfg.unet.kind, cfg.unet.hidden_size, cfg.unet.depth, cfg.unet.patch_size) == ("dit", width, depth, 2)
    assert cfg.unet.context_dim == cfg.text_encoder.dim


def test_export_of_a_dit_is_refused_by_name():
    """diffusers has no UNet2DConditionModel form of a DiT: both export formats say so (before: a missing-key crash)."""
    from types import SimpleNamespace

    from ldm_train.interop.diffusers_export import diffusers_modules

    with pytest.raises(ConfigError, match="denoiser is a DiT, which has no diffusers UNet2DConditionModel form"):
        diffusers_modules(SimpleNamespace(denoiser=DiT(**SMALL)))
