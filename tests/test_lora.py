"""LoRA through peft: only the adapters train (the optimizer and the EMA see them alone, the base stays bit-identical),
the merged U-Net equals the adapted one, the adapter file loads into diffusers' `load_lora_weights` and gives our
output, and `stage=diffusion diffusion.lora.rank=...` trains and writes both (experiment=smoke)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("peft")
pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).parent))
from sd_tiny import tiny_sd  # noqa: E402

from ldm_train.config import ConfigError  # noqa: E402
from ldm_train.models.lora import add_lora, has_lora, merged_copy, parameter_counts  # noqa: E402
from ldm_train.models.unet import UNet  # noqa: E402

ALL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.proj", "ff.out"]


def lora_cfg(rank: int = 4, alpha: float | None = 12.0, targets: list[str] | None = None) -> dict:
    return {"rank": rank, "alpha": alpha, "dropout": 0.0, "target_modules": targets or ALL_TARGETS[:4]}


def random_unet() -> UNet:
    """The tiny U-Net with its zero-initialised layers (conv_out, proj_out, …) given values: a zero output would
    make every comparison pass."""
    unet = UNet.from_preset("tiny")
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.2)
    return unet


def randomize_adapters(unet: torch.nn.Module, seed: int = 0) -> None:
    """B starts at zero (the adapted U-Net equals its base); give every adapter tensor values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def unet_inputs(channels: int = 4, context_dim: int = 64, size: int = 8):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, channels, size, size, generator=g), torch.tensor([5.0, 700.0]),
            torch.randn(2, 7, context_dim, generator=g))


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """(diffusers folder, our imported pipeline) of a tiny random SD 1.x (1×1-conv proj_in / proj_out)."""
    from hydra import compose, initialize_config_dir

    from ldm_train.__main__ import run
    from ldm_train.config import CONF_DIR
    from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline

    folder = tmp_path_factory.mktemp("sd1") / "pipe"
    tiny_sd(folder, version=1)
    root = tmp_path_factory.mktemp("artifacts")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["stage=import", f"source={folder}", "name=sd", f"paths.artifacts={root}",
                                           "logger=none", f"paths.run_dir={root / 'run'}"])
    run(cfg)
    return folder, root, LatentDiffusionPipeline.from_artifact(root / "diffusion" / "sd")


def test_adapter_scale_and_counts():
    """The adapted layer computes W·x + (alpha/rank)·B·A·x (recomputed by hand from the tensors); only A and B
    are trainable: rank·(in + out) per targeted Linear."""
    unet = add_lora(random_unet(), lora_cfg(rank=4, alpha=12.0))
    randomize_adapters(unet)
    layer = unet.get_submodule("mid_block.1.blocks.0.attn2.to_k")
    x = torch.randn(3, layer.base_layer.in_features)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ layer.base_layer.weight.T + (12.0 / 4) * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    trainable, _ = parameter_counts(unet)
    targets = [m for n, m in unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    assert trainable == sum(4 * (m.in_features + m.out_features) for m in targets) > 0


def test_bad_config_named():
    with pytest.raises(ConfigError, match="rank=0"):
        add_lora(UNet.from_preset("tiny"), lora_cfg(rank=0))
    with pytest.raises(ConfigError, match=r"\['to_qq'\] name no layer"):
        add_lora(UNet.from_preset("tiny"), lora_cfg(targets=["to_qq"]))


def test_merged_equals_unmerged():
    """merged_copy: a plain U-Net (the keys of an un-adapted one) whose output equals the adapted U-Net's; the
    adapted U-Net itself is left untouched."""
    unet = add_lora(random_unet(), lora_cfg(targets=ALL_TARGETS)).eval()
    randomize_adapters(unet)
    base = UNet.from_preset("tiny").eval()
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        adapted = unet(x, t, ctx)
        merged = merged_copy(unet)
        assert not has_lora(merged) and set(merged.state_dict()) == set(base.state_dict())
        assert float((merged(x, t, ctx) - adapted).abs().max()) <= 1e-5 * float(adapted.abs().max())
        assert has_lora(unet) and torch.equal(unet(x, t, ctx), adapted)
        # the adapters matter: without them (the base weights alone) the output differs
        plain = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if ".lora_" not in k}
        base.load_state_dict(plain)
        assert (base(x, t, ctx) - adapted).abs().max() > 1e-2


