"""`stage=pipeline` on experiment=smoke: stage 1 → calibration → stage 2 → samples, one metrics.json."""

import json

from PIL import Image

from ldm_train.pipeline.artifacts import content_hash

KEYS = ("recon_psnr", "caption_alignment_cfg", "caption_alignment_nocfg", "caption_alignment_null", "wall_seconds")


def test_pipeline_writes_metrics_and_grid(compose_cfg, tmp_path, shapes_features, caplog):
    from ldm_train.__main__ import run

    cfg = compose_cfg(["experiment=smoke", "stage=pipeline", "diffusion.eval_samples=4", "n_per_prompt=1",
                       "eval.seeds=2", "prompt=[a red circle on the left]", f"paths.artifacts={tmp_path}/a",
                       f"paths.run_dir={tmp_path}/r", f"eval.features_path={shapes_features['path']}"])
    out = run(cfg)
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert set(KEYS) <= set(metrics) and metrics == json.loads(json.dumps(out))
    for key in KEYS[1:4]:
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["caption_alignment_samples"] == 4
    ae = json.loads((tmp_path / "a" / "autoencoder" / "kl_f4" / "metrics.json").read_text())
    # the last step evaluates both artifacts: recon_psnr over the whole validation set, honest metric names
    assert metrics["recon_psnr"] == ae["evaluation"]["recon_psnr"]
    assert "recon_psnr" in ae and "psnr" not in ae  # stage 1's own value kept, under the same name
    assert {"rfd_shapes", "fd_shapes", "caption_alignment", "recon_lpips_randalex"} <= set(metrics)
    assert metrics["eval_samples"] == 8 and not {"fid", "rfid", "lpips"} & set(metrics)
    # eval.seeds=2: the generation metrics are means over two sampling seeds, with their spread
    assert metrics["eval_seeds"] == 2 and metrics["fd_shapes_std"] >= 0 and "caption_alignment_std" in metrics
    assert metrics["eval_samples_per_second"] > 0
    assert metrics["autoencoder_reused"] is False and metrics["diffusion_ms_per_step"] > 0
    assert Image.open(metrics["grid"]).size[0] > 16
    assert (tmp_path / "a" / "diffusion" / "kl_f4" / "model.safetensors").exists()
    prov = json.loads((tmp_path / "a" / "diffusion" / "kl_f4" / "provenance.json").read_text())
    assert prov["stage"] == "diffusion" and prov["steps"] == 12 and prov["data"]["name"] == "shapes"
    assert prov["config"]["autoencoder_content_hash"] == content_hash(tmp_path / "a" / "autoencoder" / "kl_f4")

    # a second run reuses the stage-1 artifact instead of retraining it
    before = (tmp_path / "a" / "autoencoder" / "kl_f4" / "model.safetensors").stat().st_mtime_ns
    cfg2 = compose_cfg(["experiment=smoke", "stage=pipeline", "diffusion.eval_samples=0", "n_per_prompt=1",
                        "prompt=[a red circle on the left]", f"paths.artifacts={tmp_path}/a",
                        f"paths.run_dir={tmp_path}/r2", "eval.features=none", "eval.num_samples=2",
                        "eval.batch_size=2"])
    with caplog.at_level("INFO"):
        out2 = run(cfg2)
    assert out2["autoencoder_reused"] is True and out2["eval_seeds"] == 1 and not any("_std" in k for k in out2)
    assert "reusing stage 1" in caplog.text and "same data (data=shapes (resolution 16))" in caplog.text
    assert (tmp_path / "a" / "autoencoder" / "kl_f4" / "model.safetensors").stat().st_mtime_ns == before
