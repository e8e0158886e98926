"""Artifact provenance: what it records, how the pipeline's reuse and an artifact's replacement use it.

The artifacts here are built directly with save_autoencoder (random weights, no training): only their provenance
and architecture matter to reuse.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from ldm_train.config import CONF_DIR, autoencoder_dir, resolved_arch
from ldm_train.models.autoencoder import Autoencoder
from ldm_train.pipeline.artifacts import content_hash, save_autoencoder
from ldm_train.pipeline.provenance import provenance
from ldm_train.stages.pipeline import reusable_autoencoder


def smoke(root: Path, *extra: str) -> list[str]:
    return ["experiment=smoke", "logger=none", "stage=pipeline", f"paths.artifacts={root / 'artifacts'}",
            f"paths.run_dir={root / 'run'}", *extra]


def write_artifact(cfg, trained_with, target: Path | None = None, steps: int = 3, with_provenance: bool = True):
    """A stage-1 artifact with `cfg`'s architecture whose provenance says it was trained with `trained_with`."""
    target = target or autoencoder_dir(cfg)
    prov = provenance(trained_with, "autoencoder", steps=steps) if with_provenance else None
    save_autoencoder(target, Autoencoder(resolved_arch(cfg)), resolved_arch(cfg), {"scale_factor": 1.0},
                     {"steps": steps}, prov)
    return target


def test_autoencoder_provenance_fields(compose_cfg, tmp_path):
    cfg = compose_cfg(smoke(tmp_path))
    prov = json.loads((write_artifact(cfg, cfg, steps=7) / "provenance.json").read_text())
    assert prov["stage"] == "autoencoder" and prov["steps"] == 7
    assert prov["data"] == {"name": "shapes", "resolution": 16} and prov["resolution"] == 16
    assert prov["experiment"] is None and prov["choices"] is None  # outside a Hydra run
    # the hashed subset: data + autoencoder + regularizer + f + seed, as resolved values
    config = prov["config"]
    assert set(config) == {"data", "f", "seed", "regularizer", "autoencoder"}
    assert (config["f"], config["seed"], config["regularizer"]["name"]) == (4, 0, "kl")
    assert config["autoencoder"]["max_steps"] == 12 and config["autoencoder"]["arch"]["z_channels"] == 3
    assert "path" not in config["autoencoder"] and "num_workers" not in config["data"]
    assert prov["config_hash"] == hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    # what shapes the weights changes the hash; validation cadence does not
    assert provenance(compose_cfg(smoke(tmp_path, "seed=1")), "autoencoder")["config_hash"] != prov["config_hash"]
    assert provenance(compose_cfg(smoke(tmp_path, "autoencoder.loss.disc_weight=0.7")),
                      "autoencoder")["config_hash"] != prov["config_hash"]
    assert provenance(compose_cfg(smoke(tmp_path, "autoencoder.val_every=3", "data.num_workers=4")),
                      "autoencoder")["config_hash"] == prov["config_hash"]


