"""`python tests/ddp_probe.py <overrides>`: `python -m ldm_train` with a recorder, for tests/test_ddp_runs.py.

Each process (rank) writes $LDM_PROBE_DIR/rank<r>.json with what the DDP tests compare across ranks and against
a 1-process run: per training step, fingerprints of the synchronised gradients (stage 1: generator and
discriminator), the rank's own λ and loss, the loss logged for the global batch, hashes of the images it trained
on, the noise/t/CFG-dropout draws (stage 2); at the end of each stage, fingerprints of the weights (and the EMA);
the calibration it computed; and which rank wrote artifacts and checkpoints. Lightning's launcher re-runs this
script for the other ranks, so they are recorded too.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ldm_train import __main__ as cli
from ldm_train.lit import diffusion as lit_diffusion
from ldm_train.pipeline.latent_diffusion import LatentDiffusionPipeline
from ldm_train.stages import autoencoder as stage1
from ldm_train.stages import diffusion as stage2
from ldm_train.stages import pipeline

RECORD: dict = {"stage1": [], "stage2": [], "writes": [], "calibration": [], "end": {}}


def fingerprint(tensors) -> list[float]:
    """~64 values spread over the concatenated tensors, plus their norm: enough to tell two copies apart."""
    parts = [t.detach().float().flatten().cpu() for t in tensors if t is not None]
    if not parts:
        return []
    flat = torch.cat(parts)
    return flat[:: max(1, flat.numel() // 64)].tolist() + [float(flat.norm())]


def image_hashes(images: torch.Tensor) -> list[str]:
    return [hashlib.sha1(x.cpu().numpy().tobytes()).hexdigest()[:16] for x in images]


class Probe(L.Callback):
    def __init__(self, stage: str):
        self.stage, self.local = stage, {}

    def on_fit_start(self, trainer, module):
        RECORD["end"][f"{self.stage}_init"] = fingerprint(module.parameters())
        RECORD["world_size"], RECORD["rank"] = trainer.world_size, trainer.global_rank
        if self.stage == "stage1":
            original = module.loss.generator_loss

            def generator_loss(*args, **kwargs):
                loss, logs = original(*args, **kwargs)
                if module.training:
                    self.local = {"local_loss": float(loss), "local_lambda": float(logs.get("disc_lambda", -1))}
                return loss, logs

            module.loss.generator_loss = generator_loss
            RECORD["lr"] = module.lr
        else:
            q_sample = module.parameterization.schedule.q_sample

            def recorded(z0, t, noise):
                if module.training:
                    self.local.update(t=t.tolist(), noise=noise.flatten()[:8].tolist())
                return q_sample(z0, t, noise)

            module.parameterization.schedule.q_sample = recorded

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        entry = dict(self.local, images=image_hashes(batch["image"]), size=list(batch["image"].shape[-2:]),
                     logged_loss=float(trainer.callback_metrics["train/loss"]))
        if self.stage == "stage1":
            entry["g_grad"] = fingerprint(p.grad for p in module.autoencoder.parameters())
            entry["d_grad"] = fingerprint(p.grad for p in module.loss.discriminator.parameters())
        RECORD[self.stage].append(entry)
        self.local = {}

    def on_train_end(self, trainer, module):
        RECORD["end"][f"{self.stage}_weights"] = fingerprint(module.parameters())
        if self.stage == "stage2":
            RECORD["end"]["ema"] = fingerprint(module.ema.parameters())
            RECORD["end"]["ema_updates"] = int(module.ema.num_updates)


def with_probe(build_trainer, stage: str):
    def build(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        trainer.callbacks.append(Probe(stage))
        return trainer
    return build


def recording_writes(fn, name: str):
    def wrapped(*args, **kwargs):
        RECORD["writes"].append(name)
        return fn(*args, **kwargs)
    return wrapped


def recording_calibration(fn):
    def wrapped(*args, **kwargs):
        cal = fn(*args, **kwargs)
        RECORD["calibration"].append(cal)
        return cal
    return wrapped


def cfg_drop_mask_recorded(original):
    def wrapped(*args, **kwargs):
        mask = original(*args, **kwargs)
        RECORD.setdefault("cfg_drop", []).append(mask.int().tolist())
        return mask
    return wrapped


def dump() -> None:
    out = Path(os.environ["LDM_PROBE_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{RECORD.get('rank', 0)}.json").write_text(json.dumps(RECORD))


if __name__ == "__main__":
    stage1.build_trainer = with_probe(stage1.build_trainer, "stage1")
    stage2.build_trainer = with_probe(stage2.build_trainer, "stage2")
    stage1.calibrate_module = recording_calibration(stage1.calibrate_module)
    stage1.save_autoencoder = recording_writes(stage1.save_autoencoder, "autoencoder_artifact")
    # the diffusion artifact is written by the pipeline object (stages/diffusion.py: trained.save)
    LatentDiffusionPipeline.save = recording_writes(LatentDiffusionPipeline.save, "diffusion_artifact")
    cli.write_run_metrics = recording_writes(cli.write_run_metrics, "pipeline_metrics")
    pipeline.sample_stage.run = recording_writes(pipeline.sample_stage.run, "samples")
    TorchCheckpointIO.save_checkpoint = recording_writes(TorchCheckpointIO.save_checkpoint, "checkpoint")
    lit_diffusion.cfg_drop_mask = cfg_drop_mask_recorded(lit_diffusion.cfg_drop_mask)
    atexit.register(dump)
    cli.main()
