"""Exact resume: a run stopped at step k and resumed logs the same losses at every later step as
an uninterrupted run (bit-identical on CPU in fp32), for DDP and DeepSpeed ZeRO-2, 2 processes.

The data come from the shared `s4_shards` fixture (8 train videos): with 2 ranks and 2 videos
per batch an epoch is 2 batches per rank, so the runs cross epoch boundaries, validate at every
epoch end and resume in the middle of an epoch.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from procs import run_session

pytestmark = pytest.mark.slow

# Constant LR after warm-up: the k-step run and the full run must share their schedule, and a
# cosine horizon is max_steps (which differs between them).
COMMON = ["data.batch_videos=2", "data.num_workers=1", "train.ckpt_every_steps=2", "train.keep_last=5",
          "train.audio_gap_eval=false", "optim.schedule=constant", "optim.warmup_steps=2",
          "train.log_every_steps=4"]
TIMEOUT_S = 300


def train(shards, run_dir, *overrides, nproc=2, extra=()):
    """`avs-dist train` in its own session; the session is killed if anything is left behind."""
    cmd = [sys.executable, "-m", "avs_dist.cli", "train", "--config", "tiny", "--shards", str(shards),
           "--run-dir", str(run_dir), "--nproc", str(nproc), *extra, *COMMON, *overrides]
    return run_session(cmd, timeout=TIMEOUT_S)


def steps(run_dir) -> list[dict]:
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return lines


LOSS_KEYS = ("total", "bce", "crop_ce", "crop_pair", "crop_audio", "lr", "grad_norm", "epoch")


def assert_same_curves(full, resumed, n):
    assert [r["step"] for r in full] == list(range(1, n + 1))
    assert [r["step"] for r in resumed] == list(range(1, n + 1))
    for a, b in zip(full, resumed):
        for key in LOSS_KEYS:
            assert a[key] == b[key], f"step {a['step']}: {key} {a[key]!r} != {b[key]!r}"


def assert_same_weights(run_a, run_b, step):
    name = f"checkpoints/step_{step:08d}/model.pt"
    a = torch.load(Path(run_a) / name, weights_only=False)["model"]
    b = torch.load(Path(run_b) / name, weights_only=False)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_quiet_summary(out: str, run_dir, ranks: int) -> None:
    """Issue 18: what a 2-rank `avs-dist train` prints is said once and is true: the launcher's
    one line on OMP_NUM_THREADS instead of torchrun's banner, no DDP find_unused_parameters
    warning from each rank (expected on gloo), one short summary naming the results file."""
    assert "Setting OMP_NUM_THREADS" not in out and out.count("OMP_NUM_THREADS=") == 1, out
    assert f"cores / {ranks} ranks" in out
    assert "find_unused_parameters" not in out, out
    assert out.count("run summary") == 1 and "last eval" not in out and "final val/" not in out
    assert str(Path(run_dir) / "RESULTS.md") in out and (Path(run_dir) / "RESULTS.md").is_file()


def test_ddp_resume_is_bit_identical(s4_shards, tmp_path):
    n, k = 6, 3
    full, part = tmp_path / "full", tmp_path / "part"
    rc, out = train(s4_shards, full, f"train.max_steps={n}", "train.eval_every_epochs=1")
    assert rc == 0, out
    assert_quiet_summary(out, full, ranks=2)
    rc, out = train(s4_shards, part, f"train.max_steps={k}", "train.eval_every_epochs=1")
    assert rc == 0, out
    assert [r["step"] for r in steps(part)] == list(range(1, k + 1))

    # Newer checkpoints that must be passed over: one corrupt (sha256 mismatch), one whose
    # writer died before COMPLETE.json.
    src = part / "checkpoints" / f"step_{k:08d}"
    corrupt, incomplete = part / "checkpoints" / "step_00000005", part / "checkpoints" / "step_00000006"
    shutil.copytree(src, corrupt)
    with open(corrupt / "model.pt", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    shutil.copytree(src, incomplete)
    (incomplete / "COMPLETE.json").unlink()

    rc, out = train(s4_shards, part, f"train.max_steps={n}", "train.eval_every_epochs=1")
    assert rc == 0, out
    assert "step_00000006: COMPLETE.json missing" in out
    assert "step_00000005: model.pt sha256 mismatch" in out
    assert f"resumed from {src}" in out
    assert_same_curves(steps(full), steps(part), n)
    assert_same_weights(full, part, n)
    # validation ran at every epoch end in both runs, with the same results
    evals = [json.loads(x) for x in (full / "eval.jsonl").read_text().splitlines()]
    evals_r = [json.loads(x) for x in (part / "eval.jsonl").read_text().splitlines()]
    # (the k-step run was a complete run of its own: its final test eval at step k stays logged)
    evals_r = [r for r in evals_r if not (r["split"] == "test" and r["step"] == k)]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert strip(evals) == strip(evals_r)
    assert [(r["step"], r["split"]) for r in evals] == [(2, "val"), (4, "val"), (6, "val"), (6, "test")]
    final = json.loads((part / "final_metrics.json").read_text())
    assert final["status"] == "completed" and final["step"] == n
    assert "miou" in final["test"] and "miou" in final["val"]

    # what cannot change on resume is refused before any process starts: one line, what to do
    rc, out = train(s4_shards, part, f"train.max_steps={n + 2}", "train.eval_every_epochs=1", "model.decoder_channels=16")
    assert rc == 2 and "Traceback" not in out, out
    assert [line for line in out.splitlines() if line.startswith("avs-dist train:")] == [
        f"avs-dist train: cannot resume from {part / 'checkpoints' / f'step_{n:08d}'}: model.decoder_channels is 16 "
        "here but 32 in the checkpoint (the checkpoint's weights are those of its model): set "
        "model.decoder_channels=32 to resume it; or start a new --run-dir"], out
    assert not any(k.startswith("vggish.") for k in torch.load(part / "checkpoints" / f"step_{n:08d}" / "model.pt",
                                                               weights_only=False)["model"])  # frozen: never stored


def test_zero2_resume_is_bit_identical(s4_shards, tmp_path):
    n, k = 4, 2
    common = ["train.strategy=zero2", "optim.grad_accum=2", "train.eval_every_epochs=0"]
    full, part = tmp_path / "full", tmp_path / "part"
    rc, out = train(s4_shards, full, f"train.max_steps={n}", *common)
    assert rc == 0, out
    rc, out = train(s4_shards, part, f"train.max_steps={k}", *common)
    assert rc == 0, out
    ds = part / "checkpoints" / f"step_{k:08d}" / "ds"
    assert (ds / "state").is_dir()  # the engine's own (sharded) checkpoint
    # it holds the optimizer partitions; not the frozen VGGish, nor the weights (model.pt has them)
    states = torch.load(ds / "state" / "mp_rank_00_model_states.pt", weights_only=False)
    assert states["module"] and all("running_" in key or "num_batches" in key for key in states["module"])
    assert not states.get("frozen_param_fragments")
    assert "checkpoint " in out and " MB (ds/ " in out  # its size, reported
    rc, out = train(s4_shards, part, f"train.max_steps={n}", *common)
    assert rc == 0, out
    assert "resumed from" in out
    assert_same_curves(steps(full), steps(part), n)
    assert_same_weights(full, part, n)
