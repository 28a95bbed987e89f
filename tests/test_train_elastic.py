"""Elastic resume: a run saved by 4 ranks continues on 2, and one saved by 2 continues on 4,
under DDP and ZeRO-2, with the same global batches (video names of every step), the step count
and the lr schedule continuing, and every step logged once.

The fixed global batch is 4 videos (data.global_batch_videos=4): 1 video per rank per step on
4 ranks, 2 on 2. The s4_shards fixture has 8 train videos: 2 steps per epoch, so the 6 steps
cross two epoch boundaries and each resume starts an epoch's second step (4 -> 2 at step 3)
or its first (2 -> 4 at step 5).

The second resume also lowers optim.lr: the restored optimizer (DeepSpeed's universal
checkpoint under ZeRO) runs at the new lr on the same warm-up, and says so."""
from __future__ import annotations

import json
import sys

import pytest

from procs import run_session
from helpers import videos_per_step
from avs_dist.data.loader import TrainOrder

pytestmark = pytest.mark.slow

COMMON = ["data.global_batch_videos=4", "data.num_workers=0", "train.ckpt_every_steps=100", "train.keep_last=5",
          "train.eval_every_epochs=0", "train.audio_gap_eval=false", "train.record_videos=true",
          "optim.schedule=constant", "optim.warmup_steps=6", "train.log_every_steps=1", "train.image_every_steps=0"]


def _train(shards, run_dir, nproc, steps, *extra):
    cmd = [sys.executable, "-m", "avs_dist.cli", "train", "--config", "tiny", "--shards", str(shards),
           "--run-dir", str(run_dir), "--nproc", str(nproc), f"train.max_steps={steps}", *COMMON, *extra]
    rc, out = run_session(cmd, timeout=400)
    assert rc == 0, out
    return out





def _planned(shards, steps) -> dict[int, list[str]]:
    """The global batches of steps 1..steps: a function of (seed, epoch, global batch) only."""
    from avs_dist.data.shards import iter_videos

    order = TrainOrder.from_shards(shards, seed=123, global_batch=4)  # tiny's train.seed
    names = {i: v["name"] for i, v in enumerate(iter_videos(shards, "train", crops=False))}
    out = {}
    for k in range(steps):
        epoch, step = divmod(k, order.steps_per_epoch)
        videos, _ = order.epoch(epoch)
        out[k + 1] = sorted(names[int(i)] for i in videos[step * 4:(step + 1) * 4])
    return out


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_resume_on_another_world_size(s4_shards, tmp_path, strategy):
    run_dir = tmp_path / "run"
    extra = [f"train.strategy={strategy}"]
    _train(s4_shards, run_dir, 4, 2, *extra)       # steps 1-2 on 4 ranks
    out = _train(s4_shards, run_dir, 2, 4, *extra)  # 4 -> 2: steps 3-4
    assert "written by 4 ranks, this run has 2" in out and "resumed from" in out
    out = _train(s4_shards, run_dir, 4, 6, *extra, "optim.lr=1e-3")  # 2 -> 4: steps 5-6, at another lr
    assert "written by 2 ranks, this run has 4" in out
    assert "resume: optim.lr 0.002 -> 0.001 (applied)" in out

    assert videos_per_step(run_dir) == _planned(s4_shards, 6)  # no video twice or skipped in any step
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in rows] == [0, 0, 1, 1, 2, 2]
    lr = [2e-3] * 4 + [1e-3] * 2
    assert [r["lr"] for r in rows] == pytest.approx([lr[s - 1] * s / 6 for s in range(1, 7)], rel=1e-12)
    assert json.loads((run_dir / "config.json").read_text())["optim"]["lr"] == 1e-3
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["status"] == "completed" and final["step"] == 6 and final["world_size"] == 4
    assert final["global_batch_videos"] == 4
    if strategy == "ddp":  # another global batch would be another data order: refused before any rank starts
        cmd = [sys.executable, "-m", "avs_dist.cli", "train", "--config", "tiny", "--shards", str(s4_shards),
               "--run-dir", str(run_dir), "--nproc", "1", "train.max_steps=7",
               *[c for c in COMMON if not c.startswith("data.global_batch_videos")], "data.batch_videos=2"]
        rc, out = run_session(cmd, timeout=300)
        assert rc == 2, out
        assert "Traceback" not in out
        assert [line for line in out.splitlines() if line.startswith("avs-dist train:")] == [
            f"avs-dist train: cannot resume from {run_dir / 'checkpoints' / 'step_00000006'}: the global batch is 2 "
            "videos per step here but 4 in the checkpoint (it fixes the data order; data.batch_videos x ranks x "
            "optim.grad_accum unless data.global_batch_videos is set): set data.global_batch_videos=4 to continue "
            "it; or start a new --run-dir"], out


