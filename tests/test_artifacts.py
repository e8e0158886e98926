"""The stage-1 artifact as written by a real smoke run: its files, an independently recomputed scale factor,
exact reloads, the stored-architecture pitfall, clear errors for broken artifacts, and atomic writes."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ldm_train.config import resolved_arch
from ldm_train.data.shapes import ShapesDataset
from ldm_train.models.autoencoder import Autoencoder
from ldm_train.pipeline.artifacts import ArtifactError, load_autoencoder
from ldm_train.utils.io import atomic_write_dir, atomic_write_text

ARTIFACT_FILES = {"model.safetensors", "config.yaml", "calibration.json", "metrics.json", "provenance.json"}


@pytest.fixture(scope="module")
def smoke_vq(tmp_path_factory, compose_cfg) -> dict:
    """A (shorter) VQ f=4 smoke run of its own."""
    from ldm_train.__main__ import run

    root = tmp_path_factory.mktemp("smoke_vq")
    overrides = ["experiment=smoke", "logger=none", f"paths.artifacts={root / 'artifacts'}",
                 f"paths.run_dir={root / 'run'}", "regularizer=vq", "autoencoder.max_steps=4"]
    metrics = run(compose_cfg(overrides))
    return {"cfg_overrides": overrides, "artifact": root / "artifacts" / "autoencoder" / "vq_f4", "metrics": metrics}


@pytest.fixture
def kl_copy(smoke_autoencoder, tmp_path) -> Path:
    """A private copy of the session's KL artifact, free to edit or break."""
    return Path(shutil.copytree(smoke_autoencoder["artifact"], tmp_path / "kl_f4"))


def _build(artifact: Path) -> Autoencoder:
    """The model rebuilt by hand from config.yaml + model.safetensors (not via load_autoencoder)."""
    arch = yaml.safe_load((artifact / "config.yaml").read_text())["architecture"]
    model = Autoencoder(arch)
    model.load_state_dict(load_file(str(artifact / "model.safetensors")), strict=True)
    return model.eval()


def _val_images(cfg, n: int) -> torch.Tensor:
    ds = ShapesDataset(cfg.data.resolution, cfg.data.val_size, "val", cfg.data.seed)
    return torch.stack([ds[i]["image"] for i in range(min(n, len(ds)))])


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_artifact_files(smoke_autoencoder):
    artifact = smoke_autoencoder["artifact"]
    assert {p.name for p in artifact.iterdir()} == ARTIFACT_FILES
    assert [p.name for p in artifact.parent.iterdir()] == ["kl_f4"]  # no .tmp-/.old- directories left behind
    assert [p.name for p in smoke_autoencoder["artifacts"].iterdir()] == ["autoencoder"]


def test_provenance_of_a_trained_artifact(smoke_autoencoder):
    """The stage writes provenance.json (its fields are tested in test_provenance.py): what it trained on, how long."""
    prov = _json(smoke_autoencoder["artifact"] / "provenance.json")
    assert prov["stage"] == "autoencoder" and prov["steps"] == smoke_autoencoder["metrics"]["steps"] == 12
    assert prov["data"] == {"name": "shapes", "resolution": 16} and prov["experiment"] is None
    assert prov["config"]["autoencoder"]["ch"] == 16 and len(prov["config_hash"]) == 64


def test_config_yaml_is_the_resolved_architecture(compose_cfg, smoke_autoencoder):
    cfg = compose_cfg(smoke_autoencoder["cfg_overrides"])
    stored = yaml.safe_load((smoke_autoencoder["artifact"] / "config.yaml").read_text())["architecture"]
    assert stored == resolved_arch(cfg)
    assert (stored["f"], stored["num_groups"], stored["ch"], stored["resolution"]) == (4, 8, 16, 16)
    assert stored["regularizer"] == {"name": "kl", "sample": True}


