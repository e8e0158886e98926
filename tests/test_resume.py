"""Resuming from Lightning checkpoints (`ckpt_path=`) in both stages, and refusing pickled code on load.

Stage 1 counts two optimizer steps per batch in `global_step`; stage 2 leaves the frozen first stage out of its
checkpoints and must carry its EMA (with its warm-up position) across a resume. Checkpoints are loaded with
`weights_only=True`, so a crafted pickle must fail before it can run anything.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import shutil
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from ldm_train.__main__ import run
from ldm_train.pipeline.artifacts import ArtifactError, load_autoencoder
from tests.conftest import STAGE1_COSINE

SMOKE_AE_STEPS = 12  # autoencoder.max_steps in experiment=smoke
SMOKE_DIFF_STEPS = 12  # diffusion.max_steps in experiment=smoke (val_every 6: checkpoints at 6 and 12)


def smoke(root: Path, artifacts: str, run_dir: str, *extra: str) -> list[str]:
    return ["experiment=smoke", "logger=none", f"paths.artifacts={root / artifacts}",
            f"paths.run_dir={root / run_dir}", *extra]


def last_ckpt(run_dir: Path) -> dict:
    path = run_dir / "checkpoints" / "last.ckpt"
    assert path.is_file(), f"no {path}; found {sorted(p.name for p in run_dir.rglob('*.ckpt'))}"
    return torch.load(path, weights_only=True, map_location="cpu")  # raises if anything needs full unpickling


def ema_updates(ckpt: dict) -> int:
    keys = [k for k in ckpt["state_dict"] if k.endswith("num_updates") and k.startswith("ema.")]
    assert keys == ["ema.num_updates"], keys
    return int(ckpt["state_dict"]["ema.num_updates"])


class _Payload:
    """Unpickling this calls `Path(marker).touch()`: harmless, but proof that the loader ran stored code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path(self.marker).touch, ())


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 0, "payload": _Payload(marker)}, path)
    return path


# ---------------------------------------------------------------------------------------------- stage 1


def test_autoencoder_resume_continues(compose_cfg, tmp_path):
    run(compose_cfg(smoke(tmp_path, "a1", "r1", "stage=autoencoder")))
    ckpt = last_ckpt(tmp_path / "r1")
    assert ckpt["global_step"] == 2 * SMOKE_AE_STEPS  # generator + discriminator step per batch
    states = ckpt["optimizer_states"]
    assert len(states) == 2
    for state in states:  # Adam moments exist for every stepped parameter of both optimizers
        assert state["state"], "optimizer state is empty"
        assert all("exp_avg" in s for s in state["state"].values())
    assert any(k.startswith("autoencoder.") for k in ckpt["state_dict"])
    assert any(k.startswith("loss.discriminator.") for k in ckpt["state_dict"])

    more = SMOKE_AE_STEPS + 4
    metrics = run(compose_cfg(smoke(tmp_path, "a2", "r2", "stage=autoencoder",
                                    f"ckpt_path={tmp_path / 'r1' / 'checkpoints' / 'last.ckpt'}",
                                    f"autoencoder.max_steps={more}")))
    saved = json.loads((tmp_path / "a2" / "autoencoder" / "kl_f4" / "metrics.json").read_text())
    assert saved["steps"] == metrics["steps"] == more  # a restart would also stop at 16 …
    # … so also check that only the remaining batches ran: a restart would checkpoint at global step 6 (and keep
    # going) and validate at batches 6 and 12; the resumed run starts at global step 24 / batch 12
    resumed = last_ckpt(tmp_path / "r2")
    assert 2 * SMOKE_AE_STEPS < resumed["global_step"] <= 2 * more
    recon = sorted(p.name for p in (tmp_path / "r2" / "recon").glob("step_*.png"))
    assert recon and all(int(n[5:12]) > SMOKE_AE_STEPS for n in recon), recon


# ---------------------------------------------------------------------------------------------- stage 2


def test_diffusion_resume_continues_with_ema(compose_cfg, smoke_autoencoder, tmp_path):
    ae = f"autoencoder.path={smoke_autoencoder['artifact']}"
    run(compose_cfg(smoke(tmp_path, "a1", "r1", "stage=diffusion", ae)))
    ckpt = last_ckpt(tmp_path / "r1")
    assert ckpt["global_step"] == SMOKE_DIFF_STEPS
    sd = ckpt["state_dict"]
    assert not [k for k in sd if k.startswith("first_stage.")]
    assert any(k.startswith("ema.module.unet.") for k in sd)
    assert any(k.startswith("unet.") for k in sd)
    assert ema_updates(ckpt) == SMOKE_DIFF_STEPS  # one EMA update per optimizer step, all in the checkpoint
    assert ckpt["lr_schedulers"][0]["last_epoch"] == SMOKE_DIFF_STEPS

    more = SMOKE_DIFF_STEPS + 6  # a multiple of val_every, so the final step is checkpointed
    metrics = run(compose_cfg(smoke(tmp_path, "a2", "r2", "stage=diffusion", ae,
                                    f"ckpt_path={tmp_path / 'r1' / 'checkpoints' / 'last.ckpt'}",
                                    f"diffusion.max_steps={more}")))
    saved = json.loads((tmp_path / "a2" / "diffusion" / "kl_f4" / "metrics.json").read_text())  # name=kl_f4
    assert saved["steps"] == metrics["steps"] == more
    resumed = last_ckpt(tmp_path / "r2")
    assert resumed["global_step"] == more
    assert ema_updates(resumed) == more  # restored at 12 and continued, not restarted at 0
    assert not [k for k in resumed["state_dict"] if k.startswith("first_stage.")]
    samples = sorted(p.name for p in (tmp_path / "r2" / "samples").glob("step_*.png"))
    assert samples == [f"step_{more:07d}.png"], samples  # only the post-resume validation ran


