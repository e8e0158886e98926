"""Stage 2 (latent diffusion) and sampling: CFG dropout, LR schedule, the frozen first stage, artifact errors,
end-to-end `stage=diffusion` / `stage=sample` on `experiment=smoke`, `generate` and caption-alignment scoring.

Expected values are hand-worked or recomputed with the raw autoencoder / text encoder, never read back from
the function under test.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import ldm_train.stages.diffusion as diffusion_stage
from ldm_train.__main__ import run
from ldm_train.config import CONF_DIR, ConfigError
from ldm_train.data.shapes import ShapesDataset, parse_caption, render
from ldm_train.diffusion.parameterization import build_parameterization
from ldm_train.evaluation.alignment import alignment_scores, eval_captions
from ldm_train.lit.diffusion import DiffusionModule, cfg_drop_mask
from ldm_train.lit.optim import warmup_cosine
from ldm_train.models.text import build_text_encoder
from ldm_train.pipeline.artifacts import ArtifactError, content_hash, read_diffusion
from ldm_train.pipeline.first_stage import FirstStage, LatentStdError
from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline, build_denoiser

PROMPTS = ["a red circle on the left", "a blue square at the top"]


# ---------------------------------------------------------------------------------------------- helpers


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def overrides(ae: dict, artifacts: Path, *extra: str) -> list[str]:
    """The fixture's overrides with this test's own artifacts root and run dir."""
    base = [o for o in ae["cfg_overrides"] if not o.lstrip("+").startswith("paths.")]
    if not any(o.startswith("experiment=") for o in base):
        base.insert(0, "experiment=smoke")
    return [*base, f"paths.artifacts={artifacts}", f"paths.run_dir={artifacts}/run", *extra]


def copy_autoencoder(ae: dict, dest: Path) -> Path:
    shutil.copytree(ae["artifact"], dest)
    return dest


def shapes_batch(n: int, resolution: int = 16, split: str = "val") -> dict:
    ds = ShapesDataset(resolution=resolution, size=n, split=split, seed=0)
    items = [ds[i] for i in range(n)]
    return {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items],
            "label": torch.tensor([it["label"] for it in items])}


def smoke_diffusion_cfg() -> dict:
    return OmegaConf.to_container(compose_cfg(["experiment=smoke"]).diffusion, resolve=True)


def smoke_text_encoder() -> nn.Module:
    return build_text_encoder(OmegaConf.to_container(compose_cfg(["experiment=smoke"]).text_encoder, resolve=True))


def smoke_pipeline(first_stage: FirstStage, denoiser: nn.Module, enc: nn.Module, **sampling) -> LatentDiffusionPipeline:
    """A pipeline around any denoiser (e.g. a recording stub) with the smoke config's schedule and sampling."""
    cfg = compose_cfg(["experiment=smoke"])
    d = OmegaConf.to_container(cfg.diffusion, resolve=True)
    config = {"diffusion": d, "resolution": 16,
              "sampling": {**OmegaConf.to_container(cfg.sampling, resolve=True), **sampling}}
    return LatentDiffusionPipeline(first_stage, denoiser, enc, build_parameterization(d), config)


def smoke_module(first_stage: FirstStage, enc: nn.Module) -> DiffusionModule:
    """A DiffusionModule around a fresh smoke U-Net."""
    unet = build_denoiser(OmegaConf.to_container(compose_cfg(["experiment=smoke"]).unet, resolve=True),
                          first_stage.latent_channels, enc.dim)
    return DiffusionModule(smoke_pipeline(first_stage, unet, enc), smoke_diffusion_cfg())


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def first_stage(smoke_autoencoder) -> FirstStage:
    return FirstStage.from_artifact(smoke_autoencoder["artifact"], sample_posterior=False)


@pytest.fixture(scope="module")
def trained(smoke_autoencoder, tmp_path_factory) -> dict:
    """Stage 2 trained once on a copy of the smoke autoencoder (via autoencoder.path=)."""
    root = tmp_path_factory.mktemp("stage2")
    ae_copy = copy_autoencoder(smoke_autoencoder, root / "ae_copy")
    artifacts = root / "artifacts"
    cfg = compose_cfg(overrides(smoke_autoencoder, artifacts, "stage=diffusion",
                                f"autoencoder.path={ae_copy}"))
    modules = []

    class Recording(DiffusionModule):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            modules.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(diffusion_stage, "DiffusionModule", Recording)
        metrics = run(cfg)
    assert len(modules) == 1
    return {"root": root, "artifacts": artifacts, "ae_copy": ae_copy, "metrics": metrics, "module": modules[0],
            "artifact": artifacts / "diffusion" / "kl_f4", "cfg": cfg}


