"""The Hydra configs as shipped: every stage × f × regularizer composes, `f` selects its architecture table,
bad values fail early with the fix in the message, and the CLI works from any folder."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys

import pytest
import yaml
from hydra.errors import HydraException
from omegaconf import OmegaConf

from ldm_train import config as ldm_config
from ldm_train.config import ConfigError, resolved_arch, valid_factors, validate

STAGES = ("autoencoder", "calibrate", "diffusion", "sample")
FACTORS = (1, 2, 4, 8, 16, 32)
REGULARIZERS = ("kl", "vq")
VALID_LIST = "1, 2, 4, 8, 16, 32"


def _table(f: int) -> dict:
    """The architecture file of factor f, read with plain yaml (not through the code under test)."""
    return yaml.safe_load((ldm_config.ARCH_DIR / f"f{f}.yaml").read_text())


def test_valid_factors_are_the_shipped_tables():
    assert valid_factors() == list(FACTORS)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_f_and_regularizer_composes_and_resolves(compose_cfg, tmp_path, stage):
    for f in FACTORS:
        for reg in REGULARIZERS:
            res = max(32, 4 * f)  # the default 3-level U-Net needs latents divisible by 4 (checked at start)
            cfg = compose_cfg([f"stage={stage}", f"f={f}", f"regularizer={reg}", f"paths.run_dir={tmp_path}",
                               f"data.resolution={res}"])
            resolved = OmegaConf.to_container(cfg, resolve=True)  # raises on any broken interpolation
            assert resolved["stage"] == stage and resolved["f"] == f and resolved["name"] == f"{reg}_f{f}"
            expected = _table(f)[reg]
            assert resolved["autoencoder"]["arch"] == expected
            validate(cfg)
            arch = resolved_arch(cfg)
            assert arch["f"] == f and 2 ** (len(arch["ch_mult"]) - 1) == f
            assert arch["z_channels"] == expected["z_channels"]
            assert arch["ch_mult"] == expected["ch_mult"]
            assert arch["attn_resolutions"] == expected["attn_resolutions"]
            assert arch["num_groups"] == cfg.autoencoder.num_groups and arch["resolution"] == cfg.data.resolution
            assert arch["regularizer"]["name"] == reg
            if reg == "vq":
                assert arch["regularizer"]["n_embed"] == expected["n_embed"]
                assert arch["regularizer"]["beta"] == cfg.regularizer.beta
            else:
                assert "n_embed" not in arch["regularizer"]


def test_architecture_spot_checks(compose_cfg):
    """Values from the LDM paper's released configs, hard-coded here."""
    kl8 = resolved_arch(compose_cfg(["f=8", "regularizer=kl"]))
    assert (kl8["z_channels"], kl8["ch_mult"]) == (4, [1, 2, 4, 4])
    kl16 = resolved_arch(compose_cfg(["f=16", "regularizer=kl"]))
    assert (kl16["z_channels"], kl16["ch_mult"], kl16["attn_resolutions"]) == (16, [1, 1, 2, 2, 4], [16])
    vq16 = resolved_arch(compose_cfg(["f=16", "regularizer=vq"]))
    assert (vq16["z_channels"], vq16["regularizer"]["n_embed"]) == (8, 16384)
    kl4 = resolved_arch(compose_cfg([]))  # the default is KL f=4
    assert (kl4["f"], kl4["z_channels"], kl4["ch_mult"]) == (4, 3, [1, 2, 4])


def test_in_place_resolve_works(compose_cfg, tmp_path):
    """OmegaConf.resolve (what `--cfg job --resolve` does) accepts the arch resolver's result."""
    cfg = compose_cfg(["f=16", "regularizer=vq", f"paths.run_dir={tmp_path}"])
    OmegaConf.resolve(cfg)
    assert cfg.autoencoder.arch.n_embed == 16384 and list(cfg.autoencoder.arch.ch_mult) == [1, 1, 2, 2, 4]


@pytest.mark.parametrize("bad", ["3", "64", "abc", "0", "true"])
def test_invalid_f_lists_the_valid_factors(compose_cfg, tmp_path, bad):
    cfg = compose_cfg([f"f={bad}", f"paths.run_dir={tmp_path}"])  # the resolver is lazy: composing succeeds
    with pytest.raises(ConfigError, match=VALID_LIST):
        validate(cfg)
    with pytest.raises(Exception, match=VALID_LIST):  # resolving the arch interpolation fails the same way
        OmegaConf.to_container(cfg, resolve=True)


def test_resolution_not_divisible_by_f(compose_cfg):
    with pytest.raises(ConfigError, match="not divisible by f=8.*multiple of 8"):
        validate(compose_cfg(["f=8", "data.resolution=36"]))
    with pytest.raises(ConfigError, match="not divisible by f=32"):
        validate(compose_cfg(["f=32", "data.resolution=48"]))
    validate(compose_cfg(["f=8", "data.resolution=40"]))  # a multiple is fine