# ---------------------------------------------------------------------------------------------- unsafe pickles


def test_crafted_payload_really_runs_code_when_unpickled(tmp_path):
    """Guards the tests below: the payload does execute under a full (unsafe) unpickle."""
    marker = tmp_path / "ran"
    path = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    with open(path, "rb") as fh:
        assert b"touch" in fh.read()
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert not marker.exists()


def test_resume_refuses_pickled_code(compose_cfg, tmp_path):
    marker = tmp_path / "pwned"
    evil = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(Exception) as info:
        run(compose_cfg(smoke(tmp_path, "a", "r", "stage=autoencoder", f"ckpt_path={evil}")))
    text = "".join(str(e) for e in (info.value, info.value.__cause__, info.value.__context__) if e is not None)
    assert any(s in text for s in ("weights_only", "Unsupported global", "Weights only")), text
    assert not marker.exists()
    assert not (tmp_path / "a" / "autoencoder").exists()  # nothing trained or written


def test_autoencoder_artifact_refuses_pickle_weights(smoke_autoencoder, tmp_path):
    marker = tmp_path / "pwned"
    artifact = shutil.copytree(smoke_autoencoder["artifact"], tmp_path / "kl_f4")
    crafted_checkpoint(artifact / "model.safetensors", marker)
    with pytest.raises(ArtifactError, match="safetensors"):
        load_autoencoder(artifact, expect_f=4, expect_regularizer="kl")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- exact resume
# Run K steps uninterrupted; run again, send SIGTERM during step k, resume from the checkpoint the signal wrote:
# the losses of steps k+1 … K and the final weights and optimizer states must be identical. The data spans several
# epochs (a short train set), and stage 1 reads an image folder with random crops and flips in 2 worker processes,
# so data order, per-sample augmentation, RNG, optimizers, schedulers, EMA, discriminator and logvar all matter.


class _SignalAt(Callback):
    """Raises `sig` in this process as training step `step` starts (stage 1 counts two optimizer steps a batch)."""

    def __init__(self, step: int, sig: int, per_batch: int):
        self.step, self.sig, self.per_batch = step, sig, per_batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step // self.per_batch == self.step:
            signal.raise_signal(self.sig)


def _record_run(monkeypatch, stage_module, cfg, losses: dict, interrupt: int | None = None, per_batch: int = 1):
    original = stage_module.build_trainer

    def build(*args, **kwargs):
        trainer = original(*args, **kwargs)
        if interrupt is not None:
            trainer.callbacks.append(_SignalAt(interrupt, signal.SIGTERM, per_batch))
        return trainer

    monkeypatch.setattr(stage_module, "build_trainer", build)
    try:
        run(cfg)
        return "finished"
    except SystemExit as exc:
        assert exc.code == 0
        return "preempted"
    finally:
        monkeypatch.setattr(stage_module, "build_trainer", original)


def _image_folder(root: Path, n: int = 48, sizes: tuple[tuple[int, int], ...] = ((24, 28),)) -> Path:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    root.mkdir()
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        arr = (torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"image {i}")
    return root


def _assert_same_final_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for pid, state in sa["state"].items():
            for name, value in state.items():
                assert torch.equal(value, sb["state"][pid][name]), (pid, name)
    assert a["lr_schedulers"] == b["lr_schedulers"]


