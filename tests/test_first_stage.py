"""The first stage as stage 2 sees it: which latent it encodes (KL sample/mode, VQ pre-quantisation or z_q), that
calibration measures exactly that latent (seeded, batching- and rank-independent posterior samples), that the
scaled latents stage 2 trains on have unit std on the smoke artifact, and float32 latents under bf16 autocast."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from ldm_train.__main__ import run
from ldm_train.config import resolved_arch
from ldm_train.data import build_datasets, make_loader
from ldm_train.lit.diffusion import DiffusionModule
from ldm_train.models.autoencoder import Autoencoder
from ldm_train.pipeline import calibration as calibration_module
from ldm_train.pipeline.artifacts import ArtifactError
from ldm_train.pipeline.calibration import calibrate
from ldm_train.pipeline.first_stage import FirstStage
from ldm_train.stages import calibrate as calibrate_stage
from tests.conftest import compose_cfg, smoke_overrides

SCALE = 0.5  # a power of two: z·s/s is exact, so decode sees the encoder's numbers bit for bit


def tiny_autoencoder(tmp_path, *overrides: str) -> Autoencoder:
    torch.manual_seed(0)
    model = Autoencoder(resolved_arch(compose_cfg([*smoke_overrides(tmp_path), *overrides]))).eval()
    return model.requires_grad_(False)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def nearest_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Brute force: each latent vector replaced by the codebook row at the smallest Euclidean distance."""
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    idx = torch.cdist(flat.double(), codebook.double()).argmin(1)
    return codebook[idx].reshape(z.shape[0], z.shape[2], z.shape[3], z.shape[1]).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------ VQ latents


@pytest.mark.parametrize("diffuse", ["pre_quant", "quantized"])
def test_vq_diffuse_choice_encode_decode_cache_and_calibration(tmp_path, diffuse):
    model = tiny_autoencoder(tmp_path, "regularizer=vq", f"regularizer.diffuse={diffuse}")
    assert model.arch["regularizer"]["diffuse"] == diffuse  # recorded in the artifact's architecture
    with torch.no_grad():  # spread the codebook over the encoder's range, so quantizing visibly changes z
        model.regularizer.embedding.weight.copy_(torch.randn_like(model.regularizer.embedding.weight))
    fs = FirstStage(model, {"scale_factor": SCALE, "raw_std": 1.0})
    x = images(6)
    with torch.no_grad():
        h = model.quant_conv(model.encoder(x))  # the encoder output before the codebook
        z_q = nearest_codes(h, model.regularizer.embedding.weight)
        reconstruction = model(x)[0].clamp(-1, 1)  # the model's own path: encode, quantize, decode
    chosen = h if diffuse == "pre_quant" else z_q
    assert not torch.allclose(h, z_q)
    z = fs.encode(x)
    assert torch.allclose(z, chosen * SCALE, atol=1e-6)
    assert torch.allclose(fs.decode(z), reconstruction, atol=1e-5)  # pre_quant: decode quantizes
    latent, std = fs.raw_latents(x)
    assert std is None and torch.allclose(latent, chosen, atol=1e-6)
    assert torch.allclose(fs.from_cache(latent), z, atol=1e-6)
    cal = calibrate(model, [x[:4], x[4:]], 6)
    assert cal["raw_std"] == pytest.approx(chosen.double().std().item(), rel=1e-6)
    assert cal["latent"] == ("pre-quantisation z" if diffuse == "pre_quant" else "z_q") and cal["sample"] is False


def test_vq_diffuse_is_fixed_by_the_artifact(tmp_path):
    model = tiny_autoencoder(tmp_path, "regularizer=vq")  # the default: CompVis' pre_quant
    fs = FirstStage(model, {"scale_factor": SCALE, "raw_std": 1.0})
    fs.check_options({"name": "vq", "diffuse": "pre_quant"})
    with pytest.raises(ArtifactError, match="regularizer.diffuse=pre_quant, but this run asks for "
                                            "regularizer.diffuse=quantized"):
        fs.check_options({"name": "vq", "diffuse": "quantized"})
    # an artifact written before the option existed was calibrated (and cached) on z_q
    legacy = dict(model.arch, regularizer={k: v for k, v in model.arch["regularizer"].items() if k != "diffuse"})
    assert Autoencoder(legacy).regularizer.diffuse == "quantized"


