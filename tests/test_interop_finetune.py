"""Fine-tuning an imported Stable Diffusion model: `experiment=finetune_sd` (stage 2 from the artifact on an image
folder, the CLIP tower optionally trained) and SD's ft-MSE recipe for the VAE (`autoencoder.train_encoder=false`:
the encoder's weights and the stored scale factor stay)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).parent))
from sd_tiny import tiny_sd  # noqa: E402


@pytest.fixture(scope="module")
def imported(tmp_path_factory, compose_cfg):
    """Artifacts root holding `sd`, imported from a tiny random SD 1.x pipeline."""
    from ldm_train.__main__ import run

    base = tmp_path_factory.mktemp("finetune")
    tiny_sd(base / "pipe")
    root = base / "artifacts"
    run(compose_cfg(["stage=import", f"source={base / 'pipe'}", "name=sd", f"paths.artifacts={root}",
                     "logger=none", f"paths.run_dir={root / 'run'}", "import.measure_samples=0"]))
    return root


def _image_folder(root: Path, n: int = 12) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(["a red cat", "blue dog", "green sky"][i % 3])
    return root


def test_finetune_sd_config_and_lr_schedule(compose_cfg):
    """The recipe: 512 px, precision auto, gradient checkpointing, frozen text tower by default, and an LR of
    1e-5 that rises linearly from 1e-7 over the warm-up and then stays constant (hand-computed)."""
    from hydra.utils import instantiate

    cfg = compose_cfg(["experiment=finetune_sd", "diffusion.init_from=sd", "data=folder", "data.root=/x"])
    d = cfg.diffusion
    assert (cfg.stage, cfg.data.resolution, cfg.trainer.precision) == ("diffusion", 512, "auto")
    assert d.gradient_checkpointing is True and d.train_text_encoder is False and d.lr == 1e-5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=d.lr)
    sched = instantiate(d.lr_scheduler)(opt)
    lrs = []
    for _ in range(d.warmup_steps + 50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    w = d.warmup_steps
    assert lrs[0] == pytest.approx(1e-7)
    assert lrs[w // 2] == pytest.approx(1e-5 * (0.01 + 0.99 * (w // 2) / w))
    assert all(lr == pytest.approx(1e-5) for lr in lrs[w:])


def test_finetune_sd_two_steps_on_a_folder(imported, tmp_path, compose_cfg):
    """experiment=finetune_sd, 2 steps on a tiny image folder with the text tower trained: the U-Net and the
    tower move, the VAE is the imported one, and the written artifact loads."""
    from ldm_train.__main__ import run
    from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline

    root = imported
    folder = _image_folder(tmp_path / "images")
    run(compose_cfg(["experiment=finetune_sd", "diffusion.init_from=sd", "name=mine", "data=folder",
                     f"data.root={folder}", "data.resolution=64", "data.num_workers=0", "data.min_val_images=4",
                     "data.val_fraction=0.4",
                     "diffusion.max_steps=2", "diffusion.warmup_steps=1", "diffusion.batch_size=2",
                     "diffusion.val_every=2", "diffusion.val_n_per_prompt=1", "diffusion.lr=1e-3",
                     "diffusion.latent_std_range=[0.0,100.0]", "diffusion.ema_decay=0", "sampling.steps=2",
                     "diffusion.train_text_encoder=true", "logger=none", "trainer.accelerator=cpu",
                     f"paths.artifacts={root}", f"paths.run_dir={tmp_path / 'run'}"]))
    base = LatentDiffusionPipeline.from_artifact(root / "diffusion" / "sd")
    tuned = LatentDiffusionPipeline.from_artifact(root / "diffusion" / "mine")
    assert tuned.config["unet"]["gradient_checkpointing"] is True
    a, b = tuned.denoiser.state_dict(), base.denoiser.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in b)
    ta, tb = tuned.text_encoder.model.state_dict(), base.text_encoder.model.state_dict()
    assert any(not torch.equal(ta[k], tb[k]) for k in tb)
    assert tuned.first_stage.path.resolve() == (root / "autoencoder" / "sd").resolve()


def test_train_text_encoder_gets_gradients():
    """ClipTextEncoder.set_trainable: gradients flow into the tower (frozen: none, and cached)."""
    from sd_tiny import tiny_tokenizer
    from transformers import CLIPTextConfig

    from ldm_train.models.text import ClipTextEncoder

    tok = tiny_tokenizer(Path(__import__("tempfile").mkdtemp()) / "tok")
    enc = ClipTextEncoder.from_config(tok, CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                          num_hidden_layers=1, num_attention_heads=4,
                                                          max_position_embeddings=16), max_length=16)
    assert not enc.encode(["ab"]).requires_grad
    enc.set_trainable(True)
    enc.encode(["ab", "c"]).sum().backward()
    assert enc.training and all(p.grad is not None for p in enc.model.encoder.parameters())


def test_vae_decoder_only_finetune_keeps_encoder(imported, tmp_path, compose_cfg):
    """stage=autoencoder autoencoder.init_from=<imported> autoencoder.train_encoder=false: after training the
    encoder and quant_conv are bit-identical, the decoder moved, and the stored factor 0.18215 is kept (the
    factor measured on this run's data recorded beside it)."""
    import shutil

    from ldm_train.__main__ import run

    root = imported
    shutil.copytree(root / "autoencoder" / "sd", tmp_path / "autoencoder" / "sd")
    run(compose_cfg(["experiment=smoke", "stage=autoencoder", "autoencoder.init_from=sd", "data.resolution=64",
                     "autoencoder.train_encoder=false", "autoencoder.lr=1e-3", "autoencoder.max_steps=2",
                     "autoencoder.val_every=2", "autoencoder.val_batches=1", "autoencoder.batch_size=2",
                     "autoencoder.calibration.num_samples=4", "autoencoder.loss.disc_start=null",
                     f"paths.artifacts={tmp_path}", f"paths.run_dir={tmp_path / 'run'}"]))
    after, before = (load_file(str(tmp_path / "autoencoder" / n / "model.safetensors")) for n in ("kl_f8", "sd"))
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("decoder."))
    cal = json.loads((tmp_path / "autoencoder" / "kl_f8" / "calibration.json").read_text())
    assert cal["scale_factor"] == 0.18215 and cal["measured"]["num_samples"] == 4
