"""SDXL-style size conditioning: the Fourier features, the U-Net input, the folder items, dropout and sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_train.config import ConfigError, validate
from ldm_train.data.buckets import make_buckets
from ldm_train.data.folder import ImageFolderDataset
from ldm_train.models.unet import UNET_PRESETS, UNet, size_features


def test_size_features_match_diffusers_sinusoids():
    emb = pytest.importorskip("diffusers.models.embeddings")
    sc = torch.tensor([[512.0, 768.0, 0.0, 32.0, 512.0, 512.0], [40.0, 100.0, 0.0, 6.0, 24.0, 48.0]])
    ref = emb.get_timestep_embedding(sc.flatten(), 32, flip_sin_to_cos=False, downscale_freq_shift=0)
    torch.testing.assert_close(size_features(sc, 32), ref.view(2, -1))


def tiny_unet(**kw) -> UNet:
    torch.manual_seed(0)
    return UNet(**{**UNET_PRESETS["tiny"], **kw})


def test_unet_size_conditioning_changes_the_output_and_is_required():
    net = tiny_unet(size_conditioning=True)
    with torch.no_grad():  # zero-initialised output layers: nothing would reach the output at init
        for p in net.parameters():
            if not p.any():
                p.normal_(std=0.1)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 64)
    a = net(x, t, ctx, size_cond=torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2))
    b = net(x, t, ctx, size_cond=torch.tensor([[16.0, 64, 0, 8, 32, 32]] * 2))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="size_cond"):
        net(x, t, ctx)
    plain = tiny_unet()
    assert plain.size_embed is None and sum(p.numel() for p in plain.parameters()) < sum(
        p.numel() for p in net.parameters())


def test_folder_item_carries_original_size_crop_and_target(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(np.zeros((40, 100, 3), np.uint8)).save(root / "a.png")  # h=40, w=100
    item = ImageFolderDataset(root, 32, buckets=make_buckets(32, 8))[0]
    # bucket 24x48: scale 0.6 → 24x60, center crop from left (60−48)/2 = 6
    assert item["size_cond"].tolist() == [40, 100, 0, 6, 24, 48]
    square = ImageFolderDataset(root, 32)[0]  # scale 0.8 → 32x80, crop left 24
    assert square["size_cond"].tolist() == [40, 100, 0, 24, 32, 32]


def test_size_conditioning_needs_folder_data(compose_cfg):
    with pytest.raises(ConfigError, match="size_conditioning"):
        validate(compose_cfg(["experiment=smoke", "stage=diffusion", "diffusion.size_conditioning=true"]))


def test_training_drops_size_with_the_caption_and_sampling_defaults(smoke_autoencoder, compose_cfg):
    from omegaconf import OmegaConf

    from ldm_train.diffusion.parameterization import build_parameterization
    from ldm_train.lit.diffusion import DiffusionModule
    from ldm_train.models.text import build_text_encoder
    from ldm_train.pipeline.first_stage import FirstStage
    from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline, build_denoiser

    cfg = compose_cfg(["experiment=smoke", "diffusion.size_conditioning=true"])
    d = OmegaConf.to_container(cfg.diffusion, resolve=True)
    first = FirstStage.from_artifact(smoke_autoencoder["artifact"], sample_posterior=False)
    enc = build_text_encoder(OmegaConf.to_container(cfg.text_encoder, resolve=True))
    unet = build_denoiser(OmegaConf.to_container(cfg.unet, resolve=True), first.latent_channels, enc.dim, True)
    seen = []
    forward = unet.forward

    def record(x, t, context=None, size_cond=None):
        seen.append(size_cond.clone())
        return forward(x, t, context, size_cond=size_cond)

    unet.forward = record
    pipe = LatentDiffusionPipeline(first, unet, enc, build_parameterization(d),
                                   {"diffusion": d, "resolution": 16,
                                    "sampling": OmegaConf.to_container(cfg.sampling, resolve=True)})
    module = DiffusionModule(pipe, d)
    sc = torch.tensor([[40.0, 100, 0, 6, 16, 16], [16.0, 16, 0, 0, 16, 16]])
    module.force_drop = torch.tensor([True, False])
    batch = {"image": torch.zeros(2, 3, 16, 16), "caption": ["a", "b"], "size_cond": sc}
    module.diffusion_loss(module.batch_latents(first, batch), module.condition(batch, module.force_drop),
                          size_cond=module.size_condition(batch, module.force_drop))
    assert seen[-1].tolist() == [[0.0] * 6, sc[1].tolist()]  # the dropped row loses its sizes too
    seen.clear()
    pipe.generate(["a red circle"], steps=1, guidance_scale=3.0, height=16, width=24, crop_top_left=(2, 0))
    assert seen[0].tolist() == [[0.0] * 6, [16.0, 24, 2, 0, 16, 24]]  # [uncond, cond]; original = target
