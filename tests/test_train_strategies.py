"""Every logged figure means the same under DDP and each ZeRO stage: the value of that step.

The same three steps (one rank, fp32 on CPU, warm-up over 3 steps, 2 micro-batches per step)
under ddp, zero1, zero2 and zero3. DeepSpeed steps its optimizer inside its own engine; the lr
logged must still be the one that step applied (6.67e-4, 1.33e-3, 2e-3 for lr 2e-3), and the
losses and gradient norms those of the same step.

Without clipping the runs agree to float32 rounding. (With optim.grad_clip they drift apart
by ~1e-3 within three steps: DeepSpeed sums the squares of the gradient norm in another order,
and the ~1e-7 difference in the clip factor grows fast in the tiny model's small-batch
BatchNorms; a step shifted by one differs by 20-100%.)"""
from __future__ import annotations

import json
import sys

import pytest

from procs import run_session

pytestmark = pytest.mark.slow

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")


def _run(shards, run_dir, strategy):
    cmd = [sys.executable, "-m", "avs_dist.cli", "train", "--config", "tiny", "--shards", str(shards),
           "--run-dir", str(run_dir), f"train.strategy={strategy}", "train.max_steps=3", "optim.warmup_steps=3",
           "optim.grad_accum=2", "data.batch_videos=2", "data.num_workers=0", "train.eval_every_steps=0",
           "train.audio_gap_eval=false", "train.image_every_steps=0", "optim.grad_clip=0"]
    rc, out = run_session(cmd, timeout=300)
    assert rc == 0, out
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_strategies_log_the_same_step_figures(s4_shards, tmp_path):
    runs = {s: _run(s4_shards, tmp_path / s, s) for s in STRATEGIES}
    ddp = runs["ddp"]
    assert [r["step"] for r in ddp] == [1, 2, 3]
    assert [r["lr"] for r in ddp] == pytest.approx([2e-3 / 3, 4e-3 / 3, 2e-3], rel=1e-12)
    for name, rows in runs.items():
        assert [r["step"] for r in rows] == [1, 2, 3], name
        for a, b in zip(ddp, rows):
            assert b["lr"] == pytest.approx(a["lr"], rel=1e-12), (name, b["step"], "lr")
            for key in ("total", "bce", "crop_ce", "crop_pair", "crop_audio", "grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (name, b["step"], key)
            assert b["epoch"] == a["epoch"]
            assert b["frames_per_s"] > 0 and 0 <= b["data_wait_frac"] <= 1, (name, b)