def test_only_adapters_train_and_ema_shares_base(sd1):
    """DiffusionModule with a LoRA'd U-Net: the optimizer holds exactly the adapter tensors; after steps the base is
    bit-identical and the adapters moved; the EMA copy holds the live base tensors (no second copy) and its own
    averaged adapters."""
    from hydra import compose, initialize_config_dir

    from ldm_train.config import CONF_DIR
    from ldm_train.lit.diffusion import DiffusionModule
    from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline

    _, root, _ = sd1
    pipe = LatentDiffusionPipeline.from_artifact(root / "diffusion" / "sd")
    unet = add_lora(pipe.denoiser.train(), lora_cfg())
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        d = OmegaConf.to_container(compose("config", overrides=["experiment=smoke"]).diffusion, resolve=True)
    module = DiffusionModule(pipe, {**d, "lr": 1e-2, "lr_scheduler": None}, channels_last=False)
    base_before = {n: p.detach().clone() for n, p in unet.named_parameters() if ".lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in unet.named_parameters() if ".lora_" in n}
    opt = module.configure_optimizers()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for n, p in unet.named_parameters()
                                                                      if ".lora_" in n}
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        z0, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
        loss = module.diffusion_loss(z0, ctx)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for n, p in unet.named_parameters() if ".lora_" not in n)
        opt.step()
        module.ema.update(module.trainable())
    after = dict(unet.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base_before.items())
    assert all(not torch.equal(after[n], v) for n, v in lora_before.items() if ".lora_B" in n)
    ema = dict(module.ema.module["unet"].named_parameters())
    assert all(ema[n] is after[n] for n in base_before)
    assert all(ema[n] is not after[n] and not torch.equal(ema[n], lora_before[n]) for n in lora_before
               if ".lora_B" in n)


def test_adapter_loads_into_diffusers(sd1, tmp_path):
    """The adapter file, loaded into the diffusers base pipeline with `load_lora_weights`, gives the U-Net output of
    our adapted U-Net (alpha ≠ rank, so the scale comes from the stored metadata; proj_in / proj_out as 1×1 convs
    on SD 1.x)."""
    from diffusers import StableDiffusionPipeline

    from ldm_train.interop.lora import save_diffusers_lora
    from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline

    folder, root, _ = sd1
    pipe = LatentDiffusionPipeline.from_artifact(root / "diffusion" / "sd")  # its own copy: adapted in place
    unet = add_lora(pipe.denoiser, lora_cfg(rank=3, alpha=5.0, targets=ALL_TARGETS)).eval()
    randomize_adapters(unet, seed=2)
    save_diffusers_lora(unet, merged_copy(unet), tmp_path / "lora", linear_projection=False)
    theirs = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    x, t, ctx = unet_inputs(context_dim=32)
    with torch.no_grad():
        base = theirs.unet(x, t, encoder_hidden_states=ctx).sample
        theirs.load_lora_weights(tmp_path / "lora")
        ref = theirs.unet(x, t, encoder_hidden_states=ctx).sample
        ours = unet(x, t, ctx)
    assert (ref - base).abs().max() > 1e-2  # the adapter was applied
    assert float((ours - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_stage_diffusion_with_lora(sd1, tmp_path):
    """experiment=smoke stage=diffusion from the imported model with diffusion.lora.rank=4: 2 steps; the artifact's
    U-Net differs from the base only in the targeted layers and equals diffusers' base + the written adapter; the
    checkpoint (the base stored once) resumes."""
    from diffusers import StableDiffusionPipeline
    from hydra import compose, initialize_config_dir

    from ldm_train.__main__ import run
    from ldm_train.config import CONF_DIR
    from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline

    folder, root, base = sd1
    overrides = ["experiment=smoke", "stage=diffusion", "diffusion.init_from=sd", "name=lora", "data.resolution=64",
                 "diffusion.max_steps=2", "diffusion.lr=1e-2", "diffusion.warmup_steps=0", "diffusion.batch_size=2",
                 "diffusion.val_every=2", "diffusion.latent_std_range=[0.0,100.0]", "diffusion.ema_decay=0.5",
                 "diffusion.lora.rank=4", f"paths.artifacts={root}", f"paths.run_dir={tmp_path / 'run'}"]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    # lr=0 in the resumed run: a restart would keep B = 0 (its artifact equal to the base); resumed adapters are not
    resume = [*overrides, "diffusion.max_steps=3", "diffusion.lr=0", "name=lora3",
              f"paths.run_dir={tmp_path / 'run3'}", f"ckpt_path={ckpt}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        run(compose("config", overrides=overrides))
        # the checkpoint holds the frozen base once: the EMA's copy is the same storage
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        key = next(k for k in state if k.startswith("unet.") and ".base_layer." in k)
        assert state[key].untyped_storage().data_ptr() == state[f"ema.module.{key}"].untyped_storage().data_ptr()
        assert run(compose("config", overrides=resume))["steps"] == 3
    resumed = LatentDiffusionPipeline.from_artifact(root / "diffusion" / "lora3").denoiser.state_dict()
    assert any(not torch.equal(resumed[k], v) for k, v in base.denoiser.state_dict().items())
    art = root / "diffusion" / "lora"
    tuned = LatentDiffusionPipeline.from_artifact(art)
    a, b = tuned.denoiser.state_dict(), base.denoiser.state_dict()
    changed = {k for k in b if not torch.equal(a[k], b[k])}
    assert changed and all(k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"))
                           for k in changed)
    theirs = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    theirs.load_lora_weights(art / "lora")
    x, t, ctx = unet_inputs(context_dim=32)
    with torch.no_grad():
        ref = theirs.unet(x, t, encoder_hidden_states=ctx).sample
        ours = tuned.denoiser(x, t, ctx)
    assert float((ours - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
