"""Stable Diffusion interop: `stage=import` of a tiny random diffusers SD pipeline equals diffusers' own modules;
the key table both ways; bad folders (missing / unexpected / mis-shaped keys, a pickle holding code) are refused
with nothing written."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).parent))
from sd_tiny import tiny_sd  # noqa: E402

from ldm_train.interop.keys import KeyMismatchError, autoencoder_table, to_ours, to_theirs, unet_table  # noqa: E402
from ldm_train.interop.weights import UnsafeWeightsError  # noqa: E402


@pytest.fixture(scope="module", params=[1, 2], ids=["sd1", "sd2"])
def sd(request, tmp_path_factory):
    """(folder, diffusers pipeline) of a tiny random SD 1.x or 2.x (v-prediction) pipeline."""
    folder = tmp_path_factory.mktemp(f"sd{request.param}") / "pipe"
    pipe = tiny_sd(folder, version=request.param,
                   prediction_type="epsilon" if request.param == 1 else "v_prediction")
    return folder, pipe


def import_stage(compose_cfg, source: Path, root: Path, name: str = "sd", *extra: str) -> dict:
    from ldm_train.__main__ import run

    return run(compose_cfg(["stage=import", f"source={source}", f"name={name}", f"paths.artifacts={root}",
                            "logger=none", f"paths.run_dir={root / 'run'}", *extra]))


@pytest.fixture(scope="module")
def imported(sd, tmp_path_factory, compose_cfg):
    from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline

    folder, _ = sd
    root = tmp_path_factory.mktemp("artifacts")
    import_stage(compose_cfg, folder, root)
    return root, LatentDiffusionPipeline.from_artifact(root / "diffusion" / "sd")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_unet_equals_diffusers(sd, imported):
    _, ref = sd
    _, pipe = imported
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
    t = torch.tensor([3, 801])
    with torch.no_grad():
        ours, theirs = pipe.denoiser(x, t, ctx), ref.unet(x, t, encoder_hidden_states=ctx).sample
    assert theirs.abs().max() > 0.1  # live residual branches: zero-initialised tensors were randomised
    assert rel(ours, theirs) <= 1e-5


def test_vae_equals_diffusers(sd, imported):
    _, ref = sd
    root, pipe = imported
    g = torch.Generator().manual_seed(1)
    img, z = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, torch.randn(2, 4, 8, 8, generator=g)
    ae = pipe.first_stage.autoencoder
    with torch.no_grad():
        assert rel(ae.encode_moments(img), ref.vae.encode(img).latent_dist.parameters) <= 1e-5
        assert rel(ae.decode(z), ref.vae.decode(z).sample) <= 1e-5
    cal = json.loads((root / "autoencoder" / "sd" / "calibration.json").read_text())
    assert cal["scale_factor"] == pipe.first_stage.scale_factor == ref.vae.config.scaling_factor == 0.18215
    assert "scaling_factor" in cal["source"] and "vae/config.json" in cal["source"]


def test_text_encoder_equals_diffusers(sd, imported):
    _, ref = sd
    _, pipe = imported
    prompts = ["a red cat", ""]
    ours = pipe.text_encoder.encode(prompts)
    with torch.no_grad():
        theirs = ref.encode_prompt(prompts, "cpu", 1, False)[0]  # what StableDiffusionPipeline conditions on
    assert ours.shape == theirs.shape == (2, 16, 32)
    assert rel(ours, theirs) <= 1e-5
    assert torch.equal(pipe.text_encoder.null(1)[0], ours[1])


def test_imported_conventions(sd, imported):
    folder, ref = sd
    _, pipe = imported
    unet, sampling = pipe.config["unet"], pipe.config["sampling"]
    assert unet["flip_sin_to_cos"] is True and pipe.config["f"] == 8 and pipe.resolution == 64
    assert pipe.parameterization.name == ("eps" if ref.unet.config.upcast_attention is False else "v")
    assert (sampling["timestep_spacing"], sampling["steps_offset"]) == ("leading", 1)
    if ref.unet.config.use_linear_projection:  # SD 2.x: a fixed head width, so the head count grows
        assert (unet["num_heads"], unet["num_head_channels"], unet["upcast_attention"]) == (None, 8, True)
        heads = {m.attn1.heads for m in pipe.denoiser.modules() if hasattr(m, "attn1")}
        assert heads == {4, 8}
    else:
        assert (unet["num_heads"], unet["upcast_attention"]) == (4, False)


@pytest.mark.parametrize("kind", ["unet", "vae"])
def test_key_table_round_trip(sd, kind):
    """diffusers → ours → diffusers is the identity, bit for bit, for every tensor (and the table is a bijection)."""
    from ldm_train.interop.configs import unet_from_diffusers, vae_from_diffusers
    from ldm_train.models.autoencoder import Autoencoder
    from ldm_train.models.unet import UNet

    _, ref = sd
    if kind == "unet":
        cfg, interop = unet_from_diffusers(dict(ref.unet.config))
        ours = UNet(**cfg)
        table, theirs = unet_table(ours, interop["use_linear_projection"]), ref.unet.state_dict()
    else:
        ours = Autoencoder(vae_from_diffusers(dict(ref.vae.config))[0])
        table, theirs = autoencoder_table(ours), ref.vae.state_dict()
    converted = to_ours(theirs, table, ours.state_dict(), kind)
    assert set(converted) == set(ours.state_dict())
    back = to_theirs(converted, table)
    assert set(back) == set(theirs)
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)
    names = [t for e in table for t in e.theirs]
    assert len(names) == len(set(names))


def _broken_copy(folder: Path, tmp_path: Path, edit) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    weights = bad / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    edit(state)
    save_file(state, str(weights))
    return bad


@pytest.mark.parametrize("edit, message", [
    (lambda s: [s.pop(k) for k in [k for k in s if k.startswith("mid_block.attentions")][:11]],
     r"11 missing: mid_block\.attentions\.0\..*\(3 more\)"),
    (lambda s: s.update({"extra.weight": torch.zeros(1), "add_embedding.linear_1.bias": torch.zeros(2)}),
     r"2 unexpected: add_embedding\.linear_1\.bias, extra\.weight"),
    (lambda s: s.update({"conv_in.weight": torch.zeros(32, 4, 1, 1)}),
     r"1 with the wrong shape: conv_in\.weight: file \(32, 4, 1, 1\), expected \(32, 4, 3, 3\)"),
], ids=["missing", "unexpected", "shape"])
def test_bad_keys_listed_and_nothing_written(sd, tmp_path, compose_cfg, edit, message):
    folder, _ = sd
    bad = _broken_copy(folder, tmp_path, edit)
    root = tmp_path / "artifacts"
    with pytest.raises(KeyMismatchError, match=message):
        import_stage(compose_cfg, bad, root)
    assert not (root / "autoencoder").exists() and not (root / "diffusion").exists()


class _Payload:
    """Unpickling this runs `open(marker, "w")`: the file appears if the loader executed the pickle's code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_with_code_refused_without_running(sd, tmp_path, compose_cfg):
    folder, _ = sd
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    weights = bad / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    weights.unlink()
    marker = tmp_path / "code_ran"
    torch.save({**state, "payload": _Payload(marker)}, bad / "vae" / "diffusion_pytorch_model.bin")
    root = tmp_path / "artifacts"
    with pytest.raises(UnsafeWeightsError, match="refused without being run"):
        import_stage(compose_cfg, bad, root)
    assert not marker.exists()
    assert not (root / "autoencoder").exists()


