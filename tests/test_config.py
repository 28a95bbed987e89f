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
    assert cfg.subset in ("s4", "ms3", "avss")


def test_expected_presets_exist():
    names = {p.stem for p in PRESET_DIR.glob("*.toml")}
    assert {"tiny", "s4_avsbench", "s4_seed", "ms3_avsbench", "s4_pvt", "ms3_pvt", "s4_seed_pvt", "tiny_pvt"} <= names


def test_tiny_is_small_and_seed_shaped():
    tiny, seed = load_config("tiny"), load_config("s4_seed")
    assert tiny.model.backbone == "resnet18" and tiny.data.image_size == 64
    # the same code path as the seed recipe: crop branch and its three losses
    assert tiny.model.crop_branch and seed.model.crop_branch
    assert (tiny.loss.crop_ce, tiny.loss.crop_pair, tiny.loss.crop_audio) == (True, True, True)


def test_pvt_presets_are_the_reference_recipes():
    s4, ms3, seed = load_config("s4_pvt"), load_config("ms3_pvt"), load_config("s4_seed_pvt")
    for cfg in (s4, ms3, seed):
        assert cfg.model.backbone == "pvt_v2_b5" and cfg.model.drop_path == 0.1
        assert cfg.model.decoder_channels == 256 and cfg.model.tpavi_stages == [0, 1, 2, 3]
        assert (cfg.optim.name, cfg.optim.lr, cfg.data.batch_videos, cfg.train.seed) == ("adam", 1e-4, 4, 123)
    assert (s4.subset, s4.train.epochs, s4.loss.avm, s4.model.crop_branch) == ("s4", 15, False, False)
    assert (ms3.subset, ms3.train.epochs, ms3.loss.avm, ms3.loss.avm_weight) == ("ms3", 30, True, 0.5)
    assert ms3.loss.avm_stages == [0, 1, 2, 3]
    # the seed's crop branch stays a ResNet-50, with its three losses
    assert seed.model.crop_branch and seed.model.crop_depth == 50
    assert (seed.loss.crop_ce, seed.loss.crop_pair, seed.loss.crop_audio) == (True, True, True)
    tiny = load_config("tiny_pvt")
    assert tiny.model.backbone == "pvt_v2_b0" and tiny.data.image_size == 64


def test_each_recipe_uses_its_own_avm_loss():
    """The reference's MS3 recipe trains with the MS3 AVM loss (KL), the S4 code with the S4 one."""
    assert load_config("ms3_avsbench").loss.avm_variant == "ms3"
    assert load_config("ms3_pvt").loss.avm_variant == "ms3"
    assert load_config("s4_avsbench").loss.avm_variant == "s4"
    assert load_config("s4_avsbench", ["loss.avm_variant=ms3"]).loss.avm_variant == "ms3"  # selectable


def test_avss_presets_are_the_reference_recipe():
    ref, seed, tiny = load_config("avss_avsbench"), load_config("avss_seed"), load_config("tiny_avss")
    for cfg in (ref, seed, tiny):
        assert (cfg.subset, cfg.model.mask_classes, cfg.model.tpavi_frames_per_group) == ("avss", 71, 5)
        assert not cfg.model.tpavi_audio_bias and cfg.model.tpavi_stages == [0, 1, 2, 3]
        assert (cfg.loss.bce, cfg.loss.ce, cfg.loss.avm_weight) == (False, True, 0.5)
        assert cfg.loss.avm == (cfg is not tiny)  # tiny_avss learns on CPU without it (its header says why)
        assert cfg.loss.avm_stages == [0, 1, 2, 3]
    assert not ref.model.crop_branch and not tiny.model.crop_branch
    # the seed's crop branch and its three losses at s4_seed's weights, classifying the 71 classes
    s4 = load_config("s4_seed")
    assert seed.model.crop_branch and seed.model.num_classes == 71
    assert [getattr(seed.model, k) for k in ("crop_depth", "crop_hidden", "crop_relu")] == \
        [getattr(s4.model, k) for k in ("crop_depth", "crop_hidden", "crop_relu")]
    for term in ("crop_ce", "crop_pair", "crop_audio"):
        assert getattr(seed.loss, term) and getattr(seed.loss, f"{term}_weight") == getattr(s4.loss, f"{term}_weight")
    assert load_config("tiny_avss", ["model.crop_branch=true"]).model.num_classes == 71
    for cfg in (ref, seed):
        assert (cfg.model.backbone, cfg.train.epochs, cfg.data.batch_videos, cfg.optim.lr) == ("pvt_v2_b5", 60, 4, 1e-4)
    assert ref.loss.avm_variant == "avss_avsbench" and seed.loss.avm_variant == "avss"
    assert tiny.model.backbone == "resnet18" and tiny.data.image_size == 64


