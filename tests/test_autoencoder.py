"""Stage-1 model and loss: shapes for every f, the KL and VQ regularizers, the adaptive GAN weight, the
disc_start gate, the d-losses, the nll formula and the perceptual naming. Expected values come from
torch.distributions, autograd on separate graphs, or hand-worked cases."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf
from torch import nn
from torch.distributions import Normal, kl_divergence

from ldm_train import config as ldm_config
from ldm_train.config import resolved_arch
from ldm_train.losses import perceptual as perceptual_mod
from ldm_train.losses.autoencoder_loss import (
    AutoencoderLoss,
    adaptive_disc_weight,
    hinge_d_loss,
    vanilla_d_loss,
)
from ldm_train.models.autoencoder import Autoencoder
from ldm_train.models.regularizers import (
    DiagonalGaussianRegularizer,
    VectorQuantizer,
    kl_to_standard_normal,
    vq_loss,
)

# ------------------------------------------------------------------------------------------ every f builds


@pytest.mark.parametrize("f", [1, 2, 4, 8, 16, 32])
def test_every_f_builds_with_the_right_latent_shape(compose_cfg, f):
    res = 64 if f == 32 else 32
    table = yaml.safe_load((ldm_config.ARCH_DIR / f"f{f}.yaml").read_text())
    for reg in ("kl", "vq"):
        cfg = compose_cfg([f"f={f}", f"regularizer={reg}", "autoencoder.ch=16", "autoencoder.num_groups=8",
                           "autoencoder.num_res_blocks=1", f"data.resolution={res}"])
        torch.manual_seed(0)
        model = Autoencoder(resolved_arch(cfg)).eval()
        x = torch.rand(2, 3, res, res) * 2 - 1
        with torch.no_grad():
            z = model.latent(x, sample=False)
            xrec, _ = model(x)
            moments = model.encode_moments(x)
        z_channels = table[reg]["z_channels"]
        assert z.shape == (2, z_channels, res // f, res // f), (f, reg)
        assert model.z_channels == z_channels and model.f == f
        assert xrec.shape == x.shape
        if reg == "kl":
            assert moments.shape[1] == 2 * z_channels
            assert torch.equal(z, moments[:, :z_channels])  # the mode is the posterior mean
        else:
            assert model.regularizer.n_embed == table[reg]["n_embed"]
            assert torch.equal(z, moments)  # diffuse=pre_quant (the default): the encoder output, unquantized
            codebook = model.regularizer.embedding.weight
            flat = model.regularizer.snap(z).permute(0, 2, 3, 1).reshape(-1, z_channels)
            assert (flat[:, None] == codebook[None]).all(-1).any(1).all()  # decode's input: every vector a code


def test_image_size_not_divisible_by_f_is_refused(compose_cfg):
    cfg = compose_cfg(["f=8", "autoencoder.ch=16", "autoencoder.num_groups=8", "autoencoder.num_res_blocks=1"])
    model = Autoencoder(resolved_arch(cfg))
    with pytest.raises(ValueError, match="not divisible by the downsampling factor f=8"):
        model.encode(torch.zeros(1, 3, 36, 36))


# --------------------------------------------------------------------------------------------------- KL


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 5, 6, generator=g)
    logvar = torch.randn(3, 4, 5, 6, generator=g)
    ref = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum((1, 2, 3)).mean()
    assert torch.allclose(kl_to_standard_normal(mean, logvar), ref, rtol=1e-5)
    assert kl_to_standard_normal(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)) == 0


def test_kl_regularizer_mode_and_samples():
    torch.manual_seed(0)
    reg = DiagonalGaussianRegularizer(sample=True)
    mean = torch.tensor([1.5, -2.0]).view(1, 2, 1, 1).expand(4, 2, 64, 64)
    std = torch.tensor([0.5, 2.0]).view(1, 2, 1, 1).expand(4, 2, 64, 64)
    moments = torch.cat([mean, (std**2).log()], 1)
    assert torch.equal(reg.latent(moments, sample=False), mean)
    z = reg.latent(moments, sample=True)
    n = z[:, 0].numel()  # 16384 draws per channel
    for c in range(2):
        zc = z[:, c]
        assert abs(zc.mean().item() - mean[0, c, 0, 0].item()) < 5 * std[0, c, 0, 0].item() / math.sqrt(n)
        assert abs(zc.std().item() / std[0, c, 0, 0].item() - 1) < 0.05
    reg.train()
    z_train, log = reg(moments)
    assert not torch.equal(z_train, mean)  # training samples the posterior ...
    reg.eval()
    assert torch.equal(reg(moments)[0], mean)  # ... evaluation uses the mode
    assert torch.allclose(log["kl"], kl_divergence(Normal(mean, std), Normal(0.0, 1.0)).sum((1, 2, 3)).mean())
    assert torch.equal(DiagonalGaussianRegularizer(sample=False).train()(moments)[0], mean)


# --------------------------------------------------------------------------------------------------- VQ


def _vq(codes: list[list[float]], beta: float = 0.25, restart: bool = False, restart_every: int = 200):
    vq = VectorQuantizer(len(codes), len(codes[0]), beta=beta, restart=restart, restart_every=restart_every)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor(codes))
    return vq


def _z(vectors: list[list[float]]) -> torch.Tensor:
    """(1, C, 1, N) latent from N C-dim vectors."""
    return torch.tensor(vectors).t().reshape(1, len(vectors[0]), 1, len(vectors))


def test_vq_nearest_code_by_hand():
    # ‖z − e‖² picks e0 for (1, 1) (2 vs 8); dropping the ‖e‖² term would pick e1 (−2z·e: 0 vs −12)
    vq = _vq([[0.0, 0.0], [3.0, 3.0], [-1.0, 2.0]])
    idx = vq.nearest(torch.tensor([[1.0, 1.0], [2.0, 2.5], [-0.8, 1.5], [10.0, -10.0]]))
    # (2, 2.5): 10.25 / 1.25 / 9.25; (−0.8, 1.5): 2.89 / 16.69 / 0.29; (10, −10): 200 / 338 / 265
    assert idx.tolist() == [0, 1, 2, 0]


def test_vq_loss_value_and_gradients_by_hand():
    beta = 0.25
    vq = _vq([[0.0, 0.0], [1.0, 1.0]], beta=beta).train()
    z = _z([[0.2, -0.1], [0.9, 1.3]]).requires_grad_(True)
    z_st, log = vq(z)
    z_q = _z([[0.0, 0.0], [1.0, 1.0]])
    assert torch.equal(z_st.detach(), z_q)
    # squared errors 0.04 + 0.01 + 0.01 + 0.09 = 0.15 over N = 4 elements, (1 + β) of it
    assert log["vq_loss"].item() == pytest.approx((1 + beta) * 0.15 / 4, rel=1e-6)
    log["vq_loss"].backward()
    n = z.numel()
    assert torch.allclose(z.grad, 2 * beta * (z - z_q).detach() / n)  # commitment gradient, scaled by β
    # codebook gradient: 2(z_q − z)/N summed over the vectors assigned to each code
    expected = torch.tensor([[2 * (0 - 0.2), 2 * (0 + 0.1)], [2 * (1 - 0.9), 2 * (1 - 1.3)]]) / n
    assert torch.allclose(vq.embedding.weight.grad, expected, atol=1e-7)


def test_vq_loss_function_places_beta_on_commitment():
    z = torch.tensor([[1.0, 2.0]], requires_grad=True)
    z_q = torch.tensor([[0.0, 0.0]], requires_grad=True)
    vq_loss(z, z_q, beta=0.1).backward()
    assert torch.allclose(z.grad, 0.1 * 2 * torch.tensor([[1.0, 2.0]]) / 2)
    assert torch.allclose(z_q.grad, 2 * torch.tensor([[-1.0, -2.0]]) / 2)


def test_vq_straight_through_gradient():
    torch.manual_seed(0)
    vq = _vq([[0.0, 0.0], [1.0, 1.0], [-1.0, 0.5]])
    z = torch.randn(2, 2, 3, 3, requires_grad=True)
    w = torch.randn(2, 2, 3, 3)
    z_st, _ = vq(z)
    (z_st * w).sum().backward()
    assert torch.equal(z.grad, w)
    assert torch.equal(z_st.detach(), vq.quantize(z.detach())[0])


def test_vq_perplexity_and_usage_by_hand():
    vq = _vq([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0], [-5.0, 5.0]]).eval()
    _, log = vq(_z([[0.1, 0.0], [0.0, 0.1], [1.0, 0.9], [0.9, 1.0]]))  # codes 0, 0, 1, 1
    assert log["perplexity"].item() == pytest.approx(2.0, rel=1e-5)
    assert log["code_usage"].item() == 0.5
    _, log = vq(_z([[0.1, 0.0], [0.0, 0.1], [0.0, 0.0], [5.0, 5.1]]))  # codes 0, 0, 0, 2
    assert log["perplexity"].item() == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))),
                                                     rel=1e-5)
    assert log["code_usage"].item() == 0.5
    _, log = vq(_z([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0], [-5.0, 5.0]]))
    assert log["perplexity"].item() == pytest.approx(4.0, rel=1e-5) and log["code_usage"].item() == 1.0


def test_vq_dead_code_restart():
    torch.manual_seed(0)
    codes = [[0.0, 0.0], [1.0, 1.0], [100.0, 100.0], [-100.0, 100.0]]
    vq = _vq(codes, restart=True, restart_every=3).train()
    z = _z([[0.1, 0.0], [0.9, 1.1], [0.05, -0.05], [1.2, 0.8]])  # uses codes 0 and 1 only
    vq.eval()
    for _ in range(5):
        vq(z)  # evaluation neither counts steps nor restarts
    assert int(vq.steps) == 0 and vq.usage.sum() == 0
    vq.train()
    for _ in range(2):
        vq(z)
    assert torch.equal(vq.embedding.weight.data, torch.tensor(codes))  # not yet
    assert vq.usage.tolist() == [4.0, 4.0, 0.0, 0.0]
    vq(z)  # the third training step restarts
    w = vq.embedding.weight.data
    assert torch.equal(w[:2], torch.tensor(codes[:2]))  # used codes untouched
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    for k in (2, 3):
        assert torch.cdist(w[k : k + 1], flat).min() < 0.01  # re-seeded next to an encoder output
    assert vq.restarted == 2 and vq.usage.sum() == 0
    # after the restart the former dead codes can be chosen
    idx = vq.quantize(z)[1]
    assert set(idx.tolist()) & {2, 3}

    off = _vq(codes, restart=False, restart_every=1).train()
    for _ in range(3):
        off(z)
    assert torch.equal(off.embedding.weight.data, torch.tensor(codes))


# ------------------------------------------------------------------------------------- adaptive weight


class _TinyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU())
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, z):
        return self.conv_out(self.body(z))


def _decoder_losses(dec: nn.Module, disc: nn.Module, z: torch.Tensor, x: torch.Tensor):
    xrec = dec(z)
    nll = (x - xrec).abs().mean() + (x - xrec).pow(2).sum()
    g = -disc(xrec).mean()
    return nll, g


def test_adaptive_disc_weight_matches_separate_backward_passes():
    torch.manual_seed(0)
    dec, disc = _TinyDecoder(), nn.Conv2d(3, 1, 3)
    z, x = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8, 8)
    last = dec.conv_out.weight
    nll, g = _decoder_losses(dec, disc, z, x)
    lam = adaptive_disc_weight(nll, g, last, disc_weight=0.5)
    assert not lam.requires_grad and lam.grad_fn is None  # detached
    assert last.grad is None  # uses autograd.grad, accumulates nothing
    (nll + lam * g).backward()  # the graph survives for the generator's own backward

    grads = []
    for pick in (0, 1):  # fresh graphs, one .backward() each
        dec.zero_grad(set_to_none=True)
        _decoder_losses(dec, disc, z, x)[pick].backward()
        grads.append(last.grad.norm().item())
    expected = min(max(grads[0] / (grads[1] + 1e-4), 0.0), 1e4) * 0.5
    assert expected < 1e4 * 0.5  # this case is not clamped
    assert lam.item() == pytest.approx(expected, rel=1e-5)


def test_adaptive_disc_weight_clamps_at_1e4():
    torch.manual_seed(0)
    dec = _TinyDecoder()
    xrec = dec(torch.randn(2, 4, 8, 8))
    nll = 1e3 * xrec.pow(2).sum()  # huge gradient on the last layer
    g = 0.0 * xrec.sum()  # none: the ratio would be ‖∇nll‖ / 1e-4
    lam = adaptive_disc_weight(nll, g, dec.conv_out.weight, disc_weight=0.25)
    assert lam.item() == 1e4 * 0.25


# ------------------------------------------------------------------------------------- AutoencoderLoss


DISC = {"in_channels": 3, "ndf": 8, "n_layers": 2, "norm": "none"}
RANDOM_ALEX = {"weight": 0.0, "net": "alex", "weights": "random"}


def _loss(reduction="sum", disc_loss="hinge", perceptual=None, logvar_init=0.0, disc_start=5, reg_weight=1e-6,
          learn_logvar=False, pixel_loss="l1"):
    reg_key = "kl" if reduction == "sum" else "vq_loss"
    return AutoencoderLoss(reduction=reduction, reg_weight=reg_weight, reg_key=reg_key,
                           perceptual=perceptual or RANDOM_ALEX,
                           disc=dict(DISC), disc_start=disc_start, disc_weight=0.5, disc_loss=disc_loss,
                           logvar_init=logvar_init, learn_logvar=learn_logvar, pixel_loss=pixel_loss)


def _batch(seed=0):
    torch.manual_seed(seed)
    dec = _TinyDecoder()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    xrec = dec(torch.randn(2, 4, 32, 32))
    return dec, x, xrec


@pytest.mark.parametrize("pixel_loss", ["l1", "l2"])
def test_pixel_loss_is_the_per_pixel_term_of_the_nll(pixel_loss):
    """Hand-worked: one 1×1×3 image, errors (0.5, −0.25, 0.1), logvar 0.2, sum reduction, no perceptual term:
    nll = Σ|e|/e^0.2 + 3·0.2 (l1) or Σe²/e^0.2 + 3·0.2 (l2, SD's ft-MSE recipe)."""
    loss_fn = _loss(disc_start=None, logvar_init=0.2, reg_weight=0.0, pixel_loss=pixel_loss)
    x = torch.zeros(1, 3, 1, 1)
    xrec = torch.tensor([0.5, -0.25, 0.1]).view(1, 3, 1, 1)
    per_pixel = 0.85 if pixel_loss == "l1" else 0.25 + 0.0625 + 0.01
    _, logs = loss_fn.generator_loss(x, xrec, {"kl": torch.tensor(0.0)}, step=0, last_layer=torch.zeros(1))
    assert logs["nll"].item() == pytest.approx(per_pixel / math.exp(0.2) + 3 * 0.2, rel=1e-6)
    with pytest.raises(ValueError, match="pixel_loss"):
        _loss(pixel_loss="huber")


def test_disc_start_none_means_no_adversarial_term():
    loss_fn = _loss(disc_start=None).train()
    dec, x, xrec = _batch()
    _, logs = loss_fn.generator_loss(x, xrec, {"kl": torch.tensor(0.0)}, step=10**9, last_layer=dec.conv_out.weight)
    assert logs["disc_factor"] == 0.0 and "g" not in logs
    assert loss_fn.discriminator_loss(x, xrec, step=10**9) == (None, {})


def test_nothing_adversarial_before_disc_start():
    loss_fn = _loss(disc_start=5).train()
    dec, x, xrec = _batch()
    loss, logs = loss_fn.generator_loss(x, xrec, {"kl": torch.tensor(2.0)}, step=4, last_layer=dec.conv_out.weight)
    assert "g" not in logs and "disc_lambda" not in logs and logs["disc_factor"] == 0
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in loss_fn.discriminator.parameters())
    assert loss_fn.discriminator_loss(x, xrec, step=4) == (None, {})


