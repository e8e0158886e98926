"""A new user's mistakes: one line `error: …`, exit status 2, no traceback, no empty run folder left behind;
start-up checks of paths, data sizes and sampler settings; suggested commands that keep the user's overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_train.commands import suggest_command
from ldm_train.config import ConfigError, validate
from ldm_train.errors import USER_ERROR_EXIT, UserError
from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parent.parent


def cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m ldm_train experiment=smoke <overrides>` launched in `tmp_path`, as a user would."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "ldm_train", "experiment=smoke",
                           f"paths.artifacts={tmp_path / 'artifacts'}", *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def image_folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((20, 20, 3), 5 * i, np.uint8)).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"image {i}")
    return root


# ---------------------------------------------------------------------------------------------- one line, exit 2


@pytest.mark.parametrize(("overrides", "message"), [
    (("f=3",), "error: invalid f=3: valid downsampling factors are"),
    (("stage=sample", "sampling.sampler=lms"),
     "error: unknown sampler sampling.sampler='lms'; valid: auto, ddpm, ddim, dpmpp_2m, euler, heun"),
    (("stage=diffusion",), "error: no autoencoder artifact at"),
])
def test_a_mistake_prints_one_line_and_exits_2(tmp_path, overrides, message):
    result = cli(tmp_path, *overrides)
    assert result.returncode == USER_ERROR_EXIT, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    # the run folder of a run that failed its checks is gone, and so are the empty folders above it
    assert not (tmp_path / "outputs").exists(), list((tmp_path / "outputs").rglob("*"))


def test_the_train_it_first_command_keeps_the_users_overrides(tmp_path):
    result = cli(tmp_path, "stage=diffusion", "seed=3")
    expected = (f"python -m ldm_train stage=autoencoder experiment=smoke paths.artifacts={tmp_path / 'artifacts'} "
                "seed=3 f=4 regularizer=kl")
    assert f"train it first with `{expected}`" in result.stderr, result.stderr


def test_unexpected_errors_keep_their_traceback(monkeypatch, tmp_path):
    import ldm_train.__main__ as entry

    cfg = compose_cfg(["experiment=smoke", f"paths.run_dir={tmp_path / 'run'}"])
    (tmp_path / "run").mkdir()

    def bug(cfg):
        raise KeyError("a bug")

    monkeypatch.setattr(entry, "run", bug)
    with pytest.raises(KeyError):
        entry.main.__wrapped__(cfg)
    assert (tmp_path / "run").is_dir()  # only a failed check's folder is removed

    def mistake(cfg):
        raise ConfigError("wrong")

    monkeypatch.setattr(entry, "run", mistake)
    with pytest.raises(SystemExit) as exit_info:
        entry.main.__wrapped__(cfg)
    assert exit_info.value.code == USER_ERROR_EXIT


def test_every_user_error_shares_one_base():
    from ldm_train.data.health import SkipFractionError
    from ldm_train.data.latents import CacheError
    from ldm_train.evaluation.features import FeatureNetworkError
    from ldm_train.lit.checkpoints import CheckpointError
    from ldm_train.pipeline.artifacts import ArtifactError
    from ldm_train.pipeline.first_stage import LatentStdError

    for cls in (ConfigError, SkipFractionError, CacheError, FeatureNetworkError, CheckpointError, ArtifactError,
                LatentStdError):
        assert issubclass(cls, UserError), cls


def test_a_run_folder_with_results_is_kept(tmp_path, monkeypatch):
    from ldm_train.__main__ import remove_empty_run_dir

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "outputs" / "autoencoder" / "kl_f4" / "t1"
    (run / ".hydra").mkdir(parents=True)
    (run / "ldm_train.log").write_text("")
    (run / "checkpoints").mkdir()
    assert not remove_empty_run_dir(run) and run.is_dir()
    (run / "checkpoints").rmdir()
    (tmp_path / "outputs" / "autoencoder" / "kl_f4" / "t0").mkdir()  # an earlier run: the parents stay
    assert remove_empty_run_dir(run) and not run.exists()
    assert (tmp_path / "outputs" / "autoencoder" / "kl_f4").is_dir()


# ---------------------------------------------------------------------------------------------- start-up checks


def checked(*overrides: str) -> None:
    validate(compose_cfg(["experiment=smoke", *overrides]))


def test_a_small_folder_is_refused_with_the_fraction_that_fits(tmp_path):
    folder = image_folder(tmp_path / "imgs", 40)
    with pytest.raises(ConfigError, match=r"holds 40 images: data.val_fraction=0.02 holds out 1 .*"
                                          r"Fix: data.val_fraction=0.2 \(8 of 40\)"):
        checked("data=folder", f"data.root={folder}")
    checked("data=folder", f"data.root={folder}", "data.val_fraction=0.2")
    with pytest.raises(ConfigError, match="no such folder"):
        checked("data=folder", f"data.root={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="needs data.root="):
        checked("data=folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        checked("data=folder", f"data.root={empty}")


def test_sampling_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="unknown sampler"):
        checked("stage=sample", "sampling.sampler=lms")
    with pytest.raises(ConfigError, match=r"strength=1.5 is outside \[0, 1\]"):
        checked("stage=sample", "strength=1.5")
    with pytest.raises(ConfigError, match="init_image=.*no such file"):
        checked("stage=sample", f"init_image={tmp_path / 'x.png'}")
    with pytest.raises(ConfigError, match="sampler 'lms' does not apply to diffusion.objective=ddpm"):
        checked("stage=diffusion", "sampling.sampler=lms")  # validation grids sample with it too


def test_shards_must_exist_and_feed_every_reader(tmp_path):
    urls = f"'{tmp_path}/train-{{000000..000001}}.tar'"
    with pytest.raises(ConfigError, match=r"2 of 2 shards do not exist"):
        checked("data=webdataset", f"data.urls={urls}")
    for i in range(2):
        (tmp_path / f"train-{i:06d}.tar").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"2 shard\(s\) for 1 rank\(s\) × 3 worker\(s\) = 3 readers.*"
                                          r"data.num_workers=2, or write smaller shards \(python -m "
                                          r"ldm_train.data.make_shards --shard-size"):
        checked("data=webdataset", f"data.urls={urls}", "data.num_workers=3")
    checked("data=webdataset", f"data.urls={urls}", "data.num_workers=2")


def test_latent_cache_shards_name_the_cache_option(tmp_path, smoke_autoencoder):
    (tmp_path / "train-000000.tar").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"cache.shard_size="):
        checked("stage=diffusion", "data=latents", f"data.urls={tmp_path}/train-000000.tar", "data.num_workers=2",
                f"autoencoder.path={smoke_autoencoder['artifact']}")


# ---------------------------------------------------------------------------------------------- suggested commands


def test_suggested_commands_repeat_the_users_overrides():
    typed = ["experiment=smoke", "stage=sample", "prompt=[a,b]", "f=8", "ckpt_path=last", "data=folder",
             "data.root=/my images"]
    # a stage switch drops the keys only the other stage has (prompt), and ckpt_path; quoting survives the shell
    assert suggest_command("stage=autoencoder", "f=4", overrides=typed) == (
        "python -m ldm_train stage=autoencoder experiment=smoke data=folder 'data.root=/my images' f=4")
    # choosing another data group drops the keys of the old one
    assert suggest_command("stage=diffusion", "data=latents", "data.urls=x.tar", overrides=typed) == (
        "python -m ldm_train stage=diffusion experiment=smoke f=8 data=latents data.urls=x.tar")
    assert suggest_command("ckpt_path=last", overrides=["experiment=smoke", "stage=diffusion", "ckpt_path=a.ckpt"]) \
        == "python -m ldm_train stage=diffusion experiment=smoke ckpt_path=last"


# ---------------------------------------------------------------------------------------------- progress


def test_the_progress_bar_counts_the_steps_the_user_asked_for(caplog, monkeypatch):
    """Stage 1: Lightning counts 2 optimizer steps a batch; the bar shows batches out of autoencoder.max_steps, the
    reconstruction loss, and one log line projects the stage's time from the steps after the first."""
    from types import SimpleNamespace

    from ldm_train.lit import progress

    clock = iter(range(100))
    monkeypatch.setattr(progress.time, "perf_counter", lambda: 2.0 * next(clock))  # 2 s per step
    trainer = SimpleNamespace(global_step=0, is_global_zero=True, progress_bar_metrics={"bar/rec": 0.125})
    bar = progress.StepProgress("stage 1", max_steps=50, steps_per_batch=2, refresh_every=5)
    bar.on_train_start(trainer, None)
    with caplog.at_level("INFO"):
        for _ in range(12):
            trainer.global_step += 2
            bar.on_train_batch_end(trainer, None, None, None, 0)
    assert (bar._bar.n, bar._bar.total) == (12, 50)
    text = str(bar._bar)
    assert text.startswith("step 12/50 · ") and "rec=0.125" in text and "ETA" in text
    # steps 1 → 11 took 20 s: 2 s/step; 39 steps remain: 78 s
    assert "stage 1: 2.00 s/step over steps 1–11; projected 1m18s for the remaining 39 of 50 steps" in caplog.text
    assert "on the CPU" not in caplog.text
    bar.teardown(trainer, None, "fit")