@pytest.fixture(scope="module")
def pipeline(trained) -> LatentDiffusionPipeline:
    return LatentDiffusionPipeline.from_artifact(trained["artifact"])


# ---------------------------------------------------------------------------------------------- CFG dropout


def test_cfg_drop_mask_rate():
    torch.manual_seed(0)
    mask = cfg_drop_mask(20000, 0.1)
    assert mask.dtype == torch.bool and mask.shape == (20000,)
    assert abs(mask.float().mean().item() - 0.1) <= 0.01
    assert not cfg_drop_mask(5000, 0.0).any()
    assert cfg_drop_mask(5000, 1.0).all()


def test_cfg_drop_mask_force():
    force = torch.tensor([True, False, False, True, True])
    for p in (0.0, 0.5, 1.0):
        out = cfg_drop_mask(5, p, force=force)
        assert out.dtype == torch.bool
        assert out.tolist() == force.tolist()
    # an integer mask is read as booleans
    assert cfg_drop_mask(3, 1.0, force=torch.tensor([0, 1, 0])).tolist() == [False, True, False]


def test_text_encoder_forced_drop_rows_are_null():
    torch.manual_seed(0)
    enc = smoke_text_encoder()
    captions = ["a red circle on the left", "a blue square at the top", "a green triangle on the right",
                "a cyan circle in the center"]
    drop = torch.tensor([True, False, True, False])
    ctx = enc(captions, drop=drop)
    null_row = enc.encode([""])[0]  # (L, D): the encoding of the empty caption, computed separately
    plain = enc.encode(captions)
    assert ctx.shape == plain.shape
    for i, d in enumerate(drop.tolist()):
        if d:
            assert torch.equal(ctx[i], null_row)
            assert torch.equal(ctx[i], enc.null(4)[i])
        else:
            assert torch.equal(ctx[i], plain[i])
            assert not torch.allclose(ctx[i], null_row)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_diffusion_module_force_drop_conditions_on_null(first_stage):
    torch.manual_seed(0)
    enc = smoke_text_encoder()
    module = smoke_module(first_stage, enc)
    batch = shapes_batch(4)
    null = enc.null(4)
    seen = []

    def fake_loss(z0, context, size_cond=None):
        seen.append((z0, context))
        return context.sum() * 0

    module.diffusion_loss = fake_loss  # capture what training_step conditions on
    module.force_drop = torch.ones(4, dtype=torch.bool)
    module.training_step(batch, 0)
    assert torch.equal(seen[-1][1], null)
    # the latents are the first stage's encoding of the batch
    assert torch.allclose(seen[-1][0], first_stage.encode(batch["image"]), atol=1e-6)

    module.force_drop = torch.tensor([False, True, False, True])
    module.training_step(batch, 0)
    ctx = seen[-1][1]
    assert torch.equal(ctx[1], null[1]) and torch.equal(ctx[3], null[3])
    assert not torch.allclose(ctx[0], null[0]) and not torch.allclose(ctx[2], null[2])

    # condition(...) with the forced mask equals null directly too
    forced = cfg_drop_mask(4, 0.0, force=torch.ones(4, dtype=torch.bool))
    assert torch.equal(module.condition(batch, forced), null)

    # the first stage stays frozen when the LightningModule is put in training mode
    module.train()
    assert not any(m.training for m in module.first_stage.modules())


# ---------------------------------------------------------------------------------------------- LR schedule


def test_warmup_cosine_hand_values():
    w, total = 10, 110
    assert warmup_cosine(0, w, total) == pytest.approx(0.1)
    assert warmup_cosine(4, w, total) == pytest.approx(0.5)
    assert warmup_cosine(9, w, total) == pytest.approx(1.0)  # end of warm-up
    assert warmup_cosine(10, w, total) == pytest.approx(1.0)  # start of the decay
    assert warmup_cosine(35, w, total) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert warmup_cosine(60, w, total) == pytest.approx(0.5)  # mid-decay
    assert warmup_cosine(110, w, total) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(500, w, total) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------- first stage