def test_adversarial_terms_from_disc_start_on():
    loss_fn = _loss(disc_start=5).train()
    dec, x, xrec = _batch()
    loss, logs = loss_fn.generator_loss(x, xrec, {"kl": torch.tensor(2.0)}, step=5, last_layer=dec.conv_out.weight)
    assert {"g", "disc_lambda"} <= set(logs) and logs["disc_factor"] == 1
    with torch.no_grad():
        g = -loss_fn.discriminator(xrec).mean()
    assert logs["g"].item() == pytest.approx(g.item(), rel=1e-6)
    assert loss.item() == pytest.approx((logs["nll"] + 1e-6 * 2.0 + logs["disc_lambda"] * g).item(), rel=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.any() for p in loss_fn.discriminator.parameters())
    d, d_logs = loss_fn.discriminator_loss(x, xrec, step=7)
    assert d is not None and d.requires_grad and "d_loss" in d_logs
    # evaluation mode never asks the (training-only) adaptive weight
    loss_fn.eval()
    _, logs = loss_fn.generator_loss(x, xrec.detach(), {"kl": torch.tensor(2.0)}, step=5,
                                     last_layer=dec.conv_out.weight)
    assert logs["disc_lambda"] == 0


def test_hinge_and_vanilla_d_loss_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 0.5])
    # hinge: relu(1 − real) = (0, 0.5, 2), relu(1 + fake) = (0, 1, 1.5); ½ (2.5/3 + 2.5/3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(2.5 / 3, rel=1e-6)
    sp = [math.log1p(math.exp(v)) for v in (-2.0, -0.5, 1.0)]  # softplus(−real)
    sf = [math.log1p(math.exp(v)) for v in (-2.0, 0.0, 0.5)]  # softplus(fake)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(0.5 * (sum(sp) / 3 + sum(sf) / 3), rel=1e-6)
    bce = 0.5 * (F.binary_cross_entropy_with_logits(real, torch.ones(3))
                 + F.binary_cross_entropy_with_logits(fake, torch.zeros(3)))
    assert vanilla_d_loss(real, fake).item() == pytest.approx(bce.item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_discriminator_loss_uses_the_configured_loss(kind):
    loss_fn = _loss(disc_loss=kind, disc_start=0)
    dec, x, xrec = _batch()
    d, logs = loss_fn.discriminator_loss(x, xrec, step=0)
    with torch.no_grad():
        real, fake = loss_fn.discriminator(x), loss_fn.discriminator(xrec)
    if kind == "hinge":
        expected = 0.5 * (torch.clamp(1 - real, min=0).mean() + torch.clamp(1 + fake, min=0).mean())
    else:
        expected = 0.5 * (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                          + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    assert d.item() == pytest.approx(expected.item(), rel=1e-5)
    d.backward()
    assert all(p.grad is None for p in dec.parameters())  # inputs are detached: the D step never trains the decoder
    assert all(p.grad is not None for p in loss_fn.discriminator.parameters())


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_nll_formula_with_nonzero_logvar(reduction):
    lv = 0.7
    loss_fn = _loss(reduction=reduction, logvar_init=lv, disc_start=10**9, reg_weight=0.3, learn_logvar=True)
    _, x, xrec = _batch()
    xrec = xrec.detach()
    reg_log = {"kl": torch.tensor(2.0)} if reduction == "sum" else {"vq_loss": torch.tensor(2.0)}
    loss, logs = loss_fn.generator_loss(x, xrec, reg_log, step=0, last_layer=None)
    abs_sum = sum(abs(a - b) for a, b in zip(x.flatten().tolist(), xrec.flatten().tolist()))
    b, chw = x.shape[0], x[0].numel()
    if reduction == "sum":  # Σ_{C,H,W} (|d|/e^lv + lv), averaged over B
        expected = abs_sum / b / math.exp(lv) + lv * chw
    else:  # plain mean
        expected = abs_sum / (b * chw) / math.exp(lv) + lv
    assert logs["nll"].item() == pytest.approx(expected, rel=1e-5)
    assert loss.item() == pytest.approx(expected + 0.3 * 2.0, rel=1e-5)
    assert logs["logvar"].item() == pytest.approx(lv)
    loss.backward()  # d nll / d logvar = −(reduced rec)/e^lv + (1 or CHW)
    dlv = -(abs_sum / b) / math.exp(lv) + chw if reduction == "sum" else -(abs_sum / (b * chw)) / math.exp(lv) + 1
    assert loss_fn.logvar.grad.item() == pytest.approx(dlv, rel=1e-4)


def test_rec_includes_the_perceptual_term():
    loss_fn = _loss(perceptual={"weight": 0.5, "net": "alex", "weights": "random"}, disc_start=10**9)
    _, x, xrec = _batch()
    xrec = xrec.detach()
    _, logs = loss_fn.generator_loss(x, xrec, {"kl": torch.tensor(0.0)}, step=0, last_layer=None)
    with torch.no_grad():
        p = loss_fn.perceptual(x, xrec)
    assert p.shape == (2, 1, 1, 1) and p.min() > 0
    assert logs["lpips_randalex"].item() == pytest.approx(p.mean().item(), rel=1e-5)
    assert logs["rec"].item() == pytest.approx((x - xrec).abs().mean().item() + 0.5 * p.mean().item(), rel=1e-5)
    assert "lpips" not in logs


# ----------------------------------------------------------------------------------------- perceptual


@pytest.mark.parametrize("net", ["vgg", "alex", "squeeze"])
def test_random_backbone_is_never_named_lpips(net):
    with pytest.warns(UserWarning, match="RANDOM"):
        resolved = perceptual_mod.resolve_backbone_weights(net, "random")
    assert resolved == "random"
    assert perceptual_mod.perceptual_metric_name(net, resolved) == f"lpips_rand{net}"
    assert perceptual_mod.perceptual_metric_name(net, "imagenet") == "lpips"


def test_build_perceptual_random_alex():
    module, name = perceptual_mod.build_perceptual({"net": "alex", "weights": "random"})
    assert name == "lpips_randalex" and module.resolved == "random"
    assert not any(p.requires_grad for p in module.parameters())
    module.train()
    assert not module.training  # frozen in eval mode (its heads have dropout)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub cache and a download that always fails (no network is touched)."""
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(perceptual_mod, "_try_download", lambda net: False)
    return hub


def test_imagenet_weights_missing_offline_is_an_error(offline_hub):
    import torchvision.models as tv

    expected_file = offline_hub / "checkpoints" / os.path.basename(tv.AlexNet_Weights.IMAGENET1K_V1.url)
    with pytest.raises(FileNotFoundError) as err:
        perceptual_mod.resolve_backbone_weights("alex", "imagenet")
    assert str(expected_file) in str(err.value) and "TORCH_HOME" in str(err.value)
    assert perceptual_mod.resolve_backbone_weights("alex", "auto") == "random"  # auto degrades, named honestly


def test_imagenet_weights_present_are_used_without_download(offline_hub, monkeypatch):
    import torchvision.models as tv

    def no_download(net):
        raise AssertionError("must not download when the file is there")

    monkeypatch.setattr(perceptual_mod, "_try_download", no_download)
    (offline_hub / "checkpoints").mkdir()
    (offline_hub / "checkpoints" / os.path.basename(tv.VGG16_Weights.IMAGENET1K_V1.url)).write_bytes(b"")
    assert perceptual_mod.resolve_backbone_weights("vgg", "imagenet") == "imagenet"
    assert perceptual_mod.resolve_backbone_weights("vgg", "auto") == "imagenet"


def test_bad_perceptual_options():
    with pytest.raises(ValueError, match="unknown perceptual net"):
        perceptual_mod.resolve_backbone_weights("resnet", "random")
    with pytest.raises(ValueError, match="auto, imagenet or random"):
        perceptual_mod.resolve_backbone_weights("alex", "pretrained")


# ------------------------------------------------------------------------------------------ latent noise

def test_latent_noise_reaches_the_decoder_with_the_documented_spread(compose_cfg):
    """forward(x, s): the decoder input is z + τ·std(z)·ε with τ ~ U(0, s) per image; s = 0 leaves z untouched."""
    cfg = compose_cfg(["autoencoder.ch=16", "autoencoder.num_groups=8", "autoencoder.num_res_blocks=1",
                       "data.resolution=32"])
    torch.manual_seed(0)
    model = Autoencoder(resolved_arch(cfg)).eval()  # eval: the KL regularizer hands over its mode, no sampling
    x = torch.rand(256, 3, 32, 32) * 2 - 1
    seen = []
    model.post_quant_conv.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        z, _ = model.encode(x)
        model(x)
        model(x, latent_noise=0.4)
    clean, noisy = seen
    assert torch.equal(clean, z)
    tau = (noisy - z).flatten(1).std(1) / z.std()  # each image's noise std, in units of the batch's latent std
    assert float(tau.max()) < 0.4 * 1.1 and float(tau.min()) < 0.05  # within U(0, 0.4), reaching its lower end
    assert abs(float(tau.mean()) - 0.2) < 0.03  # the mean of U(0, 0.4)
    assert abs(float((tau < 0.2).float().mean()) - 0.5) < 0.1  # and its median


def test_latent_noise_trains_the_decoder_and_spares_validation(compose_cfg, monkeypatch, tmp_path):
    """autoencoder.latent_noise reaches the training steps of stage 1; validation and calibration decode clean z."""
    from ldm_train.__main__ import run
    from tests.conftest import smoke_overrides

    calls = []
    forward = Autoencoder.forward

    def recording(self, x, latent_noise=0.0):
        calls.append((self.training, latent_noise))
        return forward(self, x, latent_noise)

    monkeypatch.setattr(Autoencoder, "forward", recording)
    run(compose_cfg([*smoke_overrides(tmp_path), "autoencoder.max_steps=2", "autoencoder.val_every=2",
                 "autoencoder.latent_noise=0.3"]))
    assert {noise for training, noise in calls if training} == {0.3}
    assert {noise for training, noise in calls if not training} == {0.0}
    assert sum(training for training, _ in calls) == 2  # one per training batch


def test_latent_noise_is_dropped_with_a_warning_for_vq(compose_cfg, caplog):
    """A VQ decoder only sees codebook vectors: `regularizer=vq` over a preset that sets latent_noise (the documented
    `make ablation ABLATION_ARGS="regularizer=vq"`) trains without it and says so."""
    from ldm_train.lit.autoencoder import AutoencoderModule

    cfg = compose_cfg(["experiment=quickstart", "regularizer=vq"])
    ae = OmegaConf.to_container(cfg.autoencoder, resolve=True)
    with caplog.at_level("WARNING", logger="ldm_train.lit.autoencoder"):
        module = AutoencoderModule(resolved_arch(cfg), ae["loss"], 0.25, 1e-3, ae["optimizer"], ae["lr_scheduler"],
                                   latent_noise=ae["latent_noise"])
    assert module.latent_noise == 0.0
    assert "latent_noise=0.5 does not apply to a vq autoencoder" in caplog.text


def test_quickstart_trains_its_decoder_on_noised_latents(compose_cfg):
    """The quickstart's measured choice (docs/training.md): the key must keep reaching its stage 1."""
    assert compose_cfg(["experiment=quickstart"]).autoencoder.latent_noise == 0.5
    assert compose_cfg([]).autoencoder.latent_noise == 0.0  # the default: the paper's stage 1