def test_a_days_long_cpu_stage_is_called_out(caplog, monkeypatch):
    from types import SimpleNamespace

    import torch

    from ldm_train.lit import progress

    clock = iter(range(100))
    monkeypatch.setattr(progress.time, "perf_counter", lambda: 5.0 * next(clock))  # 5 s per step
    trainer = SimpleNamespace(global_step=0, is_global_zero=True, progress_bar_metrics={},
                              strategy=SimpleNamespace(root_device=torch.device("cpu")))
    bar = progress.StepProgress("stage 1", max_steps=50000, bar=False)
    with caplog.at_level("INFO"):
        for _ in range(12):
            trainer.global_step += 1
            bar.on_train_batch_end(trainer, None, None, None, 0)
    assert "stage 1 would train for 69h25m on the CPU. On a CPU try experiment=quickstart" in caplog.text


def test_durations_read_as_a_person_would_write_them():
    from ldm_train.lit.progress import format_duration

    assert [format_duration(s) for s in (12, 245, 6 * 3600 + 12 * 60 + 5)] == ["12s", "4m05s", "6h12m"]


def test_logger_tensorboard_needs_its_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a))
    with pytest.raises(ConfigError, match="logger=tensorboard needs the tensorboard package: `pip install"):
        checked("logger=tensorboard")


