"""Failures: a SIGKILLed worker under --max-restarts 1 still ends in a completed run (resumed from
the last checkpoint), and SIGTERM to one rank makes every rank checkpoint and exit cleanly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from procs import kill_session
from avs_dist.train import checkpoint as ckpt

pytestmark = pytest.mark.slow

COMMON = ["data.batch_videos=2", "data.num_workers=1", "train.ckpt_every_steps=2", "train.audio_gap_eval=false",
          "train.eval_every_epochs=0", "train.log_every_steps=1"]
TIMEOUT_S = 300


@pytest.fixture
def launch():
    """Start `avs-dist train` in its own session; every session started is killed at teardown."""
    procs = []

    def start(shards, run_dir, *args):
        cmd = [sys.executable, "-m", "avs_dist.cli", "train", "--config", "tiny", "--shards", str(shards),
               "--run-dir", str(run_dir), "--nproc", "2", *args, *COMMON]
        log = open(Path(run_dir).parent / f"{Path(run_dir).name}.log", "w+")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        procs.append((proc, log))
        return proc, log

    yield start
    for proc, log in procs:
        kill_session(proc)
        log.close()


def wait_for(predicate, proc, what, timeout=TIMEOUT_S):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def output(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()


def rank_pid(run_dir, rank) -> int:
    return int((Path(run_dir) / "pids" / f"rank{rank}.pid").read_text())


def logged_steps(run_dir) -> list[int]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x)["step"] for x in path.read_text().splitlines()] if path.exists() else []


def test_sigkill_of_a_worker_restarts_and_completes(s4_shards, tmp_path, launch):
    run_dir, n = tmp_path / "run", 10
    proc, log = launch(s4_shards, run_dir, "--max-restarts", "1", f"train.max_steps={n}")
    wait_for(lambda: ckpt.latest_valid(run_dir, lambda m: None) is not None, proc, "the first checkpoint")
    victim = rank_pid(run_dir, 1)
    os.kill(victim, signal.SIGKILL)
    proc.wait(timeout=TIMEOUT_S)
    out = output(log)
    assert proc.returncode == 0, out
    assert "resumed from" in out, out
    assert rank_pid(run_dir, 1) != victim  # rank 1 was restarted
    assert logged_steps(run_dir) == list(range(1, n + 1))  # every step exactly once
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["status"] == "completed" and final["step"] == n


def test_sigterm_saves_on_every_rank_and_exits_cleanly(s4_shards, tmp_path, launch):
    run_dir, n = tmp_path / "run", 40
    proc, log = launch(s4_shards, run_dir, f"train.max_steps={n}")
    wait_for(lambda: len(logged_steps(run_dir)) >= 1, proc, "the first step")
    os.kill(rank_pid(run_dir, 1), signal.SIGTERM)  # one rank only: the flag is combined over ranks
    proc.wait(timeout=TIMEOUT_S)
    out = output(log)
    assert proc.returncode == 0, out
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "stopped", status
    stopped_at = status["step"]
    assert 1 <= stopped_at < n
    latest = ckpt.latest_valid(run_dir)
    assert latest.name == ckpt.step_name(stopped_at)  # the stop checkpoint
    assert (latest / "trainer.pt").is_file()
    assert logged_steps(run_dir) == list(range(1, stopped_at + 1))
    assert not (run_dir / "final_metrics.json").exists()
    assert f"stop requested: checkpoint at step {stopped_at} written" in out
