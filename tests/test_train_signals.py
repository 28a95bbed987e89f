"""Stop signals to any process of an `avs-dist train --nproc 2` run: the launcher, torchrun or a
rank; SIGTERM, SIGUSR2, SIGINT, SIGHUP. Each must end in one stop checkpoint, status "stopped",
exit code 0 and no process left. torchrun or the launcher killed with SIGKILL: the ranks notice
and end."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from procs import kill_env, kill_session, pids_with_env
from avs_dist.train import checkpoint as ckpt

pytestmark = pytest.mark.slow

COMMON = ["data.batch_videos=2", "data.num_workers=0", "train.max_steps=200", "train.ckpt_every_steps=1000",
          "train.eval_every_epochs=0", "train.audio_gap_eval=false", "train.log_every_steps=1"]
TIMEOUT_S = 300


def _steps(run_dir) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture
def start(s4_shards, tmp_path):
    started = []

    def go():
        run_dir = tmp_path / "run"
        log = open(tmp_path / "run.log", "w+")
        cmd = [sys.executable, "-m", "avs_dist.cli", "train", "--config", "tiny", "--shards", str(s4_shards),
               "--run-dir", str(run_dir), "--nproc", "2", *COMMON]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        started.append((proc, log))
        end = time.monotonic() + TIMEOUT_S
        while _steps(run_dir) < 3:
            assert proc.poll() is None, f"training ended ({proc.returncode}) before step 3"
            assert time.monotonic() < end, "no 3 steps in time"
            time.sleep(0.1)
        return proc, log, run_dir

    yield go
    for proc, log in started:
        kill_env("AVS_LAUNCHER_PID", str(proc.pid))
        kill_session(proc)
        log.close()


def _target(proc, run_dir, who: str) -> int:
    if who == "launcher":
        return proc.pid
    if who == "rank":
        return int((run_dir / "pids" / "rank1.pid").read_text())
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 1, children  # the launcher's one child is torchrun
    return int(children[0])


def _assert_stopped_cleanly(proc, log, run_dir):
    rc = proc.wait(timeout=TIMEOUT_S)
    log.seek(0)
    out = log.read()
    assert rc == 0, out
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "stopped", status
    stopped_at = status["step"]
    assert 3 <= stopped_at < 200
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [stopped_at]  # one stop checkpoint
    assert ckpt.verify(run_dir / "checkpoints" / ckpt.step_name(stopped_at)) is None
    assert f"stop requested: checkpoint at step {stopped_at} written" in out
    assert f"run stopped at step {stopped_at}/200" in out
    assert not (run_dir / "STOP").exists()  # the request was consumed
    time.sleep(0.5)
    assert pids_with_env("AVS_LAUNCHER_PID", str(proc.pid)) == []  # torchrun, ranks, workers: all gone
    return out


# Each path once: the launcher's handler is the same for all four stop signals (the reported
# case is SIGUSR2), torchrun passes a signal on to the ranks (TERM; USR2 where its torch
# handles it) or dies, and a rank's handler is the same for all four too.
@pytest.mark.parametrize("who, sig", [
    ("launcher", signal.SIGUSR2),  # the case reported: the launcher died at once, ranks trained on
    ("torchrun", signal.SIGTERM),
    ("torchrun", signal.SIGKILL),  # torchrun gone without a word: the orphaned ranks must notice
    ("rank", signal.SIGHUP),
], ids=lambda x: x.name if isinstance(x, signal.Signals) else x)
def test_stop_signal_to_any_process(start, who, sig):
    proc, log, run_dir = start()
    os.kill(_target(proc, run_dir, who), sig)
    out = _assert_stopped_cleanly(proc, log, run_dir)
    if who == "launcher":
        assert f"avs-dist train: {sig.name}: every rank saves a checkpoint" in out


def test_second_signal_to_the_launcher_aborts(start):
    """The first signal asks for a stop checkpoint; a second one ends every process at once."""
    proc, log, run_dir = start()
    os.kill(proc.pid, signal.SIGINT)
    end = time.monotonic() + 60
    while "every rank saves a checkpoint" not in Path(log.name).read_text():  # two signals at once are one
        assert time.monotonic() < end and proc.poll() is None
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    rc = proc.wait(timeout=TIMEOUT_S)
    log.seek(0)
    out = log.read()
    assert rc == 1, out
    assert "SIGINT again: aborting without a checkpoint" in out and "the run failed" in out
    time.sleep(0.5)
    assert pids_with_env("AVS_LAUNCHER_PID", str(proc.pid)) == []


def test_sigkill_of_the_launcher_ends_the_ranks(start):
    proc, log, run_dir = start()
    ranks = [int(p.read_text()) for p in sorted((run_dir / "pids").glob("rank*.pid"))]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    t0 = time.monotonic()
    while any(Path(f"/proc/{pid}").exists() for pid in ranks) and time.monotonic() - t0 < 60:
        time.sleep(0.2)
    waited = time.monotonic() - t0
    assert waited < 60, "ranks still training a minute after their launcher died"
    time.sleep(1)
    assert pids_with_env("AVS_LAUNCHER_PID", str(proc.pid)) == []
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "stopped"  # they still saved a stop checkpoint on the way out
    assert ckpt.latest_valid(run_dir).name == ckpt.step_name(status["step"])
    log.seek(0)
    assert "the launcher (avs-dist train)" in log.read()
