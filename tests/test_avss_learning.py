"""AVSBench-semantic learns on CPU, by listening, and resumes on another world size.

The synthetic AVSS set (avss/synth.py: 3 classes, clips of 5 and 10 frames, 2-3 objects per
frame, only the sounding ones in the mask with their class, twins with the same frames and
another object sounding) cannot be fitted without the audio. `tiny_avss` trains on it under
2-process DDP for the first half, then resumes on 1 process (the global batch fixed at 8
clips: the elastic path) with bucketed global batches of mixed clip lengths; every step's clips
are those the data order plans, whatever the world size. The last model then segments the test
clips' objects far above the trivial baselines (all background; one object class everywhere),
and worse with another clip's audio (the audio gap).

ZeRO-2 is the same training as DDP step by step (test_tiny_avss_zero2_steps_equal_ddp): the
losses and gradient norms of its first steps equal DDP's to float32 rounding, so what the DDP
run learns, ZeRO-2 learns.

Measured (2 cores, 48 clips, 3 classes, 150 steps): docs/learning-notes.md "AVSBench-semantic".
"""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from procs import run_session
from helpers import videos_per_step

pytestmark = pytest.mark.slow

STEPS, HALF = 150, 75
COMMON = ["data.global_batch_videos=8", "data.num_workers=0", "train.eval_every_steps=0", "train.eval_every_epochs=0",
          "train.ckpt_every_steps=50", "train.image_every_steps=0", "train.record_videos=true",
          "train.log_every_steps=10"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """48 synthetic AVSS clips of 3 classes at 64 px (36 train: 12 v1s, 12 v1m of 5 frames,
    12 v2 of 10), packed as tiny_avss reads them."""
    from avs_dist.data import synth
    from avs_dist.data.pack import pack

    root = tmp_path_factory.mktemp("avss_learn_synth")
    synth.generate(root, videos=48, size=64, subset="avss", seed=0, classes=3)
    out = tmp_path_factory.mktemp("avss_learn_shards")
    pack(root, "avss", out, image_size=64, workers=1, progress=False, log=lambda *a, **k: None)
    return out


def _train(shards, run_dir, nproc, steps, *extra, timeout=900):
    cmd = [sys.executable, "-m", "avs_dist.cli", "train", "--config", "tiny_avss", "--shards", str(shards),
           "--run-dir", str(run_dir), "--nproc", str(nproc), f"train.max_steps={steps}", *COMMON, *extra]
    rc, out = run_session(cmd, timeout=timeout)
    assert rc == 0, out[-5000:]
    return out





def _planned(shards, steps, seed) -> tuple[dict[int, list[str]], dict[int, int]]:
    """The global batches of steps 1..steps (bucketed by clip length) and each one's frames."""
    from avs_dist.data.loader import TrainOrder
    from avs_dist.data.shards import iter_videos

    order = TrainOrder.from_shards(shards, seed=seed, global_batch=8, bucket=True)
    names = {i: v["name"] for i, v in enumerate(iter_videos(shards, "train", crops=False))}
    batches, frames = {}, {}
    for k in range(steps):
        epoch, step = divmod(k, order.steps_per_epoch)
        videos, _ = order.epoch(epoch)
        batches[k + 1] = sorted(names[int(i)] for i in videos[step * 8:(step + 1) * 8])
        frames[k + 1] = order.step_frames(k)
    return batches, frames


def baselines(shards) -> dict:
    """Object-class mIoU (frame level, classes present, background apart) on the test clips of
    predicting all background, and of predicting each object class over the whole frame."""
    from avs_dist.avss.metrics import SemanticEvaluator
    from avs_dist.config import load_config
    from avs_dist.data.loader import eval_loader

    cfg = load_config("tiny_avss", ["data.num_workers=0"])
    batches = list(eval_loader(shards, "test", cfg.data))
    classes = sorted({int(c) for b in batches for c in b["masks"].unique() if int(c) > 0})
    out = {}
    for name, cls in [("background", 0), *((f"class {c} everywhere", c) for c in classes)]:
        ev = SemanticEvaluator()
        for b in batches:
            masks = b["masks"].flatten(0, 1)
            logits = torch.zeros(masks.shape[0], 71, *masks.shape[-2:])
            logits[:, cls] = 1.0
            ev.update(logits, masks, b["frame_exists"].reshape(-1), b["mask_valid"].reshape(-1))
        out[name] = ev.result()["miou_frame_objects"]
    return out


def test_tiny_avss_learns_under_ddp_and_resumes_on_another_world_size(shards, tmp_path):
    run_dir = tmp_path / "run"
    _train(shards, run_dir, 2, HALF)         # steps 1-75 on 2 ranks
    out = _train(shards, run_dir, 1, STEPS)  # 2 -> 1: steps 76-150
    assert "written by 2 ranks, this run has 1" in out and "resumed from" in out

    planned, frames = _planned(shards, STEPS, seed=123)  # tiny_avss's train.seed
    assert videos_per_step(run_dir) == planned  # every step's clips, across the resume
    assert {frames[s] for s in planned} >= {40, 80}  # global batches of 5-frame and of 10-frame clips
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and not any(r["skipped"] for r in rows)

    final = json.loads((run_dir / "final_metrics.json").read_text())
    test = final["test"]
    base = baselines(shards)
    report = {k: test[k] for k in ("miou_frame_objects", "miou_dataset_objects", "iou_frame_background", "miou",
                                   "miou_avsbench", "audio_gap", "miou_mismatched")}
    report.update(baselines=base, per_class_gap=test.get("audio_gap_per_class"), world_size=final["world_size"])
    print(json.dumps(report, indent=1))
    assert final["status"] == "completed" and final["step"] == STEPS and final["world_size"] == 1, report
    assert test["miou_frame_objects"] > max(base.values()) + 0.2, report
    assert test["iou_frame_background"] > 0.9, report
    assert test["audio_gap"] > 0 and test["miou_mismatched"] < test["miou"], report


CROP_TERMS = ("crop_ce", "crop_pair", "crop_audio")


def test_tiny_avss_zero2_steps_equal_ddp(shards, tmp_path):
    """2 ranks, 3 steps, without clipping (test_train_strategies.py says why), with avss_seed's
    whole objective (the AVM term and the crop branch with its three terms on object crops cut
    in the forward): every term finite, and the same losses and gradient norms under ZeRO-2 as
    under DDP. (Also the 2-process DDP run of the AVSS crop branch, tests/test_avss_crops.py.)"""
    runs = {}
    for strategy in ("ddp", "zero2"):
        run_dir = tmp_path / strategy
        _train(shards, run_dir, 2, 3, f"train.strategy={strategy}", "optim.grad_clip=0", "optim.warmup_steps=3",
               "train.log_every_steps=1", "loss.avm=true", "train.audio_gap_eval=false", "model.crop_branch=true",
               *[f"loss.{t}=true" for t in CROP_TERMS], timeout=600)
        runs[strategy] = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in runs["ddp"]] == [1, 2, 3]
    for r in runs["ddp"]:
        for key in ("total", "ce", "avm", *CROP_TERMS, "grad_norm"):
            assert math.isfinite(r[key]), (r["step"], key, r[key])
        assert r["crop_ce"] > 0
    assert [r["step"] for r in runs["zero2"]] == [1, 2, 3]
    for a, b in zip(runs["ddp"], runs["zero2"]):
        for key in ("total", "ce", "avm", *CROP_TERMS, "grad_norm", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (b["step"], key, a[key], b[key])