def test_inconsistent_arch_table_is_refused(compose_cfg, tmp_path, monkeypatch):
    """A table whose ch_mult implies another factor than its file name is caught at start-up."""
    for f in FACTORS:
        (tmp_path / f"f{f}.yaml").write_text(yaml.safe_dump(_table(f)))
    broken = _table(4)
    broken["kl"]["ch_mult"] = [1, 2]
    (tmp_path / "f4.yaml").write_text(yaml.safe_dump(broken))
    monkeypatch.setattr(ldm_config, "ARCH_DIR", tmp_path)
    with pytest.raises(ConfigError, match=r"f=2\), not f=4"):
        resolved_arch(compose_cfg(["f=4"]))


def test_unknown_stage(compose_cfg):
    with pytest.raises(HydraException, match="stage"):  # not an option of the stage group
        compose_cfg(["stage=bogus"])
    cfg = compose_cfg([])
    cfg.stage = "bogus"
    with pytest.raises(ConfigError, match="unknown stage 'bogus'; valid: autoencoder, calibrate, diffusion, sample"):
        validate(cfg)


def test_unknown_regularizer_option(compose_cfg):
    with pytest.raises(HydraException, match="regularizer"):
        compose_cfg(["regularizer=fsq"])


UNETS = {"tiny": 16, "small": 32, "sd15": 320}  # model_channels of each conf/unet option


