"""One owner per run directory (train/runlock.py): a second run is refused at once with the
owner's host and pid, and an owner killed with SIGKILL leaves nothing that blocks a resume."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from procs import kill_session, run_session
from avs_dist.train.runlock import RunDirBusy, RunLock

HOLD = ("import sys, time; from avs_dist.train.runlock import RunLock; "
        "RunLock.acquire(sys.argv[1], 'test holder'); print('held', flush=True); time.sleep(600)")


def _holder(run_dir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_owner_refused_with_host_and_pid_until_the_owner_is_killed(tmp_path):
    holder = _holder(tmp_path / "run")
    try:
        with pytest.raises(RunDirBusy) as e:
            RunLock.acquire(tmp_path / "run", "second")
        msg = str(e.value)
        assert f"pid {holder.pid}" in msg and f"host {socket.gethostname()}" in msg and "test holder" in msg
        assert "\n" not in msg and "STOP" in msg
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        lock = RunLock.acquire(tmp_path / "run", "second")  # the dead owner's lock is gone with it
        assert json.loads((tmp_path / "run" / "owner.lock").read_text())["pid"] == os.getpid()
        lock.release()
    finally:
        kill_session(holder)


def test_wait_takes_the_lock_once_the_owner_dies(tmp_path):
    holder = _holder(tmp_path / "run")
    try:
        subprocess.Popen(["bash", "-c", f"sleep 1.5; kill -9 {holder.pid}"])
        t0 = time.monotonic()
        RunLock.acquire(tmp_path / "run", "requeued", wait_s=30).release()
        assert 1.0 < time.monotonic() - t0 < 30
    finally:
        kill_session(holder)


@pytest.mark.slow
def test_second_run_refused_then_resume_after_sigkill(s4_shards, tmp_path):
    """The owner is the rank entry itself (plain torchrun's rank 0, world of one); the second run
    is `avs-dist train`: refused before it touches the folder; after kill -9 it resumes."""
    run_dir = tmp_path / "run"
    common = ["--config", "tiny", "--shards", str(s4_shards), "--run-dir", str(run_dir), "data.batch_videos=2",
              "data.num_workers=0", "train.ckpt_every_steps=2", "train.eval_every_epochs=0",
              "train.audio_gap_eval=false"]
    owner = subprocess.Popen([sys.executable, "-m", "avs_dist.launch.rank", *common, "train.max_steps=200"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        end = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "step_00000002").is_dir():
            assert owner.poll() is None and time.monotonic() < end, "no checkpoint at step 2"
            time.sleep(0.2)
        (run_dir / "STOP.keep").write_text("")  # a file of the live run the second must not touch
        rc, out = run_session([sys.executable, "-m", "avs_dist.cli", "train", *common, "train.max_steps=3"], 120)
        assert rc == 2, out
        assert f"in use by another run: rank 0 of a torchrun run on host {socket.gethostname()}, pid {owner.pid}" in out
        assert "Traceback" not in out and owner.poll() is None
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        done = max(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*"))
        # with stale rendezvous variables, which a world of one ignores (they made it retry for 600 s)
        env = {**os.environ, "MASTER_ADDR": "no-such-host.invalid", "MASTER_PORT": "29555"}
        rc, out = run_session([sys.executable, "-m", "avs_dist.cli", "train", *common,
                               f"train.max_steps={done + 1}"], 300, env=env)
        assert rc == 0, out
        assert f"resumed from {run_dir / 'checkpoints' / f'step_{done:08d}'}" in out
    finally:
        kill_session(owner)
