"""stage=evaluate and its metrics: PSNR and Fréchet distance against independent computations, honest names."""

import json
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from ldm_train.data.shapes import ShapesDataset, parse_caption, read_attributes
from ldm_train.evaluation.features import (
    FeatureNetworkError,
    inception_available,
    load_shapes_features,
    metric_names,
    resolve_features,
)
from ldm_train.evaluation.generation import generation_metrics
from ldm_train.evaluation.metrics import unit

PUBLISHED = {"fid", "rfid", "lpips", "recon_lpips"}


def images(split: str, n: int, resolution: int = 32) -> torch.Tensor:
    ds = ShapesDataset(resolution, n, split, seed=3)
    return torch.stack([ds[i]["image"] for i in range(n)])


def test_shapes_feature_network_reads_attributes(shapes_features):
    # a few quick steps already read colour, shape and position of most held-out images (chance: 1/120)
    acc = shapes_features["stats"]["val_accuracy"]
    assert acc["all"] > 0.6 and acc["color"] > 0.8 and acc["position"] > 0.8, acc


def fd_of(real: torch.Tensor, fake: torch.Tensor, features, batch: int = 100) -> float:
    """`generation_metrics` (what stage=evaluate runs) with a generator that hands out `fake` batch by batch."""
    real_batches = [{"image": real[i:i + batch], "caption": ["c"] * len(real[i:i + batch])}
                    for i in range(0, len(real), batch)]
    starts = iter(range(0, len(fake), batch))
    metrics = generation_metrics(lambda captions, i: fake[(j := next(starts)):j + len(captions)],
                                 real_batches, features)
    assert metrics["samples"] == len(fake)
    return metrics[features.fid_key]


def test_frechet_distance_matches_scipy(shapes_features):
    features = load_shapes_features(shapes_features["path"], train_if_missing=False)
    real, fake = images("val", 160), images("test", 160) + 0.3 * torch.randn(160, 3, 32, 32)
    got = fd_of(real, fake, features)
    with torch.no_grad():  # independent: numpy moments and scipy's matrix square root
        a = features.module(unit(real)).double().numpy()
        b = features.module(unit(fake)).double().numpy()
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(ca @ cb).real
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * covmean)
    assert got == pytest.approx(expected, rel=2e-3)


def test_frechet_distance_separates_real_from_blurred(shapes_features):
    # what a coarse autoencoder does to shapes: two real sets are much closer than real and blurred
    features = load_shapes_features(shapes_features["path"], train_if_missing=False)
    real, other_real = images("val", 128), images("test", 128)
    blurred = F.interpolate(F.avg_pool2d(other_real, 4), scale_factor=4, mode="bilinear", align_corners=False)
    assert fd_of(real, other_real, features) < 0.5 * fd_of(real, blurred, features)


def test_generation_metrics_batches_captions_and_alignment_by_hand():
    """generate(captions_i, i) per real batch; alignment is the per-image mean over batches of 3 and 1."""
    calls = []

    def gen(captions, i):
        calls.append((captions, i))
        return torch.zeros(len(captions), 3, 8, 8)

    batches = [{"image": torch.zeros(3, 3, 8, 8), "caption": ["a", "b", "c"]},
               {"image": torch.zeros(1, 3, 8, 8), "caption": ["d"]}]
    fractions = iter([1 / 3, 1.0])  # 1 of 3 images right, then 1 of 1: 2 of 4 in all
    metrics = generation_metrics(gen, batches, None, lambda imgs, caps: next(fractions))
    assert calls == [(["a", "b", "c"], 0), (["d"], 1)]
    assert metrics["samples"] == 4 and metrics["caption_alignment"] == pytest.approx(0.5)


