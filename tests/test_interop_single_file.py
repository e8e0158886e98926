"""Original single-file checkpoints (CompVis key names): `stage=export format=single_file` is read by diffusers' own
`from_single_file`, round-trips bit-identically through `stage=import`, and a file without our metadata imports
from its shapes plus the `import.*` options; bad files are refused with nothing written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).parent))
from sd_tiny import tiny_sd  # noqa: E402

from ldm_train.interop.keys import KeyMismatchError  # noqa: E402
from ldm_train.interop.weights import UnsafeWeightsError  # noqa: E402

# what the tiny pipelines' shapes cannot tell (the real SD defaults are 8 heads / width 64, 32 groups, 512/768 px)
SHAPE_OPTIONS = {1: ["import.num_heads=4", "import.prediction_type=eps"],
                 2: ["import.head_channels=8", "import.prediction_type=v", "import.upcast_attention=true"]}
TINY = ["import.norm_groups=8", "import.text_heads=4", "import.resolution=64"]


def run_stage(compose_cfg, root: Path, *overrides: str) -> dict:
    from ldm_train.__main__ import run

    return run(compose_cfg([*overrides, f"paths.artifacts={root}", "logger=none", f"paths.run_dir={root / 'run'}"]))


@pytest.fixture(scope="module", params=[1, 2], ids=["sd1", "sd2"])
def exported(request, tmp_path_factory, compose_cfg):
    """(version, diffusers folder, artifacts root with `sd` imported from it, the exported single file)."""
    version = request.param
    base = tmp_path_factory.mktemp(f"single{version}")
    folder = base / "pipe"
    tiny_sd(folder, version=version, prediction_type="epsilon" if version == 1 else "v_prediction")
    root = base / "artifacts"
    run_stage(compose_cfg, root, "stage=import", f"source={folder}", "name=sd")
    out = base / "sd.safetensors"
    metrics = run_stage(compose_cfg, root, "stage=export", "format=single_file", "name=sd", f"out={out}")
    assert metrics["complete_pipeline"] is True and not metrics["notes"]  # tiny towers are CLIP (quick_gelu)
    return version, folder, root, out


def _equal_dicts(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _artifact_tensors(root: Path, name: str) -> dict[str, dict]:
    return {"vae": load_file(str(root / "autoencoder" / name / "model.safetensors")),
            "unet": load_file(str(root / "diffusion" / name / "model.safetensors")),
            "text": load_file(str(root / "diffusion" / name / "clip" / "model.safetensors"))}


def test_export_has_original_names_and_diffusers_reads_it(exported):
    """diffusers' own single-file loader (configs from the source folder, offline) gets the source's tensors."""
    from diffusers import StableDiffusionPipeline

    version, folder, _, out = exported
    keys = load_file(str(out)).keys()
    # the original U-Net puts an output block's upsampler after its attention (index 2), else at index 1; diffusers'
    # converter reads either, so this is checked by name (1 res block per level + 1 on the way up: block 1)
    upsampler = f"model.diffusion_model.output_blocks.1.{1 if version == 1 else 2}.conv.weight"
    assert upsampler in keys
    assert {k.split(".")[0] for k in keys} == {"first_stage_model", "model", "cond_stage_model"}
    assert {"model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.mid.attn_1.q.weight"} <= keys
    ref = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(folder), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    for part in ("unet", "vae", "text_encoder"):
        assert _equal_dicts(getattr(pipe, part).state_dict(), getattr(ref, part).state_dict()), part


def test_single_file_round_trip_bit_identical(exported, compose_cfg):
    """export → import (configs from the file's metadata): every tensor and the model's conventions equal."""
    from ldm_train.pipeline.artifacts import read_diffusion

    _, _, root, out = exported
    run_stage(compose_cfg, root, "stage=import", f"source={out}", "name=back")
    a, b = _artifact_tensors(root, "sd"), _artifact_tensors(root, "back")
    for part in a:
        assert _equal_dicts(a[part], b[part]), part
    sd, back = read_diffusion(root / "diffusion" / "sd")[0], read_diffusion(root / "diffusion" / "back")[0]
    for key in ("unet", "diffusion", "sampling", "resolution", "f"):
        assert sd[key] == back[key], key


def test_import_from_shapes_and_options(exported, tmp_path, compose_cfg):
    """A file without our metadata (as SD releases are): configs from the shapes, the import.* options and the
    given tokenizer give the same model as the diffusers folder."""
    from ldm_train.config import ConfigError
    from ldm_train.pipeline.artifacts import read_diffusion

    version, folder, root, out = exported
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(out)), str(bare))  # no metadata
    with pytest.raises(ConfigError, match="import.tokenizer="):
        run_stage(compose_cfg, tmp_path / "a", "stage=import", f"source={bare}", "name=x")
    assert not (tmp_path / "a" / "autoencoder").exists()
    run_stage(compose_cfg, tmp_path / "a", "stage=import", f"source={bare}", "name=x",
              f"import.tokenizer={folder / 'tokenizer'}", *TINY, *SHAPE_OPTIONS[version])
    a, b = _artifact_tensors(root, "sd"), _artifact_tensors(tmp_path / "a", "x")
    for part in a:
        assert _equal_dicts(a[part], b[part]), part
    sd, x = read_diffusion(root / "diffusion" / "sd")[0], read_diffusion(tmp_path / "a" / "diffusion" / "x")[0]
    for key in ("unet", "diffusion", "resolution"):
        assert sd[key] == x[key], key
    for key in ("timestep_spacing", "steps_offset", "final_alpha_one"):  # SD's scheduler: leading, 1, False
        assert sd["sampling"][key] == x["sampling"][key], key
    # import.config=<diffusers folder>: its configs and tokenizer, no other option needed
    run_stage(compose_cfg, tmp_path / "c", "stage=import", f"source={bare}", "name=x", f"import.config={folder}")
    assert _equal_dicts(a["unet"], _artifact_tensors(tmp_path / "c", "x")["unet"])


def test_sd_defaults_inferred():
    """Without options: SD 1.x (CLIP tower) → ε at 512 px; SD 2.x (OpenCLIP) → v at 768 px with fp32 attention."""
    from ldm_train.interop.single_file import _sd_defaults

    assert _sd_defaults("sd1", {}) == ("epsilon", 512, False)
    assert _sd_defaults("sd2", {"prediction_type": "auto"}) == ("v_prediction", 768, True)
    assert _sd_defaults("sd2", {"prediction_type": "eps", "resolution": 512}) == ("epsilon", 512, True)


def test_ckpt_and_bad_files(exported, tmp_path, compose_cfg):
    """.ckpt (a `state_dict` wrapper) through weights_only; a pickle with code refused unrun; an unexpected tensor
    listed; a VAE-only file imports as an autoencoder. Nothing is written on failure."""
    version, _, root, out = exported
    if version == 2:
        pytest.skip("the file handling is the same for both versions")
    state = load_file(str(out))
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": {**state, "betas": torch.linspace(0, 1, 5)}, "global_step": 3}, ckpt)
    ours = tmp_path / "ok"
    run_stage(compose_cfg, ours, "stage=import", f"source={ckpt}", "name=x", f"import.config={out.parent / 'pipe'}")
    assert _equal_dicts(_artifact_tensors(root, "sd")["vae"], _artifact_tensors(ours, "x")["vae"])

    marker = tmp_path / "code_ran"
    torch.save({"state_dict": state, "payload": _Payload(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeWeightsError, match="refused without being run"):
        run_stage(compose_cfg, tmp_path / "e", "stage=import", f"source={tmp_path / 'evil.ckpt'}", "name=x")
    assert not marker.exists() and not (tmp_path / "e" / "autoencoder").exists()

    extra = tmp_path / "extra.safetensors"
    save_file({**state, "model.diffusion_model.extra.weight": torch.zeros(2)}, str(extra),
              metadata=_metadata(out))
    with pytest.raises(KeyMismatchError, match=r"model\.diffusion_model\.extra\.weight"):
        run_stage(compose_cfg, tmp_path / "u", "stage=import", f"source={extra}", "name=x")
    assert not (tmp_path / "u" / "autoencoder").exists()

    vae_only = tmp_path / "vae.safetensors"
    save_file({k.removeprefix("first_stage_model."): v for k, v in state.items()
               if k.startswith("first_stage_model.")}, str(vae_only))
    metrics = run_stage(compose_cfg, tmp_path / "v", "stage=import", f"source={vae_only}", "name=vae",
                        "import.norm_groups=8", "import.resolution=64")
    assert metrics["diffusion"] is None
    assert _equal_dicts(_artifact_tensors(root, "sd")["vae"],
                        load_file(str(tmp_path / "v" / "autoencoder" / "vae" / "model.safetensors")))
    cal = json.loads((tmp_path / "v" / "autoencoder" / "vae" / "calibration.json").read_text())
    assert cal["scale_factor"] == 0.18215


class _Payload:
    """Unpickling this runs `open(marker, "w")`: the file appears if the loader executed the pickle's code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _metadata(path: Path) -> dict:
    from ldm_train.interop.weights import read_metadata

    return read_metadata(path)


def _open_clip_layout(model, prefix: str = "cond_stage_model.model.") -> dict:
    """A transformers CLIP text tower written out in OpenCLIP's names (fused in_proj, c_fc/c_proj, resblocks)."""
    sd, out = model.state_dict(), {}
    out[prefix + "token_embedding.weight"] = sd["embeddings.token_embedding.weight"]
    out[prefix + "positional_embedding"] = sd["embeddings.position_embedding.weight"]
    out[prefix + "ln_final.weight"], out[prefix + "ln_final.bias"] = (sd["final_layer_norm.weight"],
                                                                       sd["final_layer_norm.bias"])
    out[prefix + "text_projection"] = torch.randn(32, 32)
    for i in range(model.config.num_hidden_layers):
        a, b = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[b + f"attn.in_proj_{p}"] = torch.cat([sd[a + f"self_attn.{x}_proj.{p}"] for x in "qkv"])
            out[b + f"attn.out_proj.{p}"] = sd[a + f"self_attn.out_proj.{p}"]
            out[b + f"ln_1.{p}"], out[b + f"ln_2.{p}"] = sd[a + f"layer_norm1.{p}"], sd[a + f"layer_norm2.{p}"]
            out[b + f"mlp.c_fc.{p}"], out[b + f"mlp.c_proj.{p}"] = sd[a + f"mlp.fc1.{p}"], sd[a + f"mlp.fc2.{p}"]
    return out


def test_open_clip_tower_imports_without_its_last_layer(tmp_path):
    """SD 2.x files hold OpenCLIP's text tower: diffusers' converter (via ours) gives transformers' CLIP tower
    minus the final layer (SD 2.x conditions on the penultimate one), with the file's final LayerNorm."""
    from sd_tiny import tiny_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm_train.interop.single_file import Layout, _text_model

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    full = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=16,
                                        hidden_act="gelu"))
    state = _open_clip_layout(full)
    layout = Layout(None, {}, None, None, tmp_path / "tok", "test")
    model, _, used = _text_model(state, "sd2", layout, {"text_heads": 4})
    assert model.config.num_hidden_layers == 2 and model.config.hidden_act == "gelu"
    ref = {k: v for k, v in full.state_dict().items() if not k.startswith("encoder.layers.2.")}
    assert _equal_dicts(model.state_dict(), ref)
    assert used == set(state)  # every tensor accounted for (the last layer and text_projection as left out)


