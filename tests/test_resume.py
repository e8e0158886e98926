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
from pathlib import Path

import pytest
import torch

from ldm_train.__main__ import run
from ldm_train.artifacts import ArtifactError, load_autoencoder

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