def test_metric_names_follow_the_feature_network(tmp_path, shapes_features):
    assert metric_names("inception") == ("fid", "rfid")
    assert metric_names("shapes") == ("fd_shapes", "rfd_shapes")
    shapes = resolve_features("shapes", "shapes", shapes_features["path"])
    assert (shapes.fid_key, shapes.rfid_key) == ("fd_shapes", "rfd_shapes") and shapes.weights_sha256
    assert resolve_features("none", "shapes", tmp_path / "x") is None
    with pytest.raises(FeatureNetworkError, match="unknown eval.features"):
        resolve_features("clip", "shapes", tmp_path / "x")
    with pytest.raises(FeatureNetworkError, match="train_shapes_features.py"):
        resolve_features("shapes", "shapes", tmp_path / "missing.safetensors", train_if_missing=False)
    if inception_available():
        pytest.skip("this machine has the FID InceptionV3: the offline errors cannot be checked")
    with pytest.raises(FeatureNetworkError, match="eval.features=shapes"):
        resolve_features("inception", "shapes", shapes_features["path"])
    with pytest.raises(FeatureNetworkError, match="eval.features=shapes"):  # auto on other data: no silent fallback
        resolve_features("auto", "folder", shapes_features["path"])
    assert resolve_features("auto", "shapes", shapes_features["path"]).fid_key == "fd_shapes"


def test_evaluate_autoencoder_artifact(smoke_autoencoder, shapes_features, compose_cfg, tmp_path):
    from ldm_train.__main__ import run
    from ldm_train.pipeline.artifacts import load_autoencoder

    shutil.copytree(smoke_autoencoder["artifacts"] / "autoencoder", tmp_path / "artifacts" / "autoencoder")
    artifact = tmp_path / "artifacts" / "autoencoder" / "kl_f4"
    before = json.loads((artifact / "metrics.json").read_text())
    cfg = compose_cfg(["experiment=smoke", "stage=evaluate", f"paths.artifacts={tmp_path / 'artifacts'}",
                       f"paths.run_dir={tmp_path / 'run'}", f"eval.features_path={shapes_features['path']}"])
    out = run(cfg)  # eval.target=auto: only the autoencoder exists

    assert {"recon_psnr", "recon_ssim", "recon_lpips_randalex", "rfd_shapes"} <= set(out)
    assert not PUBLISHED & set(out) and "fd_shapes" not in out and out["features"] == "shapes"
    assert out["recon_samples"] == 32 and 0 < out["recon_ssim"] <= 1 and out["rfd_shapes"] > 0
    # PSNR by hand: mean over images of 10·log10(range² / MSE), range 2 for images in [-1, 1]
    model, _ = load_autoencoder(artifact)
    x = torch.stack([ShapesDataset(16, 32, "val", 0)[i]["image"] for i in range(32)])
    with torch.no_grad():
        xrec = model.decode_latent(model.latent(x, sample=False)).clamp(-1, 1)
    psnr = (10 * torch.log10(4 / ((xrec - x) ** 2).mean(dim=(1, 2, 3)))).mean()
    assert out["recon_psnr"] == pytest.approx(float(psnr), abs=1e-3)
    # the ceiling of stage 2's caption alignment, by hand: reconstructions read back against their own captions
    captions = [ShapesDataset(16, 32, "val", 0)[i]["caption"] for i in range(32)]
    hits = sum(read_attributes(xrec[i]) == parse_caption(c) for i, c in enumerate(captions))
    assert out["recon_caption_alignment"] == pytest.approx(hits / 32)
    assert sum(read_attributes(x[i]) == parse_caption(c) for i, c in enumerate(captions)) == 32  # the reader works

    after = json.loads((artifact / "metrics.json").read_text())
    assert {k: after[k] for k in before} == before  # stage-1 keys kept
    assert after["evaluation"]["recon_psnr"] == out["recon_psnr"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["rfd_shapes"] == out["rfd_shapes"]
    assert (tmp_path / "run" / "evaluate" / "reconstructions.png").exists()


def test_evaluate_without_artifacts_names_the_command(compose_cfg, tmp_path):
    from ldm_train.pipeline.artifacts import ArtifactError
    from ldm_train.stages.evaluate import run

    cfg = compose_cfg(["experiment=smoke", "stage=evaluate", "f=8", f"paths.artifacts={tmp_path}",
                       f"paths.run_dir={tmp_path / 'run'}"])
    with pytest.raises(ArtifactError, match="stage=autoencoder f=8 regularizer=kl"):
        run(cfg)