def test_calibration_keeps_stored_factor_and_records_measured(exported, tmp_path, compose_cfg):
    """calibration.json: the stored 0.18215 is the factor used; the one measured on the command's data (shapes
    validation images at the model's resolution) is recorded next to it and equals 1/std of diffusers' VAE mode."""
    from diffusers import AutoencoderKL

    from ldm_train.data.shapes import ShapesDataset
    from ldm_train.pipeline.first_stage import FirstStage

    version, folder, _, out = exported
    if version == 2:
        pytest.skip("one VAE layout")
    root = tmp_path / "m"
    run_stage(compose_cfg, root, "stage=import", f"source={out}", "name=x", "import.measure_samples=3",
              "autoencoder.calibration.latent=mode")
    cal = json.loads((root / "autoencoder" / "x" / "calibration.json").read_text())
    val = ShapesDataset(64, compose_cfg([]).data.val_size, "val", compose_cfg([]).data.seed)
    images = torch.stack([val[i]["image"] for i in range(3)])
    with torch.no_grad():
        z = AutoencoderKL.from_pretrained(folder / "vae").encode(images).latent_dist.mode().double()
    assert cal["measured"]["num_samples"] == 3 and "shapes" in cal["measured"]["on"]
    assert cal["measured"]["scale_factor"] == pytest.approx(1 / float(z.std()), rel=1e-4)
    assert cal["scale_factor"] == 0.18215 != pytest.approx(cal["measured"]["scale_factor"], rel=1e-3)
    assert FirstStage.from_artifact(root / "autoencoder" / "x").scale_factor == 0.18215


