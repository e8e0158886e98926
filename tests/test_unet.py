"""U-Net: shapes, zero-init convention, conditioning paths, checkpointing parity, SD 1.5 size."""

from __future__ import annotations

import pytest
import torch

from ldm_train.models.unet import UNet, timestep_embedding

TINY = dict(in_channels=4, model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1],
            num_head_channels=8, context_dim=8, num_groups=8)


def tiny(**overrides) -> UNet:
    torch.manual_seed(0)
    return UNet(**{**TINY, **overrides})


def perturb(params) -> None:
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn_like(p) * 0.2)


def perturb_zero_init(model: UNet) -> None:
    """Give every zero-initialised tensor random values so all residual branches are live."""
    perturb([p for p in model.parameters() if not p.any()])


def inputs(b: int = 2, size: int = 8):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, 4, size, size, generator=g), torch.tensor([3, 700][:b]),
            torch.randn(b, 5, 8, generator=g))


@pytest.mark.parametrize("size", [8, 16])
def test_output_shape_matches_input(size):
    x, t, ctx = inputs(size=size)
    assert tiny()(x, t, ctx).shape == x.shape
    assert tiny(out_channels=8)(x, t, ctx).shape == (2, 8, size, size)


def test_scalar_and_float_timesteps():
    x, _, ctx = inputs()
    m = tiny()
    perturb_zero_init(m)
    torch.testing.assert_close(m(x, 5, ctx), m(x, torch.tensor([5, 5]), ctx))
    assert m(x, torch.tensor([0.5, 0.25]), ctx).shape == x.shape


def test_non_divisible_size_raises():
    m = tiny(channel_mult=[1, 2, 2])
    with pytest.raises(ValueError, match="divisible by 4"):
        m(torch.randn(1, 4, 10, 10), torch.tensor([1]), torch.randn(1, 5, 8))


def test_bad_num_groups_names_fix():
    with pytest.raises(ValueError, match="num_groups=16"):
        UNet(**{**TINY, "num_groups": 32})


def test_zero_init_output_then_learns():
    x, t, ctx = inputs()
    m = tiny()
    assert torch.equal(m(x, t, ctx), torch.zeros_like(x))
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    torch.nn.functional.mse_loss(m(x, t, ctx), torch.randn_like(x)).backward()
    opt.step()
    assert m(x, t, ctx).abs().max() > 0


def test_context_matters():
    x, t, ctx = inputs()
    m = tiny()
    perturb([m.conv_out.weight, m.conv_out.bias])
    perturb([p for n, p in m.named_parameters() if "proj_out" in n])
    out1, out2 = m(x, t, ctx), m(x, t, ctx + torch.randn_like(ctx))
    assert (out1 - out2).abs().max() > 1e-4


def test_timestep_matters():
    x, _, ctx = inputs()
    m = tiny()
    perturb_zero_init(m)
    assert (m(x, torch.tensor([1, 1]), ctx) - m(x, torch.tensor([900, 900]), ctx)).abs().max() > 1e-4


def test_gradient_checkpointing_matches():
    x, t, ctx = inputs()
    ref, ckpt = tiny(), tiny(gradient_checkpointing=True)
    perturb_zero_init(ref)
    ckpt.load_state_dict(ref.state_dict())
    outs, grads = [], []
    for m in (ref, ckpt):
        m.train()
        c = ctx.clone().requires_grad_(True)
        out = m(x, t, c)
        out.square().mean().backward()
        outs.append(out)
        grads.append([c.grad] + [p.grad for p in m.parameters()])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, atol=1e-5, rtol=0)


def test_sd15_parameter_count_on_meta():
    with torch.device("meta"):
        m = UNet.from_preset("sd15")
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - 859.52e6) / 859.52e6 < 0.01, n
    heads = {mod.attn1.heads for mod in m.modules() if hasattr(mod, "attn1")}
    assert heads == {8}


def test_num_head_channels_sets_heads():
    m = tiny(model_channels=32, num_head_channels=16)
    assert {mod.attn1.heads for mod in m.modules() if hasattr(mod, "attn1")} == {4}


def test_timestep_embedding_hand_case():
    emb = timestep_embedding(torch.tensor([0, 1]), 6)
    torch.testing.assert_close(emb[0], torch.tensor([0.0, 0, 0, 1, 1, 1]))
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(3) / 3)
    torch.testing.assert_close(emb[1], torch.cat([freqs.sin(), freqs.cos()]))
    assert timestep_embedding(torch.tensor([2]), 7).shape == (1, 7)


def test_pooled_text_adds_the_mean_caption_to_the_timestep_embedding():
    """unet.pooled_text: every ResBlock's embedding is time_embed(sinusoid(t)) + text_embed(mean of the tokens),
    computed here by hand from the two MLPs and compared with what the first ResBlock receives."""
    net = tiny(pooled_text=True)
    x, t, ctx = inputs()
    seen = []
    net.down_blocks[0][0].register_forward_hook(lambda m, args, out: seen.append(args[1]))  # returns None
    net(x, t, ctx)
    expected = net.time_embed(timestep_embedding(t, 16)) + net.text_embed(ctx.sum(dim=1) / ctx.shape[1])
    torch.testing.assert_close(seen[0], expected)
    assert tiny().text_embed is None


def test_pooled_text_alone_carries_the_caption():
    """Without any attention layer only the pooled path sees the caption: the output follows the context, a plain
    network's does not, and a missing context is refused."""
    net = tiny(attention_levels=[], mid_attention=False, pooled_text=True)
    perturb_zero_init(net)
    x, t, ctx = inputs()
    assert not torch.allclose(net(x, t, ctx), net(x, t, ctx.flip(0)))
    with pytest.raises(ValueError, match="pooled-text"):
        net(x, t)
    plain = tiny(attention_levels=[], mid_attention=False)
    perturb_zero_init(plain)
    torch.testing.assert_close(plain(x, t, ctx), plain(x, t, ctx.flip(0)))


def test_pooled_text_is_a_unet_config_option(compose_cfg):
    """`unet.pooled_text=true` reaches the network the pipeline builds; the default builds none."""
    from omegaconf import OmegaConf

    from ldm_train.pipeline.latent_diffusion import build_denoiser

    def built(overrides):
        cfg = compose_cfg(["experiment=smoke", *overrides])
        return build_denoiser(OmegaConf.to_container(cfg.unet, resolve=True), 4, cfg.text_encoder.dim)

    assert built(["unet.pooled_text=true"]).text_embed is not None
    assert built([]).text_embed is None
    assert built(["experiment=quickstart"]).text_embed is not None  # the quickstart turns it on
