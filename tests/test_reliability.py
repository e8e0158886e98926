"""Reliability: non-finite steps skipped and counted, preemption by a real signal, ckpt_path rules, start-up errors.

Exact resume itself is tested in test_resume.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm_train.__main__ import run
from ldm_train.config import ConfigError, resolved_arch, validate
from ldm_train.data.resumable import ResumableSampler
from ldm_train.lit.checkpoints import CheckpointError, find_last_checkpoint, resolve_checkpoint
from ldm_train.lit.nonfinite import NonFiniteError, NonFiniteGuard, guard_step, step_is_finite
from ldm_train.lit.resume import ResumeCallback

ROOT = Path(__file__).resolve().parent.parent


def smoke(root: Path, run_dir: str, *extra: str) -> list[str]:
    return ["experiment=smoke", "logger=none", f"paths.artifacts={root / 'artifacts'}",
            f"paths.run_dir={root / run_dir}", *extra]


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


def adam_steps(ckpt: dict, index: int) -> set[int]:
    return {int(s["step"]) for s in ckpt["optimizer_states"][index]["state"].values()}


def nonfinite_state(ckpt: dict) -> dict:
    return next(v for k, v in ckpt["callbacks"].items() if "NonFiniteGuard" in k)


# ---------------------------------------------------------------------------------------------- finiteness check


def test_step_is_finite_looks_at_losses_and_every_gradient():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    (a.sum() * 2).backward()
    assert step_is_finite([torch.tensor(1.0), None], [a, b])  # b has no gradient: nothing to check
    assert not step_is_finite([torch.tensor(float("nan"))], [a, b])
    b.grad = torch.tensor([0.0, float("inf")])
    assert not step_is_finite([torch.tensor(1.0)], [a, b])
    b.grad = torch.tensor([float("nan"), 1.0])
    assert not step_is_finite([], [a, b])


def test_fused_optimizers_skip_a_bad_step_on_the_device(monkeypatch):
    """With fused optimizers the guard never reads the flag on the host: the steps skip themselves (found_inf) and
    the EMA takes a 0 weight and does not count; a good step then moves both as the plain formulas say."""
    from types import SimpleNamespace

    from ldm_train.diffusion.ema import EMA

    def guarded_step(decays: list):
        with monkeypatch.context() as m:  # no host read of a tensor inside the guard, the step and the EMA update
            m.setattr(torch.Tensor, "__bool__", lambda self: pytest.fail("host read of a device flag"))
            m.setattr(torch.Tensor, "item", lambda self: pytest.fail("host read of a device flag"))
            ok = guard_step(module, [torch.tensor(1.0)], [opt])
            opt.step()
            decays.append(ema.update(model, ok))
        return ok

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    module = SimpleNamespace(_trainer=None, global_step=0)
    before = [p.detach().clone() for p in model.parameters()]

    model(torch.randn(4, 3)).sum().backward()
    model.weight.grad[0, 0] = float("nan")
    ok = guarded_step([])
    assert int(ok) == 0 and int(ema.num_updates) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before, ema.module.parameters()))
    assert all(int(state["step"]) == 0 for state in opt.state.values())

    opt.zero_grad()
    model(torch.randn(4, 3)).sum().backward()
    decays = []
    ok = guarded_step(decays)
    decay = decays[0]
    assert int(ok) == 1 and int(ema.num_updates) == 1 and float(decay) == pytest.approx(2 / 11)
    for e, b, p in zip(ema.module.parameters(), before, model.parameters()):  # ema = d·ema + (1 − d)·p
        torch.testing.assert_close(e, 2 / 11 * b + 9 / 11 * p.detach())
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_device_counters_catch_a_run_of_bad_steps_between_reads(tmp_path):
    """Flags 1,0,0,1 between two reads with max 2: the run of 2 ended before the read, which still stops the run."""
    cb = NonFiniteGuard(tmp_path, max_nonfinite_steps=2)
    for flag in (1, 0, 0, 1):
        cb.record_step_on_device(torch.tensor(flag, dtype=torch.int32))
    with pytest.raises(NonFiniteError, match="2 optimizer steps in a row"):
        cb.read_counts(4)
    assert (cb.nonfinite_total, cb.nonfinite_in_a_row) == (2, 0)
    cb = NonFiniteGuard(tmp_path, max_nonfinite_steps=3)
    for flag in (0, 0, 1, 0):
        cb.record_step_on_device(torch.tensor(flag, dtype=torch.int32))
    cb.read_counts(4)  # runs of 2 and 1: below 3
    for flag in (0, 0):  # with the trailing bad step before the read: 3 in a row across the read
        cb.record_step_on_device(torch.tensor(flag, dtype=torch.int32))
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row"):
        cb.read_counts(6)
    assert cb.nonfinite_total == 5


def test_resumable_sampler_skips_the_consumed_part_of_its_epoch():
    data = list(range(10))
    sampler = ResumableSampler(data, seed=3)
    sampler.set_epoch(2)
    whole = list(sampler)
    assert sorted(i for i, _ in whole) == data
    assert [i for i, _ in whole] != [i for i, _ in ResumableSampler(data, seed=3)]  # epoch changes the order
    sampler.skip = 4
    assert list(sampler) == whole[4:]  # same indices and the same per-sample seeds
    assert list(sampler) == whole  # the skip applies once
    assert len(sampler) == 10


# ---------------------------------------------------------------------------------------------- non-finite steps


def test_diffusion_nonfinite_steps_are_skipped_then_stop(compose_cfg, smoke_autoencoder, monkeypatch, tmp_path):
    """Bad steps 1, 5, 6 with max_nonfinite_steps=2: step 1 is skipped, the run stops at step 6 with the
    checkpoint of step 4 kept, in which exactly 3 good steps reached the weights, Adam and the EMA."""
    from ldm_train.lit.diffusion import DiffusionModule

    loss_fn, calls = DiffusionModule.diffusion_loss, {"n": 0}

    def poisoned(self, z0, context, generator=None, size_cond=None):
        loss = loss_fn(self, z0, context)
        if self.training:
            calls["n"] += 1
            if calls["n"] - 1 in (1, 5, 6):
                return loss * float("nan")
        return loss

    monkeypatch.setattr(DiffusionModule, "diffusion_loss", poisoned)
    cfg = compose_cfg(smoke(tmp_path, "r", "stage=diffusion", f"autoencoder.path={smoke_autoencoder['artifact']}",
                            "diffusion.max_steps=8", "diffusion.val_every=4", "trainer.max_nonfinite_steps=2"))
    with pytest.raises(NonFiniteError) as info:
        run(cfg)
    last = tmp_path / "r" / "checkpoints" / "last.ckpt"
    message = str(info.value)
    for needle in ("2 optimizer steps in a row", "max_nonfinite_steps=2", str(last), "lower the learning rate",
                   "ckpt_path=last"):
        assert needle in message, (needle, message)
    ckpt = load(last)
    assert ckpt["global_step"] == 4
    assert nonfinite_state(ckpt) == {"nonfinite_total": 1, "nonfinite_in_a_row": 0}
    assert int(ckpt["state_dict"]["ema.num_updates"]) == 3
    assert adam_steps(ckpt, 0) == {3}
    assert all(v.isfinite().all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "artifacts" / "diffusion").exists()


def test_autoencoder_nonfinite_step_skips_both_optimizers(compose_cfg, monkeypatch, tmp_path):
    from ldm_train.losses.autoencoder_loss import AutoencoderLoss

    g_loss = AutoencoderLoss.generator_loss

    def poisoned(self, x, xrec, reg_log, step, last_layer, size_cond=None):
        loss, logs = g_loss(self, x, xrec, reg_log, step, last_layer)
        return (loss * float("nan"), logs) if step in (1, 5) else (loss, logs)

    monkeypatch.setattr(AutoencoderLoss, "generator_loss", poisoned)
    metrics = run(compose_cfg(smoke(tmp_path, "r", "autoencoder.max_steps=8", "autoencoder.val_every=4",
                                    "autoencoder.batch_size=4", "autoencoder.loss.disc_start=3")))
    ckpt = load(tmp_path / "r" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 16 and metrics["steps"] == 8  # skipped steps still count as steps
    assert adam_steps(ckpt, 0) == {6}  # generator: 8 batches − 2 skipped
    assert adam_steps(ckpt, 1) == {4}  # discriminator: batches 3…7 − batch 5 (its own loss was finite)
    assert nonfinite_state(ckpt)["nonfinite_total"] == 2
    assert all(v.isfinite().all() for v in ckpt["state_dict"].values() if v.is_floating_point())


# ---------------------------------------------------------------------------------------------- preemption


def test_sigusr1_saves_a_checkpoint_and_exits_cleanly(smoke_autoencoder, tmp_path):
    """A real process gets SIGUSR1 (SLURM's warning signal; its default action would kill the process)."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "ldm_train", "experiment=smoke", "stage=diffusion", "logger=none",
           f"autoencoder.path={smoke_autoencoder['artifact']}", f"paths.artifacts={tmp_path / 'a'}",
           "diffusion.max_steps=100000", "diffusion.val_every=4", f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert last.exists(), proc.communicate(timeout=60)[0] if proc.poll() is not None else "no checkpoint in time"
    first = load(last)["global_step"]
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert "by SIGUSR1: saved" in out and "Traceback" not in out, out
    step = load(last)["global_step"]
    assert first < step < 100000
    assert re.search(rf"at step {step}\b", out), out
    assert not (tmp_path / "a" / "diffusion").exists()  # no artifact from an interrupted run


def test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command(smoke_autoencoder, tmp_path, compose_cfg):
    """Ctrl-C in a terminal: SIGINT to the whole process group. The run saves last.ckpt at the end of the batch,
    exits with 130 and prints a resume command with the user's own overrides that finds that checkpoint."""
    import shlex

    typed = ["experiment=smoke", "stage=diffusion", "logger=none", f"autoencoder.path={smoke_autoencoder['artifact']}",
             f"paths.artifacts={tmp_path / 'a'}", "diffusion.max_steps=100000", "diffusion.val_every=4", "seed=1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "ldm_train", *typed], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while not list(tmp_path.glob("outputs/*/*/*/checkpoints/last.ckpt")) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.5)
    found = list(tmp_path.glob("outputs/*/*/*/checkpoints/last.ckpt"))
    assert found, proc.communicate(timeout=60)[0] if proc.poll() is not None else "no checkpoint in time"
    last = found[0]
    first = load(last)["global_step"]
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 130, out
    assert "Traceback" not in out, out
    step = load(last)["global_step"]
    assert first < step < 100000
    match = re.search(rf"interrupted at step {step} by SIGINT: saved {re.escape(str(last))}; resume with (.*)", out)
    assert match, out
    command = shlex.split(match.group(1))
    assert command[:3] == ["python", "-m", "ldm_train"]
    assert command[3:] == ["stage=diffusion", *[o for o in typed if o != "stage=diffusion"], "ckpt_path=last"]
    # the suggested command, run from the same folder (a new sibling run folder), resumes from that checkpoint
    sibling = last.parent.parent.parent / "later"
    cfg = compose_cfg([*command[3:], f"paths.run_dir={sibling}"])
    assert resolve_checkpoint(cfg) == str(last)
    assert not (tmp_path / "a" / "diffusion").exists()  # no artifact from an interrupted run


# ---------------------------------------------------------------------------------------------- ckpt_path


def _ckpt(path: Path, stage: str | None = "diffusion", mtime: float | None = None, hydra_stage: str | None = None):
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, **({"ldm_train": {"stage": stage}} if stage else {})}, path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    if hydra_stage:
        (path.parent.parent / ".hydra").mkdir()
        (path.parent.parent / ".hydra" / "config.yaml").write_text(f"stage: {hydra_stage}\nname: kl_f4\n")
    return path


def test_ckpt_path_last_takes_the_newest_run_of_the_same_stage_and_name(tmp_path):
    runs = tmp_path / "outputs" / "diffusion" / "kl_f4"
    _ckpt(runs / "t1" / "checkpoints" / "last.ckpt", mtime=1000)
    newest = _ckpt(runs / "t2" / "checkpoints" / "last.ckpt", mtime=2000, hydra_stage="diffusion")
    _ckpt(runs / "t3" / "checkpoints" / "last.ckpt", mtime=3000, hydra_stage="autoencoder")  # another stage
    assert find_last_checkpoint(runs / "t4", "diffusion", "kl_f4") == newest


def test_ckpt_path_errors_name_the_fix(compose_cfg, tmp_path):
    def resolve(*extra):
        return resolve_checkpoint(compose_cfg(smoke(tmp_path, "runs/now", *extra)))

    with pytest.raises(CheckpointError, match="Start without ckpt_path"):
        resolve("stage=diffusion", "ckpt_path=last")
    with pytest.raises(CheckpointError, match="no such file"):
        resolve("stage=diffusion", f"ckpt_path={tmp_path / 'missing.ckpt'}")
    other = _ckpt(tmp_path / "runs" / "before" / "checkpoints" / "last.ckpt", stage="autoencoder")
    with pytest.raises(CheckpointError, match="resume it with stage=autoencoder"):
        resolve("stage=diffusion", f"ckpt_path={other}")
    assert resolve("stage=autoencoder", "ckpt_path=last") == str(other)
    with pytest.raises(ConfigError, match="resume the interrupted stage on its own"):
        resolve("stage=pipeline", f"ckpt_path={other}")


def _sibling_run(compose_cfg, runs: Path, folder: str, mtime: float, *overrides: str) -> Path:
    """A finished stage-2 run next to the others: checkpoints/last.ckpt and Hydra's .hydra/config.yaml (the
    composed, unresolved config, as Hydra writes it)."""
    from omegaconf import OmegaConf

    ckpt = _ckpt(runs / folder / "checkpoints" / "last.ckpt", mtime=mtime)
    cfg = compose_cfg(smoke(runs.parent, f"runs/{folder}", "stage=diffusion", *overrides))
    (runs / folder / ".hydra").mkdir()
    OmegaConf.save(cfg, runs / folder / ".hydra" / "config.yaml")
    return ckpt


def test_ckpt_path_last_skips_a_run_with_another_config(compose_cfg, tmp_path, caplog):
    """A smoke checkpoint next to a full-size run is not resumed; the log names the keys that differ."""
    runs = tmp_path / "runs"
    same = _sibling_run(compose_cfg, runs, "t1", 1000)
    _sibling_run(compose_cfg, runs, "t2", 2000, "unet.model_channels=32", "data.resolution=32")
    longer = ["stage=diffusion", "ckpt_path=last", "diffusion.max_steps=99"]  # a longer run resumes legitimately
    with caplog.at_level("INFO"):
        assert resolve_checkpoint(compose_cfg(smoke(tmp_path, "runs/now", *longer))) == str(same)
    assert "skipped 1 newer checkpoint(s) with another config" in caplog.text
    assert "data.resolution: 32 → 16; unet.model_channels: 32 → 16" in caplog.text

    with pytest.raises(CheckpointError) as err:  # no run has this config: the newest one is named
        resolve_checkpoint(compose_cfg(smoke(tmp_path, "runs/now", "stage=diffusion", "ckpt_path=last",
                                             "unet.model_channels=64")))
    message = str(err.value)
    assert "\n" not in message and "t2/checkpoints/last.ckpt, differs in data.resolution: 32 → 16; " \
        "unet.model_channels: 32 → 64" in message
    assert "start without ckpt_path" in message


def test_a_checkpoint_of_another_architecture_fails_in_one_line(compose_cfg):
    """Resuming weights of another shape: one line naming the first keys, not one line per key."""
    from ldm_train.lit.autoencoder import AutoencoderModule

    def module(*overrides):
        cfg = compose_cfg(["experiment=smoke", *overrides])
        loss = OmegaConf.to_container(cfg.autoencoder.loss, resolve=True)
        return AutoencoderModule(resolved_arch(cfg), loss, 1e-6, 1e-3,
                                 OmegaConf.to_container(cfg.autoencoder.optimizer, resolve=True), channels_last=False)

    ours, theirs = module(), module("autoencoder.ch=32")
    state = theirs.state_dict()
    with pytest.raises(CheckpointError) as err:
        ours.on_load_checkpoint({"state_dict": state})
    message = str(err.value)
    n = sum(tuple(v.shape) != tuple(ours.state_dict()[k].shape) for k, v in state.items())
    assert n > 10 and "\n" not in message and f"weights {n} with another shape" in message
    assert "autoencoder.encoder.conv_in.weight: [32, 3, 3, 3] in the checkpoint, [16, 3, 3, 3] here" in message
    ours.on_load_checkpoint({"state_dict": module().state_dict()})  # a fitting checkpoint passes


# ---------------------------------------------------------------------------------------------- errors at start


def test_image_size_must_fit_f_times_unet_downsampling(compose_cfg):
    with pytest.raises(ConfigError, match=re.escape("use data.resolution=16 or 24")):
        validate(compose_cfg(["experiment=smoke", "stage=diffusion", "data.resolution=20"]))


def test_unet_in_channels_must_match_the_latents():
    from omegaconf import OmegaConf

    from ldm_train.config import CONF_DIR
    from ldm_train.pipeline.latent_diffusion import build_denoiser as build_unet

    unet = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "unet" / "tiny.yaml"))
    unet["context_dim"] = 8
    with pytest.raises(ConfigError, match="remove the override"):
        build_unet({**unet, "in_channels": 4}, latent_channels=3, context_dim=8)
    assert build_unet(unet, latent_channels=3, context_dim=8).in_channels == 3


