"""The PVT-v2 model under DeepSpeed ZeRO-2, 2 processes: a run stopped at step k and resumed
logs the same losses at every later step and ends with the same weights as an uninterrupted
run, with drop-path on. Drop-path draws from torch's RNG, which the trainer seeds per rank and
saves in its checkpoints; this is where a missed RNG stream shows. (The loader's workers draw
their seeds from a generator of their own, data/loader.py, not from these streams.)"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from procs import run_session
from test_train_resume import COMMON, assert_same_weights

pytestmark = pytest.mark.slow

TIMEOUT_S = 300
OVERRIDES = ["train.strategy=zero2", "optim.grad_accum=2", "train.eval_every_epochs=0", "train.eval_every_steps=0",
             "model.drop_path=0.1"]


def train(shards, run_dir, *overrides):
    cmd = [sys.executable, "-m", "avs_dist.cli", "train", "--config", "tiny_pvt", "--shards", str(shards),
           "--run-dir", str(run_dir), "--nproc", "2", *COMMON, *OVERRIDES, *overrides]
    return run_session(cmd, timeout=TIMEOUT_S)


def curves(run_dir) -> list[dict]:
    keep = ("step", "epoch", "total", "bce", "lr", "grad_norm")
    return [{k: r[k] for k in keep} for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())]


def test_pvt_zero2_resume_is_bit_identical(s4_shards, tmp_path):
    n, k = 4, 2
    full, part = tmp_path / "full", tmp_path / "part"
    rc, out = train(s4_shards, full, f"train.max_steps={n}")
    assert rc == 0, out
    rc, out = train(s4_shards, part, f"train.max_steps={k}")
    assert rc == 0, out
    rc, out = train(s4_shards, part, f"train.max_steps={n}")
    assert rc == 0, out
    assert "resumed from" in out
    assert [r["step"] for r in curves(full)] == list(range(1, n + 1))
    assert curves(full) == curves(part)
    assert_same_weights(full, part, n)