def test_first_stage_encode_decode_match_raw_autoencoder(first_stage):
    ae = first_stage.autoencoder
    s = json.loads((first_stage.path / "calibration.json").read_text())["scale_factor"]
    assert first_stage.scale_factor == s
    x = shapes_batch(3)["image"]
    with torch.no_grad():
        raw = ae.latent(x, sample=False)
        z = first_stage.encode(x, sample=False)
        assert torch.allclose(z, raw * s, rtol=1e-6, atol=1e-7)
        expected = ae.decode_latent(z / s).clamp(-1, 1)
        out = first_stage.decode(z)
    assert torch.allclose(out, expected, atol=1e-6)
    assert out.min() >= -1 and out.max() <= 1
    assert z.shape == (3, *first_stage.latent_shape(16))


def test_first_stage_frozen(first_stage):
    first_stage.train()
    assert not first_stage.training
    assert not any(m.training for m in first_stage.modules())
    assert not any(p.requires_grad for p in first_stage.parameters())
    first_stage.train(True)
    assert not any(m.training for m in first_stage.modules())


def test_health_check_refuses_tampered_scale_factor(smoke_autoencoder, first_stage):
    x = shapes_batch(16, split="train")["image"]
    stats = first_stage.health_check(x, (0.7, 1.3))  # passes with the calibrated scale
    with torch.no_grad():
        raw = first_stage.autoencoder.latent(x, sample=False)
    assert stats["scaled_std"] == pytest.approx(float((raw * first_stage.scale_factor).std()), rel=1e-5)

    cal = dict(first_stage.calibration, scale_factor=first_stage.calibration["scale_factor"] * 3)
    bad = FirstStage(first_stage.autoencoder, cal, sample_posterior=False, path=first_stage.path)
    with pytest.raises(LatentStdError) as info:
        bad.health_check(x, (0.7, 1.3))
    msg = str(info.value)
    scaled_std = float((raw * cal["scale_factor"]).std())
    assert scaled_std > 1.3
    assert f"{scaled_std:.3f}" in msg
    assert f"{cal['scale_factor']:.5f}" in msg
    assert f"{float(raw.std()):.4f}" in msg
    assert "stage=calibrate" in msg


# ---------------------------------------------------------------------------------------------- errors