# ---------------------------------------------------------------------------------------------- nothing half-written


def test_png_write_failing_midway_keeps_the_previous_image(tmp_path, monkeypatch):
    from PIL import Image

    from ldm_train.utils.images import save_grid

    path = save_grid(torch.zeros(2, 3, 8, 8), tmp_path / "samples" / "grid.png", nrow=2)
    before = path.read_bytes()
    real_write = os.fdopen

    def half_then_fail(fd, mode="r", *args, **kwargs):
        fh = real_write(fd, mode, *args, **kwargs)
        write = fh.write

        def broken(data):
            write(data[: len(data) // 2])
            raise OSError("disk full")

        fh.write = broken
        return fh

    monkeypatch.setattr(os, "fdopen", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_grid(torch.ones(2, 3, 8, 8), path, nrow=2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    Image.open(path).load()  # still a complete PNG
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary file left behind


def _preempt_rank(rank: int, init_file: str, out_dir: str) -> None:
    """One gloo rank; only rank 0 received the signal. The ranks must agree, and only at logging steps."""
    import json
    from types import SimpleNamespace

    import torch.distributed as dist

    for key in ("RANK", "WORLD_SIZE"):
        os.environ.pop(key, None)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cb = ResumeCallback("diffusion", out_dir)
        cb._signal = signal.SIGUSR1 if rank == 0 else None
        answers = []
        for logging_step in (False, False, True):
            trainer = SimpleNamespace(_logger_connector=SimpleNamespace(should_update_logs=logging_step),
                                      strategy=SimpleNamespace(root_device=torch.device("cpu")))
            answers.append(cb._interrupted(trainer))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(answers))
    finally:
        dist.destroy_process_group()


def test_ddp_preemption_is_agreed_at_logging_steps(tmp_path, monkeypatch):
    import json

    import torch.multiprocessing as mp

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    mp.spawn(_preempt_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    answers = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert answers == [[False, False, True], [False, False, True]]  # rank 1 learns of rank 0's signal, together