def test_help_says_what_ldm_train_is_and_what_to_try_first(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "ldm_train", "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120).stdout
    assert out.startswith("ldm_train: train Latent Diffusion Models in two stages")
    stages = [out.index(f"stage={s} ") for s in ("autoencoder", "cache_latents", "diffusion", "sample")]
    assert stages == sorted(stages)  # in the order they run
    assert "experiment=smoke stage=pipeline" in out and "data: folder, latents, shapes, webdataset" in out
    assert "Powered by Hydra" not in out


# ---------------------------------------------------------------------------------------------- one's own data


def test_validation_prompts_come_from_the_users_data(tmp_path):
    """Own data: captions drawn (seeded) from the validation split, never the shapes captions; shapes keeps its
    own four (smoke: the first); prompts the user set are kept."""
    from ldm_train.data import build_datasets
    from ldm_train.data.prompts import validation_prompts

    root = tmp_path / "imgs"
    image_folder(root, 40)
    cfg = compose_cfg(["experiment=smoke", "data=folder", f"data.root={root}", "data.val_fraction=0.25",
                       "diffusion.val_num_prompts=3"])
    _, val = build_datasets(cfg.data)
    held_out = {f"image {int(Path(val.dataset.files[i]).stem)}" for i in val.indices}
    drawn = validation_prompts(cfg.data, cfg.diffusion, val)
    assert len(drawn) == len(set(drawn)) == 3 and set(drawn) <= held_out
    assert validation_prompts(cfg.data, cfg.diffusion, val) == drawn  # seeded: the same every run
    cfg.data.seed = 1  # another split and another draw
    _, val1 = build_datasets(cfg.data)
    assert validation_prompts(cfg.data, cfg.diffusion, val1) != drawn

    shapes = compose_cfg([])
    assert validation_prompts(shapes.data, shapes.diffusion, None) == [
        "a red circle on the left", "a blue square at the top", "a green triangle on the right",
        "a yellow circle in the center"]
    smoke = compose_cfg(["experiment=smoke"])
    assert validation_prompts(smoke.data, smoke.diffusion, None) == ["a red circle on the left"]
    mine = compose_cfg(["experiment=smoke", "data=folder", f"data.root={root}", "diffusion.val_prompts=[a dog]"])
    assert validation_prompts(mine.data, mine.diffusion, val) == ["a dog"]


def test_smoke_does_not_force_the_shapes_feature_network_on_other_data(tmp_path, monkeypatch):
    """experiment=smoke on a folder: eval.features=auto wants FID's Inception (or eval.features=none), never the
    shapes network, whose Fréchet distance means nothing on other images."""
    from ldm_train.evaluation import features
    from ldm_train.evaluation.features import FeatureNetworkError, resolve_features

    monkeypatch.setattr(features, "inception_available", lambda *a: False)  # as offline, whatever is installed
    cfg = compose_cfg(["experiment=smoke", "data=folder", f"data.root={tmp_path}"])
    with pytest.raises(FeatureNetworkError, match="InceptionV3"):
        resolve_features(cfg.eval.features, cfg.data.name, tmp_path / "missing.safetensors", None,
                         train_if_missing=False)
    shapes = compose_cfg(["experiment=smoke"])
    with pytest.raises(FeatureNetworkError, match="no shapes feature network"):  # shapes data still uses it
        resolve_features(shapes.eval.features, shapes.data.name, tmp_path / "missing.safetensors", None,
                         train_if_missing=False)


def test_logger_tensorboard_works_after_make_setup(tmp_path):
    """`make setup` installs the dev extra, which brings tensorboard; the logger writes event files that
    tensorboard reads back with the values logged."""
    import re

    import lightning as L
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ldm_train.lit.trainer import build_logger

    dev = re.search(r"^dev = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M).group(1)
    assert '"tensorboard>=' in dev
    assert "-e \".[dev]\"" in (ROOT / "Makefile").read_text()

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))
            self.seen: list[float] = []

        def training_step(self, batch, batch_idx):
            loss = (self.w * batch[0]).pow(2).mean()
            self.seen.append(float(loss.detach()))
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cfg = compose_cfg(["experiment=smoke", "logger=tensorboard", f"paths.run_dir={tmp_path}"])
    checked("logger=tensorboard")
    logger = build_logger(cfg, "autoencoder")
    module = Tiny()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(1.0, 5.0)), batch_size=1)
    L.Trainer(logger=logger, max_steps=4, log_every_n_steps=1, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module, data)
    events = list((tmp_path / "tensorboard" / "autoencoder").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    logged = [e.value for e in acc.Scalars("train/loss")]
    assert logged == pytest.approx(module.seen, rel=1e-6)


def test_sample_grids_place_each_image_under_its_caption_band():
    """torchvision's make_grid lays the tiles out; each row sits below a 14 px caption band: tile i of a 2-wide grid
    of 4×6 images enlarged twice starts at x = 2 + c·(12 + 2), y = 2 + r·(8 + 2 + 14) + 14."""
    import torch

    from ldm_train.utils.images import make_grid, to_uint8

    torch.manual_seed(0)
    x = torch.rand(5, 3, 4, 6) * 2 - 1
    grid = np.asarray(make_grid(x, nrow=2, captions=["a", "bb", "c"], scale=2))
    assert grid.shape == (2 + 3 * (8 + 2 + 14), 2 + 2 * (12 + 2), 3)
    for i, tile in enumerate(to_uint8(x)):
        r, c = divmod(i, 2)
        top, left = 2 + r * (8 + 2 + 14) + 14, 2 + c * (12 + 2)
        assert np.array_equal(grid[top:top + 8, left:left + 12], tile.repeat(2, 0).repeat(2, 1))
    assert (grid[2 + 14 + 8:2 + 14 + 8 + 2] == 255).all()  # the white gap below a row


def test_make_shards_holds_out_a_validation_split_of_a_folder(tmp_path, capsys):
    """--val-fraction: the seeded held-out images go to val-*.tar (the command prints data.val_urls), the others
    to train-*.tar; none in both, none lost."""
    from ldm_train.data.make_shards import main as make_shards
    from ldm_train.data.webdataset import ImageSampleDecoder, ShardStream

    root = image_folder(tmp_path / "imgs", 20)
    out = make_shards(["--folder", str(root), "--out", str(tmp_path / "shards"), "--val-fraction", "0.25"])
    assert out["written"] == {"train": 15, "val": 5}
    assert "data.val_urls=" in capsys.readouterr().out

    def captions(split: str) -> set[str]:
        urls = [str(p) for p in sorted((tmp_path / "shards").glob(f"{split}-*.tar"))]
        stream = ShardStream(urls, ImageSampleDecoder(16), shardshuffle=False, shuffle_buffer=0)
        return {item["caption"] for item in stream}

    train, val = captions("train"), captions("val")
    assert len(val) == 5 and not train & val and train | val == {f"image {i}" for i in range(20)}


def test_the_command_printed_after_cache_latents_passes_the_checks(tmp_path, caplog):
    """A one-shard cache: the printed stage-2 command gives data=latents one loader worker (the default 2 would be
    refused: every worker needs a shard)."""
    import shlex

    from tests.test_data_cache import cache, random_artifact

    ae = random_artifact(tmp_path, "kl")
    with caplog.at_level("INFO"):
        cache(tmp_path, ae, "kl", "cache.shard_size=1000", "data.train_size=40", "data.val_size=8")
    command = caplog.text.split("train stage 2 on it with:\n  ", 1)[1].splitlines()[0]
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "ldm_train"] and "data.num_workers=1" in words
    checked(*words[3:])  # passes the start-up checks as printed