@pytest.mark.parametrize("which", ["kl", "vq"])
def test_scale_factor_is_one_over_latent_std(compose_cfg, request, which):
    run = request.getfixturevalue("smoke_autoencoder" if which == "kl" else "smoke_vq")
    cfg = compose_cfg(run["cfg_overrides"])
    cal = _json(run["artifact"] / "calibration.json")
    n = cfg.autoencoder.calibration.num_samples
    x = _val_images(cfg, n)
    model = _build(run["artifact"])
    with torch.no_grad():
        z = torch.cat([model.latent(chunk, sample=False) for chunk in x.split(16)])
    expected = 1.0 / z.double().std().item()
    assert cal["scale_factor"] == pytest.approx(expected, rel=1e-4)
    assert math.isfinite(cal["scale_factor"]) and cal["scale_factor"] > 0
    assert cal["num_samples"] == len(x) == min(n, cfg.data.val_size)
    assert cal["num_elements"] == z.numel()
    assert cal["scaled_std"] == pytest.approx(1.0, rel=1e-6)
    assert cal["latent"] == ("posterior mode" if which == "kl" else "pre-quantisation z")  # VQ: diffuse=pre_quant
    assert cal["sample"] is False  # smoke trains stage 2 on the mode (diffusion.sample_posterior=false)
    assert _json(run["artifact"] / "metrics.json")["scale_factor"] == cal["scale_factor"]


def test_metrics_json(compose_cfg, smoke_autoencoder):
    cfg = compose_cfg(smoke_autoencoder["cfg_overrides"])
    metrics = _json(smoke_autoencoder["artifact"] / "metrics.json")
    # stage 1 names its validation metrics as stage=evaluate does (recon_*), the LPIPS variant honestly
    assert {"recon_psnr", "recon_ssim", "recon_l1", "recon_lpips_randalex"} <= set(metrics)
    assert not {"psnr", "ssim", "l1", "lpips", "lpips_randalex", "recon_lpips"} & set(metrics)
    assert metrics["perceptual"] == {"net": "alex", "weights": "random", "metric_name": "lpips_randalex"}
    assert metrics["steps"] == cfg.autoencoder.max_steps
    # recon_psnr: the mean per-image PSNR over the validated batches, recomputed from the saved weights
    ae = cfg.autoencoder
    x = _val_images(cfg, ae.val_batches * ae.batch_size)
    with torch.no_grad():
        xrec = _build(smoke_autoencoder["artifact"])(x)[0].clamp(-1, 1)
    mse = (x - xrec).pow(2).flatten(1).mean(1)
    assert metrics["recon_psnr"] == pytest.approx((10 * torch.log10(4.0 / mse)).mean().item(), rel=1e-4)


def test_reload_reproduces_reconstructions(compose_cfg, smoke_autoencoder):
    cfg = compose_cfg(smoke_autoencoder["cfg_overrides"])
    x = _val_images(cfg, 8)
    a, cal = load_autoencoder(smoke_autoencoder["artifact"], expect_f=4, expect_regularizer="kl")
    b, _ = load_autoencoder(smoke_autoencoder["artifact"])
    with torch.no_grad():
        ra, rb, ref = a(x)[0], b(x)[0], _build(smoke_autoencoder["artifact"])(x)[0]
    assert torch.equal(ra, rb) and torch.equal(ra, ref)
    assert cal == _json(smoke_autoencoder["artifact"] / "calibration.json")
    # frozen: eval mode, no gradients, and train() cannot switch it back
    a.train()
    assert not a.training and not any(p.requires_grad for p in a.parameters())


def test_loading_uses_the_stored_architecture(compose_cfg, smoke_autoencoder, kl_copy):
    """Pitfall: config.yaml is the truth. An edited num_groups still loads (GroupNorm weights do not depend on
    the group count) but gives another model; the untouched artifact reproduces."""
    cfg = compose_cfg(smoke_autoencoder["cfg_overrides"])
    x = _val_images(cfg, 8)
    text = (kl_copy / "config.yaml").read_text()
    assert "num_groups: 8" in text
    (kl_copy / "config.yaml").write_text(text.replace("num_groups: 8", "num_groups: 4"))
    edited, _ = load_autoencoder(kl_copy)
    original, _ = load_autoencoder(smoke_autoencoder["artifact"])
    groups = {m.num_groups for m in edited.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {4}
    assert {m.num_groups for m in original.modules() if isinstance(m, torch.nn.GroupNorm)} == {8}
    with torch.no_grad():
        assert not torch.allclose(edited(x)[0], original(x)[0], atol=1e-3)
        assert torch.equal(original(x)[0], _build(smoke_autoencoder["artifact"])(x)[0])


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_weights_are_an_artifact_error(kl_copy, damage):
    weights = kl_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"not a safetensors file" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="corrupt or not safetensors") as err:
        load_autoencoder(kl_copy)
    assert str(weights) in str(err.value)