def test_folder_root_is_recorded_absolute(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prov = provenance(compose_cfg(smoke(tmp_path, "data=folder", "data.root=imgs", "data.resolution=16")),
                      "autoencoder")
    assert prov["data"] == {"name": "folder", "root": str(tmp_path / "imgs"), "resolution": 16}


def test_experiment_recorded_inside_hydra(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        full = compose("config", overrides=smoke(tmp_path), return_hydra_config=True)
    HydraConfig.instance().set_config(full)
    try:
        prov = provenance(full, "autoencoder")
    finally:
        HydraConfig.instance().cfg = None
    assert prov["experiment"] == "smoke" and prov["choices"]["data"] == "shapes"


def test_diffusion_provenance_hashes_its_autoencoder(compose_cfg, tmp_path):
    cfg = compose_cfg(smoke(tmp_path))
    artifact = write_artifact(cfg, cfg)
    prov = provenance(cfg, "diffusion", steps=5, autoencoder=artifact)
    assert set(prov["config"]) == {"data", "f", "seed", "regularizer", "diffusion", "unet", "text_encoder",
                                   "autoencoder_content_hash"}
    assert prov["config"]["autoencoder_content_hash"] == content_hash(artifact)
    assert "val_steps" not in prov["config"]["diffusion"] and prov["config"]["unet"]["model_channels"] == 16
    other = write_artifact(cfg, cfg, target=tmp_path / "other")  # same config, other random weights
    assert provenance(cfg, "diffusion", autoencoder=other)["config_hash"] != prov["config_hash"]


# ------------------------------------------------------------------------------------------------ reuse


def test_reuse_takes_an_artifact_trained_the_same_way(compose_cfg, tmp_path, caplog):
    cfg = compose_cfg(smoke(tmp_path))
    write_artifact(cfg, cfg)
    with caplog.at_level("INFO"):
        assert reusable_autoencoder(cfg) == {"steps": 3}
    assert "reusing stage 1" in caplog.text and "same data (data=shapes" in caplog.text


def test_reuse_refuses_other_data_and_says_why(compose_cfg, tmp_path, caplog):
    cfg = compose_cfg(smoke(tmp_path))
    folder = compose_cfg(smoke(tmp_path, "data=folder", f"data.root={tmp_path / 'imgs'}", "data.resolution=16"))
    assert resolved_arch(folder) == resolved_arch(cfg)  # the architecture alone cannot tell them apart
    write_artifact(cfg, folder)
    with caplog.at_level("INFO"):
        assert reusable_autoencoder(cfg) is None
    line = next(r.getMessage() for r in caplog.records if "retraining stage 1" in r.getMessage())
    assert f"trained on data=folder (root {tmp_path / 'imgs'}, resolution 16)" in line
    assert "this run uses data=shapes (resolution 16)" in line


def test_reuse_refuses_other_resolution_and_says_why(compose_cfg, tmp_path, caplog):
    cfg = compose_cfg(smoke(tmp_path))
    high = compose_cfg(smoke(tmp_path, "data.resolution=32"))
    write_artifact(high, high, target=autoencoder_dir(cfg))
    with caplog.at_level("INFO"):
        assert reusable_autoencoder(cfg) is None
    assert "trained on data=shapes (resolution 32), this run uses data=shapes (resolution 16" \
        in caplog.text


def test_reuse_refuses_other_training_config_naming_the_keys(compose_cfg, tmp_path, caplog):
    cfg = compose_cfg(smoke(tmp_path))
    write_artifact(cfg, compose_cfg(smoke(tmp_path, "autoencoder.max_steps=5", "seed=3")))
    with caplog.at_level("INFO"):
        assert reusable_autoencoder(cfg) is None
    assert "trained with another config: seed: 3 → 0; autoencoder.max_steps: 5 → 12" in caplog.text


def test_reuse_refuses_an_artifact_without_provenance(compose_cfg, tmp_path, caplog):
    cfg = compose_cfg(smoke(tmp_path))
    write_artifact(cfg, cfg, with_provenance=False)
    with caplog.at_level("INFO"):
        assert reusable_autoencoder(cfg) is None
    assert "has no provenance.json (written before provenance was recorded)" in caplog.text


def test_an_explicit_autoencoder_path_is_used_with_a_warning(compose_cfg, tmp_path, caplog):
    given = tmp_path / "mine"
    cfg = compose_cfg(smoke(tmp_path, f"autoencoder.path={given}"))
    write_artifact(cfg, compose_cfg(smoke(tmp_path, "seed=5")), target=given)
    with caplog.at_level("INFO"):
        assert reusable_autoencoder(cfg) == {"steps": 3}
    assert "as given by autoencoder.path, although" in caplog.text and "seed: 5 → 0" in caplog.text


# ------------------------------------------------------------------------------------------------ replacement


@pytest.mark.parametrize("other, expect", [
    (["data=folder", "data.root=/data/mine", "data.resolution=16"],
     "the old one was trained on data=shapes (resolution 16), this run uses data=folder "
     "(root /data/mine, resolution 16)"),
    (["autoencoder.lr=0.002"], "the old one was trained with another config: autoencoder.lr: 0.001 → 0.002"),
])
def test_replacing_an_artifact_logs_what_differed(compose_cfg, tmp_path, caplog, other, expect):
    cfg = compose_cfg(smoke(tmp_path))
    target = write_artifact(cfg, cfg)
    with caplog.at_level("INFO"):
        write_artifact(cfg, compose_cfg(smoke(tmp_path, *other)), steps=4)
    assert [r.levelname for r in caplog.records if "replacing" in r.getMessage()] == ["WARNING"]
    assert f"replacing {target}: {expect}" in caplog.text
    assert json.loads((target / "provenance.json").read_text())["steps"] == 4


def test_replacing_with_the_same_config_says_so(compose_cfg, tmp_path, caplog):
    cfg = compose_cfg(smoke(tmp_path))
    target = write_artifact(cfg, cfg)
    with caplog.at_level("INFO"):
        write_artifact(cfg, cfg, steps=9)
    assert f"replacing {target}: same data (data=shapes" in caplog.text and "steps 3 → 9" in caplog.text