def test_tensor_only_bin_imports(sd, tmp_path, compose_cfg):
    """A plain `.bin` (tensors only) goes through torch.load(weights_only=True) and imports the same weights."""
    folder, _ = sd
    bin_copy = tmp_path / "bin"
    shutil.copytree(folder, bin_copy)
    weights = bin_copy / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), bin_copy / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    root = tmp_path / "artifacts"
    import_stage(compose_cfg, bin_copy, root)
    ref = tmp_path / "ref"
    import_stage(compose_cfg, folder, ref)
    a, b = (load_file(str(r / "diffusion" / "sd" / "model.safetensors")) for r in (root, ref))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_existing_artifact_not_overwritten(sd, imported, compose_cfg):
    from ldm_train.config import ConfigError

    folder, _ = sd
    root, _ = imported
    before = (root / "diffusion" / "sd" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(ConfigError, match="overwrite=true"):
        import_stage(compose_cfg, folder, root)
    assert (root / "diffusion" / "sd" / "model.safetensors").stat().st_mtime_ns == before


def test_import_needs_source(compose_cfg, tmp_path):
    from ldm_train.config import ConfigError

    stage = importlib.import_module("ldm_train.stages.import")
    with pytest.raises(ConfigError, match="source="):
        stage.run(compose_cfg(["stage=import", f"paths.artifacts={tmp_path}"]))


@pytest.fixture(scope="module")
def exported(sd, imported, tmp_path_factory, compose_cfg):
    from ldm_train.__main__ import run

    root, _ = imported
    out = tmp_path_factory.mktemp("export") / "sd_out"
    metrics = run(compose_cfg(["stage=export", "name=sd", f"out={out}", f"paths.artifacts={root}", "logger=none",
                               f"paths.run_dir={root / 'run'}"]))
    assert metrics["complete_pipeline"] is True
    return out


def test_export_round_trips_the_weights(sd, exported):
    """import → export gives back every tensor of the source folder, bit for bit."""
    folder, _ = sd
    for part in ("unet", "vae"):
        a = load_file(str(folder / part / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(exported / part / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    config = json.loads((exported / "scheduler" / "scheduler_config.json").read_text())
    assert (config["timestep_spacing"], config["steps_offset"], config["set_alpha_to_one"]) == ("leading", 1, False)


def test_exported_pipeline_generates_our_images(exported, imported):
    """diffusers loads the export offline and, from the same initial noise, samples the images stage=sample does."""
    from diffusers import StableDiffusionPipeline

    _, pipe = imported
    ref = StableDiffusionPipeline.from_pretrained(exported, local_files_only=True)
    prompts, seed, steps = ["a red cat", "blue dog"], 5, 10
    ours = pipe.generate(prompts, sampler="ddim", steps=steps, guidance_scale=7.5, seed=seed)  # [-1, 1]
    latents = torch.randn((2, *pipe.first_stage.latent_shape(pipe.resolution)),
                          generator=torch.Generator().manual_seed(seed))  # what generate() draws first
    with torch.no_grad():
        theirs = ref(prompts, num_inference_steps=steps, guidance_scale=7.5, latents=latents, output_type="pt").images
    assert theirs.shape == ours.shape
    assert float((ours * 0.5 + 0.5 - theirs).abs().max()) <= 1e-4


def _init_overrides(root: Path, *extra: str) -> list[str]:
    return ["experiment=smoke", "stage=diffusion", "diffusion.init_from=sd", "name=tuned", "data.resolution=64",
            "diffusion.max_steps=1", "diffusion.lr=0", "diffusion.warmup_steps=0", "diffusion.batch_size=2",
            "diffusion.val_every=1", "diffusion.latent_std_range=[0.0,100.0]", "diffusion.ema_decay=0.5",
            f"paths.artifacts={root}", f"paths.run_dir={root / 'run_tuned'}", *extra]


def test_diffusion_init_from_imported(imported, tmp_path):
    """stage=diffusion diffusion.init_from=<imported>: its VAE, U-Net, CLIP tower and schedule; with lr=0 the
    written artifact holds exactly the imported weights."""
    from hydra import compose, initialize_config_dir

    from ldm_train.__main__ import run
    from ldm_train.config import CONF_DIR, ConfigError

    root, pipe = imported
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=_init_overrides(root))
        bad = compose("config", overrides=_init_overrides(root, "f=4"), return_hydra_config=True)
    run(cfg)
    from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline

    tuned = LatentDiffusionPipeline.from_artifact(root / "diffusion" / "tuned")
    assert tuned.config["f"] == 8 and tuned.config["text_encoder"]["name"] == "clip_l"
    assert tuned.parameterization.name == pipe.parameterization.name
    a, b = tuned.denoiser.state_dict(), pipe.denoiser.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    with pytest.raises(ConfigError, match="f=4 on the command line, but .* has f=8"):
        run(bad)


def test_autoencoder_init_from_imported(imported, tmp_path):
    """stage=autoencoder autoencoder.init_from=<imported VAE>: its f=8 architecture and weights (lr=0 keeps them
    exactly); a disagreeing command-line f= is refused."""
    from hydra import compose, initialize_config_dir
    from safetensors.torch import load_file

    from ldm_train.__main__ import run
    from ldm_train.config import CONF_DIR, ConfigError

    root, pipe = imported
    if pipe.parameterization.name == "v":
        pytest.skip("one VAE layout: tested with the SD 1.x import")
    overrides = ["experiment=smoke", "stage=autoencoder", "autoencoder.init_from=sd", "data.resolution=64",
                 "autoencoder.lr=0", "autoencoder.max_steps=1", "autoencoder.val_every=1", "autoencoder.val_batches=1",
                 "autoencoder.batch_size=2", "autoencoder.calibration.num_samples=4",
                 f"paths.artifacts={tmp_path}", f"paths.run_dir={tmp_path / 'run'}"]
    shutil.copytree(root / "autoencoder" / "sd", tmp_path / "autoencoder" / "sd")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
        bad = compose("config", overrides=[*overrides, "f=4"], return_hydra_config=True)
    run(cfg)
    a, b = (load_file(str(tmp_path / "autoencoder" / n / "model.safetensors")) for n in ("kl_f8", "sd"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="f=4 on the command line"):
        run(bad)


def test_only_a_diffusers_kind_of_autoencoder_exports():
    """The regularizer says whether diffusers' AutoencoderKL holds it: a VQ first stage is refused by name, by the
    one check both export formats go through (`vae_to_diffusers`)."""
    from ldm_train.config import ConfigError
    from ldm_train.interop.configs import vae_to_diffusers

    kl = dict(in_channels=3, ch=16, ch_mult=[1, 2, 4], num_res_blocks=1, z_channels=3, num_groups=8, resolution=32,
              attn_resolutions=[], regularizer={"name": "kl"})
    assert vae_to_diffusers(kl, 0.5)["latent_channels"] == 3
    vq = {**kl, "regularizer": {"name": "vq"}}
    with pytest.raises(ConfigError, match="this model's first stage is vq"):
        vae_to_diffusers(vq, 0.5)


def test_a_pooled_text_unet_exports_as_a_projection_class_embedding(compose_cfg):
    """unet.pooled_text (the quickstart's) is diffusers' class_embed_type="projection" called with
    class_labels=prompt_embeds.mean(1): the exported UNet2DConditionModel gives our outputs, and its tensors take the
    original (single-file) names that diffusers' own converter maps back."""
    import diffusers
    from diffusers.loaders import single_file_utils as sfu
    from omegaconf import OmegaConf

    from ldm_train.interop.configs import unet_to_diffusers
    from ldm_train.interop.keys import original_unet
    from ldm_train.interop.single_file import UNET
    from ldm_train.pipeline.latent_diffusion import build_denoiser

    unet_cfg = OmegaConf.to_container(compose_cfg(["experiment=quickstart"]).unet, resolve=True)
    assert unet_cfg["pooled_text"]
    torch.manual_seed(0)
    ours = build_denoiser(unet_cfg, 3, unet_cfg["context_dim"]).eval()
    with torch.no_grad():
        for p in ours.parameters():  # zero-initialised output layers would hide a wrong mapping
            p.add_(torch.randn_like(p) * 0.05)
    kwargs = unet_to_diffusers({**unet_cfg, "in_channels": 3}, {}, 8)
    assert kwargs["class_embed_type"] == "projection"
    theirs = diffusers.UNet2DConditionModel(**kwargs).eval()
    theirs.load_state_dict(to_theirs(ours.state_dict(), unet_table(ours, theirs.config.use_linear_projection)),
                           strict=True)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 5, unet_cfg["context_dim"], generator=g)
    t = torch.tensor([3, 801])
    with torch.no_grad():
        a = ours(x, t, ctx)
        b = theirs(x, t, encoder_hidden_states=ctx, class_labels=ctx.mean(1)).sample
        other = theirs(x, t, encoder_hidden_states=ctx, class_labels=ctx[:, :1].mean(1)).sample
    assert rel(a, b) <= 1e-5
    assert rel(other, b) > 1e-3  # the pooled caption does reach the output
    top = {**sfu.DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], **sfu.DIFFUSERS_TO_LDM_MAPPING["unet"]["class_embed_type"]}
    up_attention = {i for i, kind in enumerate(theirs.config.up_block_types) if kind.startswith("CrossAttn")}
    original = original_unet(theirs.state_dict(), theirs.config.layers_per_block, up_attention, top, UNET)
    assert UNET + "label_emb.0.0.weight" in original
    back = sfu.convert_ldm_unet_checkpoint(original, theirs.config)
    assert back.keys() == theirs.state_dict().keys()
    assert torch.equal(back["class_embedding.linear_2.weight"], ours.text_embed[2].weight)


def test_export_refuses_a_unet_with_tensors_diffusers_has_no_place_for(imported):
    """A size-conditioned U-Net's size embedding has no UNet2DConditionModel counterpart: export names it (it
    stopped with a bare StopIteration from the key table)."""
    import copy

    from ldm_train.interop.diffusers_export import diffusers_modules

    _, pipe = imported
    pipe = copy.copy(pipe)
    pipe.denoiser = copy.deepcopy(pipe.denoiser)
    pipe.denoiser.size_embed = torch.nn.Sequential(torch.nn.Linear(6, 8))
    with pytest.raises(KeyMismatchError, match=r"2 tensors .*size_embed.0.weight.*size_conditioning=true"):
        diffusers_modules(pipe)
