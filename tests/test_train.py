"""Trainer pieces (LR schedule, optimizer parameters, RNG isolation) and the one-process entry point."""
from __future__ import annotations

import json
import os
import random
import signal
import sys

import numpy as np
import pytest
import torch

from procs import run_session
from avs_dist.config import load_config
from avs_dist.precision import floatify, resolve_precision
from avs_dist.train import checkpoint as ckpt
from avs_dist.train.optim import build_optimizer, lr_multiplier
from avs_dist.train.state import preserved_rng, rng_state, set_rng_state
from avs_dist.train.stop import StopRequest, stop_file


def test_lr_warmup_then_constant():
    cfg = load_config("tiny", ["optim.schedule=constant", "optim.warmup_steps=4"])
    f = lr_multiplier(cfg, 100)
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_lr_cosine_reaches_min_ratio_at_last_step():
    cfg = load_config("tiny", ["optim.schedule=cosine", "optim.warmup_steps=2", "optim.min_lr_ratio=0.1"])
    total = 12
    f = lr_multiplier(cfg, total)
    values = [f(s) for s in range(total)]
    assert values[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(values[2:], values[3:]))  # non-increasing after warm-up
    assert values[-1] == pytest.approx(0.1)


def test_lr_schedule_drives_the_optimizer():
    cfg = load_config("tiny", ["optim.lr=0.01", "optim.warmup_steps=2", "optim.schedule=constant"])
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg, 10))
    seen = []
    for _ in range(3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.005, 0.01, 0.01])


def test_frozen_vggish_has_no_optimizer_params_and_stays_in_eval():
    from avs_dist.models import build_model

    cfg = load_config("tiny")
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in model.vggish.parameters())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_opt == trainable
    model.train()
    assert model.training and not model.vggish.training
    assert cfg.optim.name == "adam" and isinstance(opt, torch.optim.Adam)
    assert isinstance(build_optimizer(model, load_config("tiny", ["optim.name=adamw"])), torch.optim.AdamW)


def test_tpavi_blocks_get_their_own_learning_rate():
    from avs_dist.models import build_model

    cfg = load_config("tiny", ["optim.lr=0.001", "optim.tpavi_lr_mult=10", "optim.warmup_steps=2",
                               "optim.schedule=constant"])
    model = build_model(cfg.model, load_weights=False)
    opt = build_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    base, tpavi = opt.param_groups
    assert base["lr"] == 0.001 and tpavi["lr"] == pytest.approx(0.01)
    assert {names[id(p)].split(".")[1] for p in tpavi["params"]} == {"tpavi_b1", "tpavi_b2", "tpavi_b3", "tpavi_b4"}
    assert not any(".tpavi_b" in names[id(p)] for p in base["params"])
    # the schedule scales both groups
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg, 10))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.0005, 0.005])
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.001, 0.01])
    # a model without TPAVI blocks: one group
    no_tpavi = build_model(load_config("tiny", ["model.tpavi_stages=[]"]).model, load_weights=False)
    assert len(build_optimizer(no_tpavi, cfg).param_groups) == 1


def test_preserved_rng_isolates_the_training_streams():
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    state = rng_state()
    expected = (torch.rand(2), random.random(), np.random.rand())
    set_rng_state(state)
    with preserved_rng():
        torch.rand(100), random.random(), np.random.rand(5)  # e.g. a DataLoader drawing its seed
    got = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


def test_floatify_casts_nested_half_outputs():
    out = {"logits": torch.ones(2, dtype=torch.bfloat16), "avm": [(0, torch.ones(1, dtype=torch.float16),
                                                                   torch.ones(1, dtype=torch.bfloat16))],
           "label": torch.ones(1, dtype=torch.int64), "none": None}
    f = floatify(out)
    assert f["logits"].dtype == torch.float32
    assert f["avm"][0][0] == 0 and f["avm"][0][1].dtype == torch.float32 and f["avm"][0][2].dtype == torch.float32
    assert f["label"].dtype == torch.int64 and f["none"] is None


def test_strategy_hands_the_model_frame_exists():
    """AVSS batches carry frame_exists (padded clips); the strategies pass it to the model as is
    (bool, not cast to ZeRO's input dtype), and None for S4 / MS3 batches, which have none. The
    masks and mask_valid go as they are too (an AVSS crop branch cuts its crops with them)."""
    from avs_dist.train.strategy import _inputs

    exists = torch.tensor([[True, True, False]])
    masks, valid = torch.zeros(1, 3, 32, 32, dtype=torch.long), exists.clone()
    batch = {"frames": torch.zeros(1, 3, 3, 32, 32), "audio": torch.zeros(1, 3, 1, 96, 64), "frame_exists": exists,
             "masks": masks, "mask_valid": valid}
    frames, audio, crops, flags, got_masks, got_valid = _inputs(batch, torch.bfloat16)
    assert frames.dtype == torch.bfloat16 and crops is None and flags is exists
    assert got_masks is masks and got_valid is valid
    del batch["frame_exists"]
    assert _inputs(batch, None)[3] is None


def test_precision_auto():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"