# the published diffusers configs of SD 1.5 and SD 2.1 (768, v), as far as the U-Net's structure goes
SD15 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False)
SD21 = dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
            upcast_attention=True)


@pytest.mark.parametrize("family,config", [("sd1", SD15), ("sd2", SD21)], ids=["sd15", "sd21"])
def test_full_size_configs_inferred_from_shapes(family, config, tmp_path):
    """Real SD 1.5 / 2.1 structures (built on the meta device: shapes only) written with the original names: the
    configs read off their shapes with the default options are the published ones."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    from ldm_train.interop.keys import original_unet, original_vae
    from ldm_train.interop.single_file import UNET, VAE, _layout

    vae_cfg = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**config), AutoencoderKL(**vae_cfg)
    up_attention = {i for i, t in enumerate(unet.config.up_block_types) if t.startswith("CrossAttn")}
    state = original_unet(unet.state_dict(), 2, up_attention, sfu.DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], UNET)
    state.update(original_vae(vae.state_dict(), 4, sfu.DIFFUSERS_TO_LDM_MAPPING["vae"], VAE))
    layout = _layout(state, family, {}, {}, tmp_path)
    for key, value in dict(unet.config).items():
        if key in ("_use_default_values", "_class_name", "_diffusers_version"):
            continue
        got = layout.unet[key]
        assert (list(got) if isinstance(got, tuple) else got) == (list(value) if isinstance(value, tuple) else
                                                                  value), key
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
        assert tuple(np.atleast_1d(layout.vae[key])) == tuple(np.atleast_1d(vae.config[key])), key
    assert layout.vae["scaling_factor"] == 0.18215 and layout.vae["sample_size"] == config["sample_size"] * 8
    assert layout.scheduler["prediction_type"] == ("epsilon" if family == "sd1" else "v_prediction")


def test_non_clip_text_encoder_exports_vae_and_unet_with_a_note(exported, tmp_path):
    """A model conditioned by another encoder (here `class`) is not an SD checkpoint: the file holds the VAE and
    the U-Net under their original names, and one note says so."""
    from ldm_train.interop.single_file import export_single_file
    from ldm_train.models.text import ClassEncoder
    from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline

    version, _, root, out = exported
    if version == 2:
        pytest.skip("one text path")
    pipe = LatentDiffusionPipeline.from_artifact(root / "diffusion" / "sd")
    pipe.text_encoder = ClassEncoder(num_classes=3, dim=32)
    pipe.config = {**pipe.config, "text_encoder": {"name": "class", "num_classes": 3, "dim": 32}}
    notes = export_single_file(pipe, tmp_path / "c.safetensors")
    assert len(notes) == 1 and "text_encoder=class" in notes[0] and "\n" not in notes[0]
    keys = load_file(str(tmp_path / "c.safetensors")).keys()
    assert {k.split(".")[0] for k in keys} == {"first_stage_model", "model"}
    assert keys == {k for k in load_file(str(out)) if not k.startswith("cond_stage_model.")}