@pytest.mark.parametrize("preset,overrides,message", [
    ("tiny_avss", ["model.mask_classes=1"], "model.mask_classes=1 but subset 'avss' has 71 classes: set model.mask_classes=71"),
    ("tiny", ["model.mask_classes=71"], "model.mask_classes=71 but subset 's4' has one mask per frame"),
    ("tiny_avss", ["loss.bce=true"], "loss.bce needs one sigmoid logit per pixel"),
    ("tiny", ["loss.ce=true"], "loss.ce needs class logits"),
    ("tiny", ["loss.bce=false"], "no mask loss: set loss.bce=true"),
    ("tiny_avss", ["loss.ce=false"], "no mask loss: set loss.ce=true"),
    ("tiny_avss", ["loss.avm=true", "loss.avm_variant=ms3"], "loss.avm_variant='ms3' does not fit model.mask_classes=71"),
    ("ms3_avsbench", ["loss.avm_variant=avss"], "loss.avm_variant='avss' does not fit model.mask_classes=1"),
    ("tiny_avss", ["model.crop_branch=true", "model.num_classes=23"],
     "model.num_classes=23 but the AVSS crop branch classifies each object crop into the 71 AVSBench-semantic "
     "classes: set model.num_classes=71"),
    ("tiny_avss", ["model.crop_branch=true", "data.crop_size=32"],
     "data.crop_size=32 is too small for the AVSS crop branch"),
    ("tiny_avss", ["model.tpavi_frames_per_group=-5"], "model.tpavi_frames_per_group must be >= 0"),
    ("tiny_avss", ["model.mask_classes=0"], "model.mask_classes must be > 0"),
])
def test_mask_head_and_subset_must_agree(preset, overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(preset, overrides)
    assert message in str(e.value)


def test_legacy_model_depth(tmp_path):
    """Configs written before model.backbone (presets, checkpoints' saved configs) keep working."""
    assert load_config("tiny", ["model.depth=34"]).model.backbone == "resnet34"
    assert load_config("s4_pvt", ["model.depth=50"]).model.backbone == "resnet50"
    old = to_dict(load_config("tiny"))
    del old["model"]["backbone"]
    old["model"]["depth"] = 18
    assert config_from_dict(old).model.backbone == "resnet18"
    path = tmp_path / "old.toml"
    path.write_text("[model]\ndepth = 50\n")
    assert load_config(str(path)).model.backbone == "resnet50"
    path.write_text('[model]\nbackbone = "pvt_v2_b5"\ndepth = 50\n')
    with pytest.raises(ConfigError, match="model.depth=50 and model.backbone='pvt_v2_b5' disagree"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="model.depth is replaced by model.backbone"):
        load_config("tiny", ["model.depth=true"])


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
    ("model.depth=19", "model.depth is replaced by model.backbone; write model.backbone = one of"),
    ("model.backbone=pvt_v2_b6", "model.backbone='pvt_v2_b6' is not one of"),
    ("model.drop_path=1.0", "model.drop_path must be in [0, 1)"),
    ("loss.avm_variant=kl", "loss.avm_variant='kl' is not one of ('s4', 'ms3', 'avss', 'avss_avsbench')"),
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
