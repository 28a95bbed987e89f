"""A resumed run whose config differs from its checkpoint's: each change applied for real (and
said), or refused before any process starts (config.RESUME_RULES, train/optim.py reapply)."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn as nn

from avs_dist.config import (RESUME_RULES, Config, ConfigError, load_config, resume_changes, resume_rule, to_dict)
from avs_dist.launch.args import check_resume
from avs_dist.train import checkpoint as ckpt
from avs_dist.train.optim import build_optimizer, build_scheduler, hyperparameters, lr_multiplier, reapply


def _keys(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        yield from _keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [f"{prefix}{f.name}"]


def test_every_config_key_has_a_rule():
    kinds = {"applied", "refused", "batch", "shards", "ddp", "avss"}
    for key in _keys(Config()):
        kind, why = resume_rule(key)
        assert kind in kinds and why, key
    assert set(RESUME_RULES) - {k.split(".")[0] for k in _keys(Config())} <= set(_keys(Config()))  # no stale entry


def test_changes_that_can_apply_are_applied_with_one_line_each():
    saved = load_config("tiny")
    cfg = load_config("tiny", ["optim.lr=1e-4", "optim.weight_decay=0.01", "loss.crop_pair_weight=0.5",
                               "train.max_steps=400", "train.ckpt_every_steps=25", "data.num_workers=3"])
    lines = [c.line() for c in resume_changes(saved, cfg, (16, 16), True)]
    assert lines == ["resume: data.num_workers 1 -> 3 (applied)", "resume: loss.crop_pair_weight 0.1 -> 0.5 (applied)",
                     "resume: optim.lr 0.002 -> 0.0001 (applied)", "resume: optim.weight_decay 0.0 -> 0.01 (applied)",
                     "resume: train.ckpt_every_steps 50 -> 25 (applied)", "resume: train.max_steps 300 -> 400 (applied)"]
    assert resume_changes(saved, saved, (16, 16), True) == []


def test_the_global_batch_decides_the_batch_fields():
    saved = load_config("tiny", ["data.global_batch_videos=8"])
    cfg = load_config("tiny", ["data.global_batch_videos=8", "data.batch_videos=2", "optim.grad_accum=2"])
    lines = [c.line() for c in resume_changes(saved, cfg, (8, 8), True)]  # e.g. 2 ranks -> 4 ranks
    assert lines == ["resume: data.batch_videos 4 -> 2 (applied: the global batch stays 8 videos per step)",
                     "resume: optim.grad_accum 1 -> 2 (applied: the global batch stays 8 videos per step)"]
    with pytest.raises(ConfigError) as e:  # the same fields, another global batch (another world size)
        resume_changes(saved, load_config("tiny"), (8, 4), True)
    assert str(e.value) == ("the global batch is 4 videos per step here but 8 in the checkpoint (it fixes the data "
                            "order; data.batch_videos x ranks x optim.grad_accum unless data.global_batch_videos is "
                            "set): set data.global_batch_videos=8 to continue it; or start a new --run-dir")


@pytest.mark.parametrize("override, old", [
    ("model.decoder_channels=16", "32"), ("train.seed=7", "123"), ("data.image_size=96", "64"),
    ("train.strategy=zero2", '"ddp"'), ("model.vggish_weights=v.pth", '""'), ("optim.name=adamw", '"adam"')])
def test_changes_that_cannot_apply_are_refused_with_what_to_do(override, old):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        resume_changes(load_config("tiny"), load_config("tiny", [override]), (16, 16), True)
    msg = str(e.value)
    assert msg.startswith(f"{key} is ") and f"but {old} in the checkpoint (" in msg
    assert msg.endswith(f"set {key}={old} to resume it; or start a new --run-dir") and "\n" not in msg


def test_precision_applies_under_ddp_only_and_shards_by_content():
    ddp, zero = load_config("tiny"), load_config("tiny", ["train.strategy=zero2"])
    bf16 = ["train.precision=bf16"]
    assert [c.kind for c in resume_changes(ddp, load_config("tiny", bf16), (16, 16), True)] == ["applied"]
    with pytest.raises(ConfigError, match="train.precision is"):
        resume_changes(zero, load_config("tiny", ["train.strategy=zero2", *bf16]), (16, 16), True)
    moved = load_config("tiny", ["data.shards=/elsewhere"])
    assert resume_changes(ddp, moved, (16, 16), True)[0].line() == (
        'resume: data.shards "shards" -> "/elsewhere" (applied: the same train shards, by sha256)')
    with pytest.raises(ConfigError, match="data.shards is"):
        resume_changes(ddp, moved, (16, 16), False)


def test_avss_batching_is_refused_for_avss_only():
    """It fixes which AVSS clips share a global batch; S4 / MS3 clips all have 5 frames."""
    for mode in ("pad", "bucket"):
        other = "bucket" if mode == "pad" else "pad"
        with pytest.raises(ConfigError, match="data.avss_batching is"):
            resume_changes(load_config("tiny_avss", [f"data.avss_batching={mode}"]),
                           load_config("tiny_avss", [f"data.avss_batching={other}"]), (8, 8), True)
    change = resume_changes(load_config("tiny"), load_config("tiny", ["data.avss_batching=pad"]), (16, 16), True)
    assert [c.line() for c in change] == ['resume: data.avss_batching "bucket" -> "pad" (applied: s4 clips all have 5 '
                                          'frames: the order does not depend on it)']


def _checkpoint(run_dir, cfg, step=4, world_size=2, manifest=None):
    """A checkpoint folder's COMPLETE.json as the trainer writes it (the launcher reads only that)."""
    folder = ckpt.ckpt_root(run_dir) / ckpt.step_name(step)
    folder.mkdir(parents=True)
    ckpt.write_model_folder(folder, {"w": torch.zeros(1)}, to_dict(cfg), step, 0)
    ckpt.write_complete(folder, {"step": step, "world_size": world_size, "config": to_dict(cfg),
                                 "train_shards": ckpt.train_shards_digest(manifest or {"shards": []})})
    return folder