def test_missing_autoencoder_names_stage1(smoke_autoencoder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = compose_cfg(overrides(smoke_autoencoder, empty, "stage=diffusion"))
    with pytest.raises(ArtifactError, match="stage=autoencoder") as info:
        run(cfg)
    assert str(empty / "autoencoder" / "kl_f4") in str(info.value)


def test_uncalibrated_autoencoder_names_calibrate(smoke_autoencoder, tmp_path):
    artifacts = tmp_path / "artifacts"
    target = copy_autoencoder(smoke_autoencoder, artifacts / "autoencoder" / "kl_f4")
    (target / "calibration.json").unlink()
    with pytest.raises(ArtifactError, match="stage=calibrate"):
        run(compose_cfg(overrides(smoke_autoencoder, artifacts, "stage=diffusion")))
    # the command the message names fixes it
    run(compose_cfg(overrides(smoke_autoencoder, artifacts, "stage=calibrate")))
    assert FirstStage.from_artifact(target).scale_factor > 0


def test_context_dim_mismatch_is_config_error(smoke_autoencoder, tmp_path):
    cfg = compose_cfg(overrides(smoke_autoencoder, tmp_path, "stage=diffusion", "unet.context_dim=99",
                                f"autoencoder.path={smoke_autoencoder['artifact']}"))
    with pytest.raises(ConfigError) as info:
        run(cfg)
    msg = str(info.value)
    assert "unet.context_dim=99" in msg and "32" in msg and "text_encoder.dim" in msg
    assert not (tmp_path / "diffusion").exists()  # refused before training


@pytest.mark.parametrize("tamper", ["config_byte", "weights"])
def test_modified_autoencoder_invalidates_diffusion_artifact(trained, tmp_path, tamper):
    # A private copy of the trained pair: the diffusion artifact refers to its own copy of the autoencoder.
    ae = shutil.copytree(trained["ae_copy"], tmp_path / "ae")
    art = shutil.copytree(trained["artifact"], tmp_path / "diffusion")
    ref = json.loads((art / "autoencoder.json").read_text())
    (art / "autoencoder.json").write_text(json.dumps(dict(ref, path=str(ae.resolve()))))
    config, path = read_diffusion(art)  # intact: accepted
    assert path == ae.resolve() and config["resolution"] == 16

    if tamper == "config_byte":
        raw = bytearray((ae / "config.yaml").read_bytes())
        raw[-1:] = b" \n" if raw[-1:] == b"\n" else b"\n"
        (ae / "config.yaml").write_bytes(bytes(raw))
    else:
        weights = load_file(str(ae / "model.safetensors"))
        name = sorted(weights)[0]
        weights[name] = weights[name] + 1e-3
        save_file(weights, str(ae / "model.safetensors"))
    with pytest.raises(ArtifactError, match="hash") as info:
        read_diffusion(art)
    assert str(ae.resolve()) in str(info.value)


# ---------------------------------------------------------------------------------------------- end to end


def test_diffusion_stage_writes_artifact(trained, smoke_autoencoder):
    art = trained["artifact"]
    for name in ("model.safetensors", "config.yaml", "autoencoder.json", "metrics.json"):
        assert (art / name).is_file(), name
    ref = json.loads((art / "autoencoder.json").read_text())
    assert ref["content_hash"] == content_hash(smoke_autoencoder["artifact"])
    assert Path(ref["path"]) == trained["ae_copy"].resolve()
    metrics = json.loads((art / "metrics.json").read_text())
    assert metrics["steps"] == trained["cfg"].diffusion.max_steps == trained["metrics"]["steps"]
    assert math.isfinite(metrics["val/loss"])
    config = OmegaConf.to_container(OmegaConf.load(art / "config.yaml"))
    assert config["resolution"] == 16 and config["f"] == 4 and config["regularizer"] == "kl"
    assert config["unet"]["context_dim"] == config["text_encoder"]["dim"] == 32


def test_saved_weights_are_the_ema(trained):
    module = trained["module"]
    saved = load_file(str(trained["artifact"] / "model.safetensors"))
    ema = module.ema.module["unet"].state_dict()
    raw = module.unet.state_dict()
    assert saved.keys() == ema.keys()
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert all(torch.equal(saved[k], ema[k]) for k in saved)
    assert any(not torch.equal(saved[k], raw[k]) for k in saved if saved[k].is_floating_point())
    assert int(module.ema.num_updates) == trained["metrics"]["steps"]
    # a fresh U-Net's output conv is zero-initialised: the saved one has been trained
    assert saved["conv_out.weight"].abs().sum() > 0
    # the jointly trained scratch text encoder is saved from the EMA too
    te = load_file(str(trained["artifact"] / "text_encoder.safetensors"))
    te_ema = module.ema.module["text_encoder"].state_dict()
    assert te.keys() == te_ema.keys() and all(torch.equal(te[k], te_ema[k]) for k in te)


def test_sample_stage_writes_pngs(trained, smoke_autoencoder, pipeline, tmp_path):
    out = tmp_path / "out"
    prompt = "prompt=[" + ",".join(PROMPTS) + "]"
    cfg = compose_cfg(overrides(smoke_autoencoder, trained["artifacts"], "stage=sample", prompt,
                                "n_per_prompt=2", f"out_dir={out}"))
    result = run(cfg)
    files = sorted(p.name for p in out.iterdir())
    assert "grid.png" in files and len(files) == 5 and result["num_images"] == 4
    singles = sorted(p for p in out.iterdir() if p.name != "grid.png")
    for p in singles:
        with Image.open(p) as img:
            assert img.format == "PNG" and img.size == (16, 16) and img.mode == "RGB"
    with Image.open(out / "grid.png") as grid:
        assert grid.format == "PNG" and grid.size[0] > 32 and grid.size[1] > 32

    # the single PNGs are the samples of prompt i // 2, in order
    expanded = [p for p in PROMPTS for _ in range(2)]
    images = pipeline.generate(expanded, **cfg.sampling)
    expected = ((images.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    assert [p.name for p in singles] == ["00_a_red_circle_on_the_left_0.png", "00_a_red_circle_on_the_left_1.png",
                                         "01_a_blue_square_at_the_top_0.png", "01_a_blue_square_at_the_top_1.png"]
    for i, p in enumerate(singles):
        arr = np.asarray(Image.open(p), dtype=np.float64)
        assert np.abs(arr - expected[i]).max() <= 1.0


def test_samples_record_how_they_were_made(trained, smoke_autoencoder, pipeline, tmp_path):
    """Each PNG's text chunks (and metrics.json) hold what it takes to make it again: regenerating from them alone
    gives the same pixels."""
    out = tmp_path / "out"
    cfg = compose_cfg(overrides(smoke_autoencoder, trained["artifacts"], "stage=sample", f"prompt=[{PROMPTS[1]}]",
                                "n_per_prompt=2", f"out_dir={out}", "negative_prompt=a red circle",
                                "sampling.seed=7", "sampling.steps=3", "sampling.guidance_scale=2.5"))
    run(cfg)
    with Image.open(out / "00_a_blue_square_at_the_top_1.png") as img:
        text, pixels = dict(img.text), np.asarray(img, dtype=np.float64)
    assert {k: text[k] for k in ("prompt", "negative_prompt", "seed", "sampler", "steps", "guidance_scale",
                                 "height", "width", "batch_index")} == {
        "prompt": PROMPTS[1], "negative_prompt": "a red circle", "seed": "7", "sampler": "ddim", "steps": "3",
        "guidance_scale": "2.5", "height": "16", "width": "16", "batch_index": "1"}
    recorded = json.loads((Path(cfg.paths.run_dir) / "metrics.json").read_text())
    assert recorded["sampling"]["seed"] == 7 and recorded["sampling"]["sampler"] == "ddim"
    assert recorded["images"][1] == {"file": "00_a_blue_square_at_the_top_1.png", "prompt": PROMPTS[1],
                                     "batch_index": 1}
    with Image.open(out / "grid.png") as grid:
        assert json.loads(grid.text["prompts"]) == [PROMPTS[1]] and grid.text["steps"] == "3"
    n, i = int(text["batch_size"]), int(text["batch_index"])
    again = pipeline.generate([text["prompt"]] * n, sampler=text["sampler"], steps=int(text["steps"]),
                              guidance_scale=float(text["guidance_scale"]), eta=float(text["eta"]),
                              seed=int(text["seed"]), negative_prompt=text["negative_prompt"])[i]
    assert np.abs(pixels - ((again.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()).max() <= 1.0


# ---------------------------------------------------------------------------------------------- generate


def test_img2img_strength_zero_is_reconstruction(pipeline):
    fs = pipeline.first_stage
    x = shapes_batch(2)["image"]
    out = pipeline.generate(PROMPTS, steps=4, init_image=x, strength=0.0)
    ae = fs.autoencoder
    with torch.no_grad():
        raw = ae.decode_latent(ae.latent(x, sample=False)).clamp(-1, 1)
    assert torch.equal(out, fs.decode(fs.encode(x, sample=False)))
    assert torch.allclose(out, raw, atol=1e-5)


def test_img2img_strength_one_ignores_init(pipeline):
    x = shapes_batch(4)["image"]
    a, b = x[:2], x[2:]
    assert not torch.equal(a, b)
    kw = dict(steps=4, seed=3)
    out_a = pipeline.generate(PROMPTS, init_image=a, strength=1.0, **kw)
    out_b = pipeline.generate(PROMPTS, init_image=b, strength=1.0, **kw)
    plain = pipeline.generate(PROMPTS, **kw)
    assert torch.equal(out_a, out_b) and torch.equal(out_a, plain)
    # at an intermediate strength the init image does matter (the two inits are distinguishable)
    half_a = pipeline.generate(PROMPTS, init_image=a, strength=0.5, **kw)
    half_b = pipeline.generate(PROMPTS, init_image=b, strength=0.5, **kw)
    assert not torch.allclose(half_a, half_b)


def test_generate_seeded(pipeline):
    a = pipeline.generate(PROMPTS, steps=4, seed=1)
    b = pipeline.generate(PROMPTS, steps=4, seed=1)
    c = pipeline.generate(PROMPTS, steps=4, seed=2)
    assert a.shape == (2, 3, 16, 16)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


class RecordingUNet(nn.Module):
    """Output depends on the context; records every call."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.05))
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, context=None):
        self.calls.append((x.clone(), t.clone(), context.clone()))
        return self.w * context.mean(dim=(1, 2)).view(-1, 1, 1, 1).expand_as(x)


@pytest.mark.parametrize("negative", ["", "a green triangle on the right"])
def test_generate_cfg_is_one_batched_call_per_step(first_stage, negative):
    torch.manual_seed(0)
    enc = smoke_text_encoder().eval()
    stub = RecordingUNet()
    steps, n = 3, len(PROMPTS)
    pipe = smoke_pipeline(first_stage, stub, enc)
    pipe.generate(PROMPTS, guidance_scale=3.0, steps=steps, negative_prompt=negative)
    assert len(stub.calls) == steps
    with torch.no_grad():
        cond = enc.encode(PROMPTS)
        uncond = enc.encode([negative] * n)  # "" encodes to the null conditioning of this encoder
    assert not torch.allclose(cond, uncond)
    for x, t, ctx in stub.calls:
        assert x.shape == (2 * n, *first_stage.latent_shape(16)) and ctx.shape[0] == 2 * n
        assert torch.equal(x[:n], x[n:]) and torch.equal(t[:n], t[n:])
        assert torch.allclose(ctx[:n], uncond, atol=1e-6)  # null / negative context first
        assert torch.allclose(ctx[n:], cond, atol=1e-6)
    if not negative:
        assert torch.allclose(stub.calls[0][2][:n], enc.null(n), atol=1e-6)

    # guidance 1 skips the unconditional half: one call per step on the N conditional samples
    stub.calls.clear()
    pipe.generate(PROMPTS, guidance_scale=1.0, steps=steps)
    assert len(stub.calls) == steps
    assert all(ctx.shape[0] == n and torch.allclose(ctx, cond, atol=1e-6) for _, _, ctx in stub.calls)


def test_validation_leaves_global_generators_alone(first_stage, monkeypatch):
    """Validation draws t and ε from its own generator: no global RNG state changes, no global seeding call
    (torch.manual_seed would reseed every CUDA generator too)."""
    module = smoke_module(first_stage, smoke_text_encoder())
    module.log = lambda *args, **kwargs: None
    batch = shapes_batch(4)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for name in ("manual_seed", "seed"):
        monkeypatch.setattr(torch, name, lambda *a, **k: pytest.fail("validation seeded a global generator"))
    monkeypatch.setattr(torch.random, "fork_rng", lambda *a, **k: pytest.fail("validation forked the global RNG"))
    with torch.no_grad():
        module.validation_step(batch, 0)
        first = module.diffusion_loss  # same batch index → same t and noise → same loss
        losses = [float(first(module.batch_latents(first_stage, batch, sample=False), module.condition(batch, None),
                              generator=torch.Generator().manual_seed(0))) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), before)
    assert losses[0] == losses[1]


def test_class_model_refuses_a_negative_prompt(first_stage):
    """A class-label model has no captions: a negative prompt would silently condition the unconditional branch
    on the labels (guidance off); it is refused, and an empty one uses the learned null label."""
    from ldm_train.data.shapes import captions_to_labels
    from ldm_train.models.text import ClassEncoder

    enc = ClassEncoder(num_classes=ShapesDataset.num_classes, dim=8).eval()
    stub = RecordingUNet()
    pipe = smoke_pipeline(first_stage, stub, enc)
    labels = captions_to_labels(PROMPTS)
    with pytest.raises(ConfigError, match="negative_prompt"):
        pipe.generate(PROMPTS, steps=2, labels=labels, negative_prompt="a blue square at the top")
    pipe.generate(PROMPTS, steps=2, labels=labels)
    ctx = stub.calls[0][2]  # (2N, 1, dim): uncond first
    n = len(PROMPTS)
    assert torch.equal(ctx[:n], enc.null(n)) and torch.equal(ctx[n:], enc(labels=labels))


# ---------------------------------------------------------------------------------------------- alignment


class FunctionPipeline:
    """A pipeline stand-in whose generate(prompts, guidance_scale, seed) calls fn(prompts, scale, seed)."""

    def __init__(self, fn, guidance_scale: float, seed: int = 0):
        self.fn, self.sampling = fn, {"guidance_scale": guidance_scale, "seed": seed}

    def generate(self, prompts, guidance_scale, seed):
        return self.fn(prompts, guidance_scale, seed)


def test_alignment_scores_with_oracle_generator():
    resolution, fixed = 32, ("red", "circle", "left")
    calls = []

    def to_tensor(arr: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1

    def oracle(prompts, scale, seed):
        calls.append((list(prompts), scale, seed))
        rng = np.random.default_rng(seed)
        images = []
        for p in prompts:
            attrs = parse_caption(p) or fixed  # the empty prompt: always the same image
            images.append(to_tensor(render(*attrs, resolution, rng)))
        return torch.stack(images)

    n, scale = 150, 4.0
    scores = alignment_scores(FunctionPipeline(oracle, scale), n, batch_size=64)
    assert scores["caption_alignment_cfg"] == 1.0
    assert scores["caption_alignment_nocfg"] == 1.0
    expected_null = sum(parse_caption(c) == fixed for c in eval_captions(n)) / n
    assert scores["caption_alignment_null"] == pytest.approx(expected_null)
    assert scores["caption_alignment_null"] < 0.1
    assert scores["caption_alignment_guidance_scale"] == scale and scores["caption_alignment_samples"] == n
    # three settings × ceil(150 / 64) batches; scales and prompts per setting
    assert [c[1] for c in calls] == [scale] * 3 + [1.0] * 6
    assert [c[2] for c in calls[:3]] == [0, 64, 128]
    assert all(p == "" for c in calls[6:] for p in c[0])
    assert all(p != "" for c in calls[:6] for p in c[0])


def test_alignment_scores_separates_cfg_from_nocfg():
    """A generator that is right only with guidance: cfg 1, nocfg 0 (the keys are not swapped)."""

    def gen(prompts, scale, seed):
        rng = np.random.default_rng(seed)
        out = []
        for p in prompts:
            attrs = parse_caption(p) if scale > 1 else None
            # wrong on every attribute without guidance
            attrs = attrs or ("green", "triangle", "right")
            out.append(torch.from_numpy(render(*attrs, 32, rng)).permute(2, 0, 1).float() / 127.5 - 1)
        return torch.stack(out)

    n = 40
    scores = alignment_scores(FunctionPipeline(gen, 3.0), n)
    expected_nocfg = sum(parse_caption(c) == ("green", "triangle", "right") for c in eval_captions(n)) / n
    assert scores["caption_alignment_cfg"] == 1.0
    assert scores["caption_alignment_nocfg"] == pytest.approx(expected_nocfg)
    assert expected_nocfg < 0.1


def test_alignment_diagnostics_score_the_first_captions_only():
    """`diagnostic_n`: guided scoring on all n captions, no-guidance and null-prompt scoring on the first
    diagnostic_n of them (batches cut at that count), and the fraction is over that count."""
    calls = []

    def gen(prompts, scale, seed):
        calls.append((list(prompts), scale, seed))
        rng = np.random.default_rng(seed)
        # right with guidance; without it right only for the first 10 captions of each batch
        out = []
        for j, p in enumerate(prompts):
            attrs = parse_caption(p) if (scale > 1 or (p and j < 10)) else ("green", "triangle", "right")
            out.append(torch.from_numpy(render(*attrs, 32, rng)).permute(2, 0, 1).float() / 127.5 - 1)
        return torch.stack(out)

    n, diag = 100, 40
    scores = alignment_scores(FunctionPipeline(gen, 3.0), n, batch_size=32, diagnostic_n=diag)
    captions = eval_captions(n)
    assert [len(c[0]) for c in calls if c[1] > 1] == [32, 32, 32, 4]
    assert [len(c[0]) for c in calls if c[1] == 1.0] == [32, 8, 32, 8]  # nocfg, then null
    assert [c[0] for c in calls if c[1] == 1.0][:2] == [captions[:32], captions[32:40]]
    wrong = ("green", "triangle", "right")
    expected_nocfg = (10 + 8 + sum(parse_caption(c) == wrong for c in captions[10:32])) / diag
    assert scores["caption_alignment_nocfg"] == pytest.approx(expected_nocfg)
    assert scores["caption_alignment_cfg"] == 1.0
    assert scores["caption_alignment_samples"] == n and scores["caption_alignment_diagnostic_samples"] == diag