def test_weights_not_matching_config_are_an_artifact_error(kl_copy):
    text = (kl_copy / "config.yaml").read_text()
    (kl_copy / "config.yaml").write_text(text.replace("ch: 16", "ch: 32"))
    with pytest.raises(ArtifactError, match="do not match its config.yaml"):
        load_autoencoder(kl_copy)


def test_missing_calibration(kl_copy):
    (kl_copy / "calibration.json").unlink()
    with pytest.raises(ArtifactError, match="stage=calibrate f=4 regularizer=kl"):
        load_autoencoder(kl_copy, require_calibration=True)
    model, cal = load_autoencoder(kl_copy, require_calibration=False)
    assert cal is None and model.z_channels == 3


@pytest.mark.parametrize("bad", [0, -1.0, "NaN", None])
def test_invalid_scale_factor(kl_copy, bad):
    cal = _json(kl_copy / "calibration.json")
    cal["scale_factor"] = float("nan") if bad == "NaN" else bad
    (kl_copy / "calibration.json").write_text(json.dumps(cal))
    with pytest.raises(ArtifactError, match="no valid scale_factor"):
        load_autoencoder(kl_copy)


def test_expectation_mismatches(smoke_autoencoder, tmp_path):
    artifact = smoke_autoencoder["artifact"]
    with pytest.raises(ArtifactError, match="has f=4, but the run asks for f=8"):
        load_autoencoder(artifact, expect_f=8)
    with pytest.raises(ArtifactError, match="is kl, but the run asks for regularizer=vq"):
        load_autoencoder(artifact, expect_regularizer="vq")
    with pytest.raises(ArtifactError, match="stage=autoencoder f=16 regularizer=vq"):
        load_autoencoder(tmp_path / "nothing", expect_f=16, expect_regularizer="vq")


def test_stage_calibrate_rewrites_the_same_scale_factor(compose_cfg, smoke_autoencoder, kl_copy):
    from ldm_train.__main__ import run

    original = _json(smoke_autoencoder["artifact"] / "calibration.json")
    (kl_copy / "calibration.json").unlink()
    cfg = compose_cfg([*smoke_autoencoder["cfg_overrides"], "stage=calibrate", f"autoencoder.path={kl_copy}"])
    returned = run(cfg)
    rewritten = _json(kl_copy / "calibration.json")
    assert rewritten["scale_factor"] == pytest.approx(original["scale_factor"], rel=1e-6)
    assert returned["scale_factor"] == rewritten["scale_factor"]
    assert rewritten["num_samples"] == original["num_samples"]
    assert {p.name for p in kl_copy.iterdir()} == ARTIFACT_FILES  # no temp file left next to it


def test_vq_smoke_artifact(smoke_vq):
    artifact = smoke_vq["artifact"]
    assert {p.name for p in artifact.iterdir()} == ARTIFACT_FILES
    model, cal = load_autoencoder(artifact, expect_f=4, expect_regularizer="vq")
    assert model.arch["regularizer"]["name"] == "vq" and model.regularizer.n_embed == 8192
    assert cal["scale_factor"] > 0 and smoke_vq["metrics"]["steps"] == 4


# ------------------------------------------------------------------------------------------- atomic writes


def test_atomic_write_dir_failure_keeps_the_previous_content(tmp_path):
    final = tmp_path / "art"
    final.mkdir()
    (final / "a.txt").write_text("old")

    def failing(tmp: Path) -> None:
        (tmp / "a.txt").write_text("new")
        (tmp / "b.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_dir(final, failing)
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temp dir behind
    assert [p.name for p in final.iterdir()] == ["a.txt"] and (final / "a.txt").read_text() == "old"

    atomic_write_dir(final, lambda tmp: (tmp / "b.txt").write_text("new"))  # success replaces the whole dir
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
    assert [p.name for p in final.iterdir()] == ["b.txt"] and (final / "b.txt").read_text() == "new"


def test_atomic_write_text_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "calibration.json"
    target.write_text("old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new content")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["calibration.json"]
    monkeypatch.undo()
    atomic_write_text(target, "new content")
    assert target.read_text() == "new content" and [p.name for p in tmp_path.iterdir()] == ["calibration.json"]
