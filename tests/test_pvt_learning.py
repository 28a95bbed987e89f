"""The PVT-v2 model learns, and learns to listen: the `tiny_pvt` preset (pvt_v2_b0, 32 decoder
channels, 64 px; the s4_pvt code path) trained through the command line exactly as a user
would (`avs-dist train --config tiny_pvt --nproc 2`, 2-process DDP on CPU, then `avs-dist eval`
of the best checkpoint on test) on the demo's synthetic set (40 S4 videos, 3 classes, twin
scenes: the masks need the audio, see test_train_learning.py).

It must reach a val and test mIoU well above the trivial baselines (all background, all
foreground, on the same masks) and a clearly positive audio gap. Measured (2 cores, shared):
docs/learning-notes.md, "The PVT-v2 model".
"""
from __future__ import annotations

import json
import sys

import pytest

from procs import run_session
from test_train_learning import assert_learned

pytestmark = pytest.mark.slow

TIMEOUT_S = 1200


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "avs_dist.cli", *args]


def test_tiny_pvt_learns_to_segment_the_sounding_object(tmp_path):
    data, shards, run = tmp_path / "avsbench", tmp_path / "shards", tmp_path / "run"
    for cmd in (_cli("synth", "--out", str(data), "--videos", "40", "--size", "64", "--subset", "s4", "--seed", "0",
                     "--classes", "3"),
                _cli("pack", "--data-root", str(data), "--subset", "s4", "--out", str(shards), "--boxes",
                     str(data / "boxes" / "Single-source"), "--crop-size", "32", "--workers", "2")):
        rc, log = run_session(cmd, timeout=300)
        assert rc == 0, log[-3000:]
    rc, log = run_session(_cli("train", "--config", "tiny_pvt", "--shards", str(shards), "--run-dir", str(run),
                               "--nproc", "2", "--resume", "never"), timeout=TIMEOUT_S)
    assert rc == 0, log[-5000:]
    out = tmp_path / "eval_test.json"
    rc, log = run_session(_cli("eval", "--checkpoint", str(run / "checkpoints" / "best"), "--shards", str(shards),
                               "--split", "test", "--out", str(out)), timeout=300)
    assert rc == 0, log[-5000:]
    final = json.loads((run / "final_metrics.json").read_text())
    test = json.loads(out.read_text())
    assert_learned(final, test, shards)
