"""Config presets, dotted overrides, and rejection of bad configs before any process starts."""
from __future__ import annotations

import json

import pytest

from avs_dist.config import (PRESET_DIR, Config, ConfigError, config_from_dict, load_config, parse_overrides,
                             save_config, to_dict)


@pytest.mark.parametrize("name", sorted(p.stem for p in PRESET_DIR.glob("*.toml")))
def test_presets_load(name):
    cfg = load_config(name)
    assert cfg.name == name
    assert cfg.subset in ("s4", "ms3")


def test_expected_presets_exist():
    names = {p.stem for p in PRESET_DIR.glob("*.toml")}
    assert {"tiny", "s4_avsbench", "s4_seed", "ms3_avsbench"} <= names


def test_tiny_is_small_and_seed_shaped():
    tiny, seed = load_config("tiny"), load_config("s4_seed")
    assert tiny.model.depth == 18 and tiny.data.image_size == 64
    # the same code path as the seed recipe: crop branch and its three losses
    assert tiny.model.crop_branch and seed.model.crop_branch
    assert (tiny.loss.crop_ce, tiny.loss.crop_pair, tiny.loss.crop_audio) == (True, True, True)


def test_dotted_overrides():
    cfg = load_config("tiny", ["optim.lr=3e-4", "model.tpavi_stages=[0,1]", "train.strategy=zero2",
                               "data.hflip=false", "train.max_steps=7", 'name="x y"'])
    assert cfg.optim.lr == 3e-4
    assert cfg.model.tpavi_stages == [0, 1]
    assert cfg.train.strategy == "zero2"
    assert cfg.data.hflip is False
    assert cfg.train.max_steps == 7
    assert cfg.name == "x y"


def test_int_accepted_for_float():
    assert load_config("tiny", ["optim.grad_clip=1"]).optim.grad_clip == 1.0


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1e-3", "unknown config key 'optim.lrr'"),
    ("nosuchsection.x=1", "unknown config key 'nosuchsection'"),
    ("train.epochs=ten", "train.epochs: expected an integer"),
    ("data.hflip=1", "data.hflip: expected true/false"),
    ("optim.lr=2.0", "optim.lr must be in (0, 1)"),
    ("train.strategy=zero4", "train.strategy='zero4' is not one of"),
    ("model.depth=19", "model.depth=19 is not one of"),
    ("data.batch_videos=0", "data.batch_videos must be > 0"),
    ("optim.grad_accum=0", "optim.grad_accum must be > 0"),
    ("train.ckpt_every_steps=0", "train.ckpt_every_steps must be > 0"),
    ("optim", "is not key=value"),
    ("train=1", "train is a section"),
])
def test_bad_overrides_rejected(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert message in str(e.value)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown config preset 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.toml"))


def test_toml_file_with_unknown_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nepochz = 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.epochz'"):
        load_config(str(path))


def test_save_roundtrip(tmp_path):
    cfg = load_config("tiny", ["optim.lr=3e-4"])
    save_config(cfg, tmp_path / "config.json")
    again = config_from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert to_dict(again) == to_dict(cfg)
    # the TOML twin is a loadable config too
    assert to_dict(load_config(str(tmp_path / "config.toml"))) == to_dict(cfg)


def test_defaults_validate():
    from avs_dist.config import validate

    validate(Config())


# ---- the training CLI rejects bad configs with exit code 2 before starting anything
@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1e-3", "unknown config key 'optim.lrr'"),
    ("train.epochs=1.5", "train.epochs: expected an integer"),
    ("optim.lr=5", "optim.lr must be in (0, 1)"),
    ("optim.tpavi_lr_mult=0", "optim.tpavi_lr_mult must be > 0"),
    ("optim.tpavi_lr_mult=1000", "optim.tpavi_lr_mult must be > 0 with optim.lr x it < 1"),
])
def test_train_cli_rejects_bad_config(tmp_path, capsys, override, message):
    from avs_dist.launch.local import main as cli

    run_dir = tmp_path / "run"
    rc = cli(["--config", "tiny", "--shards", str(tmp_path / "no_shards"), "--run-dir", str(run_dir),
              "--nproc", "2", override])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err
    assert not run_dir.exists()  # nothing was started or written


def test_train_cli_rejects_missing_shards(tmp_path, capsys):
    from avs_dist.launch.local import main as cli

    rc = cli(["--config", "tiny", "--shards", str(tmp_path / "no_shards"), "--run-dir", str(tmp_path / "run")])
    assert rc == 2
    assert "manifest.json not found" in capsys.readouterr().err


def test_train_cli_rejects_bad_nproc(tmp_path, capsys, s4_shards):
    from avs_dist.launch.local import main as cli

    rc = cli(["--config", "tiny", "--shards", str(s4_shards), "--run-dir", str(tmp_path / "run"), "--nproc", "0"])
    assert rc == 2
    assert "--nproc" in capsys.readouterr().err


def test_train_cli_rejects_unknown_preset(tmp_path, capsys):
    from avs_dist.launch.local import main as cli

    rc = cli(["--config", "nope", "--shards", str(tmp_path), "--run-dir", str(tmp_path / "run")])
    assert rc == 2
    assert "unknown config preset 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("train.strategy=zero2 train.precision=fp16", "fp16 with DeepSpeed needs a GPU"),
    ("train.sync_bn=true", "train.sync_bn needs GPUs"),
])
def test_train_cli_rejects_what_this_machine_cannot_run(tmp_path, capsys, s4_shards, override, message):
    import torch

    from avs_dist.launch.local import main as cli

    if torch.cuda.is_available():
        pytest.skip("a GPU machine can run these")
    rc = cli(["--config", "tiny", "--shards", str(s4_shards), "--run-dir", str(tmp_path / "run"), "--nproc", "2",
              *override.split()])
    assert rc == 2
    assert message in capsys.readouterr().err