# ------------------------------------------------------------------------------------ posterior-sample calibration


def test_calibration_on_posterior_samples_is_seeded_and_independent_of_batching(tmp_path):
    model = tiny_autoencoder(tmp_path)
    x = images(12)
    state = torch.get_rng_state()
    a = calibrate(model, x.split(5), 12, sample=True, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is neither read nor reseeded
    b = calibrate(model, x.split(12), 12, sample=True, seed=3)
    # image i's noise depends on (seed, i) only: equal up to the encoder's float rounding, which oneDNN may pick by
    # batch size (other noise per image would move the scale factor by ~1e-2)
    assert a.keys() == b.keys()
    for key, value in a.items():
        number = isinstance(value, float) or isinstance(value, list) and all(isinstance(v, float) for v in value)
        assert value == (pytest.approx(b[key], rel=1e-6) if number else b[key]), key
    assert a["sample"] is True and a["latent"] == "posterior sample" and a["seed"] == 3
    # independently: z_i = μ_i + σ_i·ε_i with ε_i from a generator seeded by (seed, i), over all elements
    with torch.no_grad():
        mean, logvar = model.quant_conv(model.encoder(x)).chunk(2, 1)
    seeds = [(3 * 2654435761 + i) % 2**32 for i in range(12)]
    eps = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
    z = mean + eps * (0.5 * logvar.clamp(-30, 20)).exp()
    assert a["scale_factor"] == pytest.approx(1 / z.double().std().item(), rel=1e-6)
    mode = calibrate(model, x.split(5), 12, sample=False)
    assert mode["latent"] == "posterior mode" and mode["scale_factor"] == pytest.approx(
        1 / mean.double().std().item(), rel=1e-6)
    assert calibrate(model, x.split(5), 12, sample=True, seed=4)["scale_factor"] != a["scale_factor"]


def test_two_ranks_sum_to_the_one_process_calibration(tmp_path, monkeypatch):
    """calibrate_module on rank 0 and rank 1 of 2 (sums all-reduced by hand) equals one process: posterior samples
    are drawn per image, not per rank."""
    model = tiny_autoencoder(tmp_path)
    cfg = compose_cfg([*smoke_overrides(tmp_path), "diffusion.sample_posterior=true", "data.val_size=9",
                       "autoencoder.calibration.batch_size=2"])
    dataset = build_datasets(cfg.data)[1]
    sums: list[list[torch.Tensor]] = []

    def run_as(rank: int, world: int) -> dict:
        sums.append([])
        monkeypatch.setattr(calibrate_stage, "rank", lambda: rank)
        monkeypatch.setattr(calibrate_stage, "world_size", lambda: world)
        monkeypatch.setattr(calibration_module, "sum_over_ranks", lambda t: sums[-1].append(t.clone()) or t)
        return calibrate_stage.calibrate_module(model, dataset, cfg)

    one = run_as(0, 1)
    run_as(0, 2)
    run_as(1, 2)
    assert one["sample"] is True and one["num_samples"] == 9
    for single, r0, r1 in zip(*sums, strict=True):  # Σz, Σz², counts, PSNR sums
        assert torch.allclose(r0 + r1, single, rtol=1e-10)


def test_calibration_latent_follows_stage2_unless_set(compose_cfg):
    pick = calibration_module.calibration_sample
    assert pick(compose_cfg(["diffusion.sample_posterior=true"])) is True
    assert pick(compose_cfg(["diffusion.sample_posterior=false"])) is False
    assert pick(compose_cfg(["diffusion.sample_posterior=true", "autoencoder.calibration.latent=mode"])) is False
    with pytest.raises(ValueError, match="autoencoder.calibration.latent='posterior'; valid: auto, sample, mode"):
        run(compose_cfg(["stage=autoencoder", "autoencoder.calibration.latent=posterior"]))


def test_stage2_on_the_smoke_artifact_sees_unit_std(smoke_autoencoder, tmp_path, caplog):
    """Calibrated on posterior samples (what stage 2 trains on with sample_posterior), the scaled latents stage 2
    draws from the training images have std 1 ± 0.02; the mode-calibrated factor would not give that."""
    artifact = shutil.copytree(smoke_autoencoder["artifact"], tmp_path / "kl_f4")
    overrides = [*smoke_autoencoder["cfg_overrides"], f"autoencoder.path={artifact}", "diffusion.sample_posterior=true",
                 "data.val_size=512", "autoencoder.calibration.num_samples=512"]
    cal = run(compose_cfg([*overrides, "stage=calibrate"]))
    assert cal["sample"] is True and cal["latent"] == "posterior sample"
    assert json.loads((artifact / "calibration.json").read_text()) == cal
    cfg = compose_cfg([*overrides, "stage=diffusion", "data.train_size=512"])
    first_stage = FirstStage.from_artifact(artifact, sample_posterior=cfg.diffusion.sample_posterior)
    torch.manual_seed(0)
    seen = torch.cat([DiffusionModule.batch_latents(first_stage, batch)
                      for batch in make_loader(build_datasets(cfg.data)[0], 128, False)])
    assert seen.shape[0] == 512
    assert seen.std().item() == pytest.approx(1.0, abs=0.02)
    mode_scale = json.loads((smoke_autoencoder["artifact"] / "calibration.json").read_text())["scale_factor"]
    assert (seen / first_stage.scale_factor * mode_scale).std().item() > 1.05  # what calibrating the mode gave
    # the unchanged smoke artifact was calibrated on the mode: asking it for samples is flagged
    with caplog.at_level(logging.WARNING):
        FirstStage.from_artifact(smoke_autoencoder["artifact"], sample_posterior=True)
    assert "calibrated on the posterior mode, but stage 2 uses the posterior sample" in caplog.text
    assert FirstStage.from_artifact(artifact).sample_posterior is True  # by default: what calibration measured


# ---------------------------------------------------------------------------------------------------- bf16


def test_encode_is_float32_under_bf16_autocast(tmp_path):
    fs = FirstStage(tiny_autoencoder(tmp_path), {"scale_factor": SCALE, "raw_std": 1.0}, sample_posterior=False)
    x = images(4)
    reference = fs.encode(x)
    mean, std = fs.raw_latents(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.linear(x, torch.ones(16, 16)).dtype == torch.bfloat16  # autocast is on
        z = fs.encode(x)
        cached = fs.raw_latents(x)
        from_cache = fs.from_cache(mean.half(), std.half(), sample=False)
    assert z.dtype == torch.float32 and torch.equal(z, reference)
    assert cached[0].dtype == cached[1].dtype == torch.float32
    assert torch.equal(cached[0], mean) and torch.equal(cached[1], std)
    assert from_cache.dtype == torch.float32


# ------------------------------------------------------------------------------------ per-channel normalisation


def calibration_of(model: Autoencoder, x: torch.Tensor) -> dict:
    """scale_factor and per-channel mean/std of the mode latents of x, computed here directly."""
    with torch.no_grad():
        z = model.latent(x, sample=False).double()
    return {"scale_factor": 1 / z.std().item(), "raw_std": z.std().item(),
            "channel_mean": z.mean((0, 2, 3)).tolist(), "channel_std": z.transpose(0, 1).flatten(1).std(1).tolist()}


def test_latent_norm_channel_centres_and_scales_each_channel(tmp_path):
    """diffusion.latent_norm=channel: stage 2 sees (z − mean_c)/std_c per channel (each channel mean 0, std 1 on the
    calibration images), decode inverts it, and the global default is z·scale_factor as before."""
    model = tiny_autoencoder(tmp_path)
    x = images(16)
    cal = calibration_of(model, x)
    with torch.no_grad():
        z = model.latent(x, sample=False)
    channel = FirstStage(model, cal, sample_posterior=False, latent_norm="channel")
    seen = channel.encode(x)
    mean = torch.tensor(cal["channel_mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cal["channel_std"]).view(1, -1, 1, 1)
    torch.testing.assert_close(seen, (z - mean) / std)
    torch.testing.assert_close(seen.mean((0, 2, 3)), torch.zeros(z.shape[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(seen.transpose(0, 1).flatten(1).std(1), torch.ones(z.shape[1]))
    plain = FirstStage(model, cal, sample_posterior=False)
    torch.testing.assert_close(plain.encode(x), z * cal["scale_factor"])
    torch.testing.assert_close(channel.decode(seen), plain.decode(plain.encode(x)), atol=1e-5, rtol=0)
    mean_c, std_c = channel.raw_latents(x)
    torch.testing.assert_close(channel.from_cache(mean_c, std_c, sample=False), seen)
    assert plain.diffusers_scaling_factor() == cal["scale_factor"]
    with pytest.raises(ValueError, match="latent_norm=global"):
        channel.diffusers_scaling_factor()  # diffusers' SD pipeline applies one scaling_factor


def test_latent_norm_needs_the_channel_statistics(tmp_path):
    model = tiny_autoencoder(tmp_path)
    with pytest.raises(ArtifactError, match="re-run stage=calibrate, or set diffusion.latent_norm=global"):
        FirstStage(model, {"scale_factor": SCALE, "raw_std": 1.0}, latent_norm="channel")
    with pytest.raises(ValueError, match="'per_image' is not one of global, channel"):
        FirstStage(model, {"scale_factor": SCALE, "raw_std": 1.0}, latent_norm="per_image")


def test_stage2_with_latent_norm_channel_round_trips_through_the_artifact(smoke_autoencoder, tmp_path):
    """Trained with diffusion.latent_norm=channel, the diffusion artifact records it and loads a first stage that
    normalises per channel with the autoencoder's calibration; export refuses it by name."""
    from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline

    artifacts = tmp_path / "artifacts"
    shutil.copytree(smoke_autoencoder["artifact"], artifacts / "autoencoder" / "kl_f4")
    run(compose_cfg([*smoke_autoencoder["cfg_overrides"], f"paths.artifacts={artifacts}", "stage=diffusion",
                     "diffusion.latent_norm=channel", "diffusion.max_steps=2", "diffusion.val_every=2",
                     f"paths.run_dir={tmp_path / 'run'}"]))
    pipe = LatentDiffusionPipeline.from_artifact(artifacts / "diffusion" / "kl_f4")
    cal = json.loads((artifacts / "autoencoder" / "kl_f4" / "calibration.json").read_text())
    assert pipe.config["diffusion"]["latent_norm"] == "channel"
    torch.testing.assert_close(pipe.first_stage.shift.flatten(), torch.tensor(cal["channel_mean"]))
    torch.testing.assert_close(pipe.first_stage.scale.flatten(), 1 / torch.tensor(cal["channel_std"]))
    images = pipe.generate(["a red circle"], steps=2, seed=0)
    assert images.shape == (1, 3, pipe.resolution, pipe.resolution) and images.abs().max() <= 1
    with pytest.raises(ValueError, match="normalised per channel"):
        pipe.first_stage.diffusers_scaling_factor()


def test_init_from_keeps_the_artifacts_latent_norm(smoke_autoencoder, tmp_path, caplog):
    """Fine-tuning a latent_norm=channel model with the default (global) keeps channel, says so and records it."""
    from ldm_train.pipeline.artifacts import read_diffusion

    artifacts = tmp_path / "artifacts"
    shutil.copytree(smoke_autoencoder["artifact"], artifacts / "autoencoder" / "kl_f4")
    common = [*smoke_autoencoder["cfg_overrides"], f"paths.artifacts={artifacts}", "stage=diffusion",
              "diffusion.max_steps=2", "diffusion.val_every=2"]
    run(compose_cfg([*common, "diffusion.latent_norm=channel", "name=source", f"paths.run_dir={tmp_path / 'a'}"]))
    with caplog.at_level("WARNING", logger="ldm_train.stages.diffusion"):
        run(compose_cfg([*common, "diffusion.init_from=source", "name=tuned", f"paths.run_dir={tmp_path / 'b'}"]))
    assert "diffusion.latent_norm=global ignored" in caplog.text
    assert read_diffusion(artifacts / "diffusion" / "tuned")[0]["diffusion"]["latent_norm"] == "channel"