@pytest.mark.parametrize("unet", list(UNETS))
@pytest.mark.parametrize("text_encoder", ["minilm", "clip_l", "scratch", "class"])
def test_smoke_composes_with_every_unet_and_text_encoder(compose_cfg, tmp_path, unet, text_encoder):
    cfg = compose_cfg(["experiment=smoke", f"unet={unet}", f"text_encoder={text_encoder}",
                       f"paths.run_dir={tmp_path}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    # the command-line choice wins over the experiment's own `override /unet: tiny`
    assert resolved["unet"]["model_channels"] == UNETS[unet]
    assert resolved["text_encoder"]["name"] == text_encoder
    assert resolved["unet"]["context_dim"] == resolved["text_encoder"]["dim"]
    assert resolved["logger"]["name"] == "none" and resolved["data"]["resolution"] == 16
    validate(cfg)


def test_smoke_defaults(compose_cfg):
    cfg = compose_cfg(["experiment=smoke"])
    assert cfg.unet.model_channels == UNETS["tiny"]
    assert cfg.text_encoder.name == "scratch" and cfg.text_encoder.dim == 32
    assert cfg.autoencoder.ch == 16 and cfg.autoencoder.num_groups == 8


@pytest.mark.parametrize("text_encoder", ["scratch", "class", "minilm", "clip_l", "tiny"])
def test_smoke_text_encoder_section_fits_the_chosen_encoder(compose_cfg, text_encoder):
    """The composed text_encoder section must be valid for the chosen encoder: only keys its constructor takes,
    and for a pretrained (fixed-width) encoder the width its own config file declares."""
    from ldm_train.models.text import TEXT_ENCODERS

    section = OmegaConf.to_container(compose_cfg(["experiment=smoke", f"text_encoder={text_encoder}"]).text_encoder)
    own = yaml.safe_load((ldm_config.CONF_DIR / "text_encoder" / f"{text_encoder}.yaml").read_text())
    accepted = set(inspect.signature(TEXT_ENCODERS[own["name"]]).parameters) | {"name", "dim"}
    assert set(section) <= accepted, f"keys the {text_encoder} encoder does not take: {set(section) - accepted}"
    if text_encoder in ("minilm", "clip_l"):
        assert section["dim"] == own["dim"]


# ------------------------------------------------------------------------------------------------- the CLI

CLI_CASES = {
    "cfg_f16": ["--cfg", "job", "--resolve", "f=16", "regularizer=vq"],
    "help": ["--help"],
    "bad_f": ["experiment=smoke", "f=3", "paths.artifacts={tmp}/artifacts"],
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> dict:
    """`python -m ldm_train ...` from a folder outside the repo, the cases run side by side (each pays the
    interpreter start-up); returns {case: (completed process, its cwd)}."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "disabled"}
    procs = {}
    for case, args in CLI_CASES.items():
        cwd = tmp_path_factory.mktemp(f"cli_{case}")
        args = [a.format(tmp=cwd) for a in args]
        procs[case] = (subprocess.Popen([sys.executable, "-m", "ldm_train", *args], cwd=cwd, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE), cwd)
    results = {}
    for case, (proc, cwd) in procs.items():
        out, err = proc.communicate(timeout=180)
        results[case] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), cwd)
    return results


def test_cli_cfg_job_from_another_folder_prints_the_f16_arch(cli):
    """Configs ship inside the package, and the plain value `f=16` works on the command line."""
    out, cwd = cli["cfg_f16"]
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["f"] == 16 and printed["name"] == "vq_f16"
    assert printed["autoencoder"]["arch"] == {"z_channels": 8, "ch_mult": [1, 1, 2, 2, 4], "attn_resolutions": [16],
                                              "n_embed": 16384}
    assert list(cwd.iterdir()) == []  # --cfg runs nothing and writes nothing


def test_cli_help_lists_groups_but_f_is_a_value(cli):
    out, _ = cli["help"]
    assert out.returncode == 0, out.stderr
    groups = out.stdout.split("== Config ==")[0]
    assert "regularizer: kl, vq" in groups and "\nunet: " in groups
    assert not any(line.startswith("f:") for line in groups.splitlines())  # a group `f` would break `f=8`


def test_cli_invalid_f_fails_before_training(cli):
    out, cwd = cli["bad_f"]
    assert out.returncode != 0
    assert f"valid downsampling factors are {VALID_LIST}" in out.stdout + out.stderr
    assert not (cwd / "artifacts").exists()


# ------------------------------------------------------------------------------------ errors at start


@pytest.mark.parametrize(("overrides", "needle"), [
    (["autoencoder.batch_size=1"], "autoencoder.loss.disc.norm=group"),
    (["strategy=fsdp", "trainer.accelerator=cpu"], "strategy=ddp"),
    (["strategy=fsdp", "trainer.accelerator=gpu"], "strategy=fsdp trains stage 2 only"),
    (["stage=pipeline", "strategy=fsdp", "trainer.accelerator=gpu"], "then run stage=diffusion strategy=fsdp"),
    (["stage=diffusion", "trainer.devices=4", "diffusion.batch_size=2"], "each of the 4 devices"),
    (["+autoencoder.optimizer.lr=0.1"], "set the learning rate with autoencoder.lr"),
])
def test_clear_errors_at_start(compose_cfg, overrides, needle):
    with pytest.raises(ldm_config.ConfigError, match=re.escape(needle)):
        ldm_config.validate(compose_cfg(["experiment=smoke", *overrides]))


def test_batch_size_one_is_fine_with_a_groupnorm_discriminator(compose_cfg):
    ldm_config.validate(compose_cfg(["experiment=smoke", "autoencoder.batch_size=1",
                                     "autoencoder.loss.disc.norm=group"]))


def test_quickstart_composes_and_validates(compose_cfg):
    """`make demo`'s config: KL f=4 at 32 px, MiniLM conditioning, both stages bounded by a step budget and a cap."""
    cfg = compose_cfg(["stage=pipeline", "experiment=quickstart"])
    ldm_config.validate(cfg)
    arch = ldm_config.resolved_arch(cfg)
    assert (arch["f"], arch["regularizer"]["name"], arch["resolution"]) == (4, "kl", 32)
    assert cfg.text_encoder.name == "minilm" and cfg.unet.context_dim == 384
    assert cfg.autoencoder.max_time and cfg.diffusion.max_time and cfg.diffusion.eval_samples > 0


def test_main_returns_the_stage_headline_metric():
    """`main()` hands a Hydra sweeper the stage's headline number (its module's HEADLINE_METRIC)."""
    from ldm_train.__main__ import headline

    assert headline("pipeline", {"caption_alignment_cfg": 0.9, "fd_shapes": 3.0}) == 0.9
    assert headline("autoencoder", {"recon_psnr": 31.5, "recon_ssim": 0.9}) == 31.5
    assert headline("diffusion", {"steps": 12}) is None  # no val/loss: nothing to optimise
    assert headline("calibrate", {"scale_factor": 1.2}) is None  # no headline metric declared


def test_default_stage1_runs_its_discriminator(compose_cfg):
    """The shipped default (the LDM KL recipe's disc_start 50001) trains past disc_start, so no warning."""
    cfg = compose_cfg(["stage=autoencoder"])
    ae = cfg.autoencoder
    assert ae.loss.disc_start is not None and ae.loss.disc_start < ae.max_steps
    assert ldm_config.idle_discriminator_warning(ae) is None


@pytest.mark.parametrize(("overrides", "idle"), [
    (["autoencoder.max_steps=50000", "autoencoder.loss.disc_start=50001"], True),  # yesterday's default
    (["autoencoder.max_steps=10", "autoencoder.loss.disc_start=10"], True),  # batch indices 0…9: never
    (["autoencoder.max_steps=10", "autoencoder.loss.disc_start=9"], False),  # the last batch has it
    (["autoencoder.max_steps=10", "autoencoder.loss.disc_start=null"], False),  # off on purpose
    (["experiment=quickstart"], False),  # the quickstart turns it off (null): no warning
])
def test_idle_discriminator_warns_at_start(compose_cfg, caplog, overrides, idle):
    with caplog.at_level("WARNING", logger="ldm_train.config"):
        validate(compose_cfg(["stage=autoencoder", *overrides]))
    warned = [r.getMessage() for r in caplog.records if "will never run" in r.getMessage()]
    assert bool(warned) == idle
    if idle:
        assert "the discriminator you configured will never run" in warned[0]


def test_z_channels_override_reaches_the_architecture(compose_cfg, tmp_path):
    base = ["stage=autoencoder", "f=4", f"paths.run_dir={tmp_path}"]
    assert resolved_arch(compose_cfg(base))["z_channels"] == _table(4)["kl"]["z_channels"]
    assert resolved_arch(compose_cfg([*base, "autoencoder.z_channels=8"]))["z_channels"] == 8