@pytest.mark.parametrize("buckets", [False, pytest.param(True, marks=pytest.mark.slow)])  # slow: make test-all
def test_autoencoder_resume_is_exact(compose_cfg, monkeypatch, tmp_path, buckets):
    from ldm_train.losses.autoencoder_loss import AutoencoderLoss
    from ldm_train.stages import autoencoder as stage

    # buckets: 16x40, 24x28 and 40x16 (h x w) images land in the 12x24, 16x16 and 24x12 buckets (f=4)
    sizes = ((16, 40), (24, 28), (40, 16)) if buckets else ((24, 28),)
    folder, steps, k = _image_folder(tmp_path / "images", 24, sizes), 8, 5  # k: in the 2nd epoch, after disc_start
    common = ["stage=autoencoder", "data=folder", f"data.root={folder}", "data.resolution=16", "data.random_crop=true",
              "data.flip=true", "data.num_workers=2", STAGE1_COSINE, "trainer.deterministic=true",
              "autoencoder.batch_size=4", f"autoencoder.max_steps={steps}", "autoencoder.val_every=4",
              "autoencoder.loss.disc_start=3", "data.min_val_images=1", f"data.aspect_buckets={buckets}"]
    # 23 training images at batch 4: 5 batches an epoch (with buckets: 8 + 8 + 7 images → 2 + 2 + 1 batches)
    losses: dict[str, dict] = {"full": {}, "part": {}}
    current, shapes = {"run": "full"}, set()
    g_loss, d_loss = AutoencoderLoss.generator_loss, AutoencoderLoss.discriminator_loss

    def record_g(self, x, xrec, reg_log, step, last_layer):
        loss, logs = g_loss(self, x, xrec, reg_log, step, last_layer)
        losses[current["run"]][("g", step)] = loss.item()
        if self.training:
            shapes.add(tuple(x.shape[-2:]))
        return loss, logs

    def record_d(self, x, xrec, step):
        loss, logs = d_loss(self, x, xrec, step)
        if loss is not None:
            losses[current["run"]][("d", step)] = loss.item()
        return loss, logs

    monkeypatch.setattr(AutoencoderLoss, "generator_loss", record_g)
    monkeypatch.setattr(AutoencoderLoss, "discriminator_loss", record_d)
    assert _record_run(monkeypatch, stage, compose_cfg(smoke(tmp_path, "a1", "full", *common)), losses) == "finished"
    current["run"] = "part"
    cfg = compose_cfg(smoke(tmp_path, "a2", "part", *common))
    assert _record_run(monkeypatch, stage, cfg, losses, interrupt=k, per_batch=2) == "preempted"
    assert last_ckpt(tmp_path / "part")["global_step"] == 2 * (k + 1)  # saved at the end of the signalled batch
    assert not (tmp_path / "a2" / "autoencoder").exists()  # a preempted run writes no artifact
    part = dict(losses["part"])
    losses["part"] = {}
    cfg = compose_cfg(smoke(tmp_path, "a2", "resumed", *common, "ckpt_path=last"))  # finds part/…/last.ckpt
    assert _record_run(monkeypatch, stage, cfg, losses) == "finished"

    full, resumed = losses["full"], losses["part"]
    assert {s for _, s in resumed} == set(range(k + 1, steps))
    if buckets:
        hist = json.loads((tmp_path / "full" / "buckets.json").read_text())  # 23: one image is held out
        assert sum(hist.values()) == 23 and {k for k, v in hist.items() if v} == {"24x12", "16x16", "12x24"}
        assert shapes == {(12, 24), (16, 16), (24, 12)}  # every training batch came at one bucket's size
    assert {key: full[key] for key in part} == part
    assert {key: full[key] for key in resumed} == resumed
    assert any(kind == "d" for kind, _ in resumed)
    _assert_same_final_state(last_ckpt(tmp_path / "full"), last_ckpt(tmp_path / "resumed"))


def test_diffusion_resume_is_exact(compose_cfg, smoke_autoencoder, monkeypatch, tmp_path):
    from ldm_train.lit.diffusion import DiffusionModule
    from ldm_train.stages import diffusion as stage

    # k: the signal's checkpoint is taken just before the validation at step 4, which draws random numbers (its
    # loader's seed) in the uninterrupted run only
    steps, k = 8, 3
    common = ["stage=diffusion", f"autoencoder.path={smoke_autoencoder['artifact']}", "data.train_size=20",
              "diffusion.batch_size=4", f"diffusion.max_steps={steps}", "diffusion.val_every=4",
              "trainer.deterministic=true", "diffusion.cfg_dropout=0.3"]  # 5 batches an epoch
    losses: dict[str, dict] = {"full": {}, "part": {}}
    current = {"run": "full"}
    training_step = DiffusionModule.training_step

    def record(self, batch, batch_idx):
        loss = training_step(self, batch, batch_idx)
        losses[current["run"]][self.global_step] = loss.item()
        return loss

    monkeypatch.setattr(DiffusionModule, "training_step", record)
    assert _record_run(monkeypatch, stage, compose_cfg(smoke(tmp_path, "a1", "full", *common)), losses) == "finished"
    current["run"] = "part"
    assert _record_run(monkeypatch, stage, compose_cfg(smoke(tmp_path, "a2", "part", *common)), losses,
                       interrupt=k) == "preempted"
    part = dict(losses["part"])
    losses["part"] = {}
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    assert last_ckpt(tmp_path / "part")["global_step"] == k + 1
    assert _record_run(monkeypatch, stage, compose_cfg(smoke(tmp_path, "a2", "resumed", *common,
                                                             f"ckpt_path={ckpt}")), losses) == "finished"

    full, resumed = losses["full"], losses["part"]
    assert sorted(resumed) == list(range(k + 1, steps))
    assert {s: full[s] for s in part} == part
    assert {s: full[s] for s in resumed} == resumed
    _assert_same_final_state(last_ckpt(tmp_path / "full"), last_ckpt(tmp_path / "resumed"))