def test_stop_request_from_a_signal_or_the_stop_file(tmp_path):
    """A stop request is an object: the signal handler only records the signal's name; the run
    directory's stop file asks the same; consume() removes the file after the stop."""
    import os

    from avs_dist.launch.signals import install_stop_signals

    from avs_dist.launch.signals import STOP_SIGNALS

    assert set(STOP_SIGNALS) == {signal.SIGTERM, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP}
    for sig in STOP_SIGNALS:
        stop = StopRequest(stop_file(tmp_path))
        assert not stop.requested
        old = signal.getsignal(sig)
        try:
            install_stop_signals(stop, signals=(sig,))
            os.kill(os.getpid(), sig)
            assert stop.requested and stop.reason == sig.name
        finally:
            signal.signal(sig, old)
    by_file = StopRequest(stop_file(tmp_path))
    stop_file(tmp_path).write_text("x")
    assert by_file.requested and by_file.reason == f"stop file {stop_file(tmp_path)}"
    by_file.consume()
    assert not stop_file(tmp_path).exists() and not StopRequest(stop_file(tmp_path)).requested


@pytest.mark.slow
def test_single_process_entry_point(s4_shards, tmp_path):
    """`python -m avs_dist.train` without torchrun: a world of one, same files as a multi-rank run."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "avs_dist.train", "--config", "tiny", "--shards", str(s4_shards),
           "--run-dir", str(run_dir), "train.max_steps=3", "data.batch_videos=4", "data.num_workers=0",
           "train.ckpt_every_steps=2", "train.eval_every_steps=2", "train.image_every_steps=2"]
    rc, out = run_session(cmd, timeout=240, env=env)
    assert rc == 0, out
    assert (run_dir / "config.json").is_file() and (run_dir / "config.toml").is_file()
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["data"]["shards"] == str(s4_shards) and saved["train"]["max_steps"] == 3
    assert (run_dir / "pids" / "rank0.pid").is_file()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("epoch", "total", "bce", "crop_ce", "crop_pair", "crop_audio", "lr", "grad_norm",
                    "frames_per_s"):
            assert r[key] is not None, (key, r)
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2, 3]
    for _, path in ckpt.list_checkpoints(run_dir):
        assert ckpt.verify(path) is None
    model = ckpt.load_torch(run_dir / "checkpoints" / "step_00000003" / "model.pt")
    assert model["step"] == 3 and model["config"]["train"]["max_steps"] == 3
    assert all(v.dtype != torch.bfloat16 and v.dtype != torch.float16 for v in model["model"].values())
    assert ckpt.verify(run_dir / "checkpoints" / "best") is None
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["status"] == "completed"
    assert {"miou", "f", "audio_gap", "miou_mismatched"} <= set(final["test"])
    assert "miou" in final["val"]
    assert list((run_dir / "tb").iterdir())
    # issue 18: the figures say which weights they are of, and the run has one results page
    best = ckpt.read_complete(run_dir / "checkpoints" / "best")
    assert final["test_source"] == {"kind": "last", "step": 3, "epoch": final["epoch"],
                                    "checkpoint": str((run_dir / "checkpoints" / "step_00000003").resolve())}
    assert final["best_val_step"] == best["step"] and final["steps_per_epoch"] >= 1
    results = (run_dir / "RESULTS.md").read_text()
    assert "config `tiny` (s4), resnet18 + crop branch, ddp on 1 rank(s)" in results
    assert "completed at step 3 of 3" in results
    assert f"**Best val mIoU:** {final['best_val_miou']:.4f} at step {best['step']}" in results
    assert f"**Test**, last model (step 3, end of training): miou_avsbench {final['test']['miou_avsbench']:.4f}" \
        in results
    assert "eval test of the last model (step 3, end of training): miou_avsbench" in out
    assert out.count("run summary") == 1 and "last eval" not in out and "find_unused" not in out

    # issue 18: the same command again reports the completed run instead of evaluating it again
    before = (run_dir / "final_metrics.json").stat().st_mtime_ns
    again = [sys.executable, "-m", "avs_dist.cli", "train", *cmd[3:]]
    rc, out = run_session(again, timeout=240, env=env)
    assert rc == 0, out
    assert f"already completed at step 3 of 3; results in {run_dir / 'RESULTS.md'}" in out, out
    assert "eval test" not in out and (run_dir / "final_metrics.json").stat().st_mtime_ns == before

    # issue 18: `avs-dist eval` of the run folder names the checkpoint it took (best/, its step)
    from avs_dist.evaluate import main as eval_main

    assert eval_main(["--checkpoint", str(run_dir), "--shards", str(s4_shards), "--no-audio-gap",
                      "--out", str(tmp_path / "eval.json"), "--device", "cpu", "data.num_workers=0"]) == 0
    source = json.loads((tmp_path / "eval.json").read_text())["source"]
    assert (source["kind"], source["step"], source["selected_by"]) == ("best", best["step"], "val miou")
    assert source["value"] == pytest.approx(final["best_val_miou"])


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_optimizer_kernels_take_the_same_step(impl):
    """optim.impl only picks torch's Adam kernel: the same update as the default one (float64)."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)).double()
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)).double()
    other.load_state_dict(ref.state_dict())
    opts = [build_optimizer(m, load_config("tiny", [f"optim.impl={i}"])) for m, i in ((ref, "default"), (other, impl))]
    x = torch.randn(16, 4, dtype=torch.float64)
    for _ in range(3):
        for model, opt in zip((ref, other), opts):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(ref.parameters(), other.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert opts[1].defaults[impl] is True