def test_check_resume_before_any_process_starts(tmp_path):
    manifest = {"shards": [{"file": "train-00000.tar", "split": "train", "sha256": "ab"}]}
    folder = _checkpoint(tmp_path, load_config("tiny"), manifest=manifest)
    check_resume(load_config("tiny", ["optim.lr=1e-4"]), tmp_path, "auto", 2, manifest)
    with pytest.raises(ConfigError) as e:
        check_resume(load_config("tiny", ["model.decoder_channels=16"]), tmp_path, "auto", 2, manifest)
    assert str(e.value).startswith(f"cannot resume from {folder}: model.decoder_channels is 16 here but 32 in")
    check_resume(load_config("tiny", ["model.decoder_channels=16"]), tmp_path, "never", 2, manifest)
    with pytest.raises(ConfigError, match="the global batch is 4 videos per step here but 8"):
        check_resume(load_config("tiny"), tmp_path, "auto", 1, manifest)  # 4 per rank: 2 ranks -> 1
    repacked = {"shards": [{"file": "train-00000.tar", "split": "train", "sha256": "cd"}]}
    with pytest.raises(ConfigError, match="data.shards|train shards"):
        check_resume(load_config("tiny", ["data.shards=/other"]), tmp_path, "auto", 2, repacked)
    # a checkpoint written before COMPLETE.json held the config: model.pt's is read
    record = json.loads((folder / ckpt.COMPLETE).read_text())
    del record["config"]
    with pytest.raises(ConfigError, match="model.decoder_channels is 16"):
        ckpt.resume_changes(folder, record, load_config("tiny", ["model.decoder_channels=16"]), 2, manifest)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def _train(model, opt, sched, steps):
    for _ in range(steps):
        model(torch.randn(16, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()


@pytest.mark.parametrize("impl", ["default", "fused"])
def test_reapply_takes_the_new_settings_and_keeps_the_moments(impl):
    """The restored optimizer runs at the new lr (on the new schedule) and weight decay; with an
    unchanged config it continues exactly as the run it was saved from."""
    cfg = load_config("tiny", ["optim.warmup_steps=2", "optim.schedule=cosine", "optim.tpavi_lr_mult=1"])
    model = _model()
    opt, total = build_optimizer(model, cfg), 8
    sched = build_scheduler(opt, cfg, total)
    _train(model, opt, sched, 3)
    # a copy, as from a file: torch's load_state_dict would share the live moment tensors
    saved = copy.deepcopy({"opt": opt.state_dict(), "sched": sched.state_dict(), "model": model.state_dict()})

    new = load_config("tiny", ["optim.warmup_steps=2", "optim.schedule=cosine", "optim.tpavi_lr_mult=1",
                               "optim.lr=1e-4", "optim.weight_decay=0.1", f"optim.impl={impl}"])
    model2 = _model()
    model2.load_state_dict(saved["model"])
    opt2 = build_optimizer(model2, new)
    sched2 = build_scheduler(opt2, new, 10)  # and a longer run: the cosine horizon moves
    fresh = hyperparameters(opt2)
    opt2.load_state_dict(copy.deepcopy(saved["opt"]))
    sched2.load_state_dict(copy.deepcopy(saved["sched"]))
    assert opt2.param_groups[0]["lr"] != pytest.approx(1e-4 * lr_multiplier(new, 10)(3))  # what torch restores
    reapply(opt2, sched2, fresh)
    group = opt2.param_groups[0]
    assert group["lr"] == 1e-4 * lr_multiplier(new, 10)(3) and group["weight_decay"] == 0.1
    assert group["fused"] == (impl == "fused" or None)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(opt2.state[p2]["exp_avg"], opt.state[p]["exp_avg"])
    lrs = []
    for _ in range(3):
        lrs.append(opt2.param_groups[0]["lr"])
        _train(model2, opt2, sched2, 1)
    assert lrs == [1e-4 * lr_multiplier(new, 10)(s) for s in (3, 4, 5)]

    # unchanged config: bit-identical to the uninterrupted optimizer
    model3 = _model()
    model3.load_state_dict(saved["model"])
    opt3 = build_optimizer(model3, cfg)
    sched3 = build_scheduler(opt3, cfg, total)
    fresh = hyperparameters(opt3)
    opt3.load_state_dict(saved["opt"])
    sched3.load_state_dict(saved["sched"])
    reapply(opt3, sched3, fresh)
    torch.manual_seed(1)
    _train(model, opt, sched, 2)
    torch.manual_seed(1)
    _train(model3, opt3, sched3, 2)
    for a, b in zip(model.parameters(), model3.parameters()):
        assert torch.equal(a, b)
    assert opt3.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
