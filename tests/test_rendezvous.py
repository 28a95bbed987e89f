"""The wait before training (distributed.rendezvous): bounded by train.rendezvous_timeout_s,
ended by a stop signal within seconds, and its error names host, port and the ranks present.
A world of one needs no rendezvous host (stale MASTER_ADDR: tests/test_runlock.py's resume)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from procs import kill_session
from avs_dist import distributed
from avs_dist.distributed import RendezvousError


@pytest.fixture
def world_of_two(monkeypatch):
    port = distributed.free_port()  # nobody listens there
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    return port


def test_stop_ends_the_wait_for_the_store(world_of_two):
    t0 = time.monotonic()
    stopped = lambda: "SIGTERM" if time.monotonic() - t0 > 1 else None  # noqa: E731
    with pytest.raises(RendezvousError) as e:
        distributed.rendezvous(1, 2, timeout_s=600, stopped=stopped)
    assert time.monotonic() - t0 < 10
    assert str(e.value).startswith(f"rendezvous at MASTER_ADDR:MASTER_PORT=127.0.0.1:{world_of_two} (rank 1 of 2) "
                                   "stopped (SIGTERM) while waiting for the store")


def test_timeout_names_the_ranks_present(world_of_two):
    t0 = time.monotonic()
    with pytest.raises(RendezvousError) as e:
        distributed.rendezvous(0, 3, timeout_s=1.5)
    assert 1.5 <= time.monotonic() - t0 < 10
    assert "timed out after 2 s (train.rendezvous_timeout_s) while waiting for 2 more rank(s)" in str(e.value)
    assert str(e.value).endswith("ranks present: 1 of 3 [0]")


def test_unresolvable_master_fails_at_once(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "no-such-host.invalid")
    monkeypatch.setenv("MASTER_PORT", "29555")
    t0 = time.monotonic()
    with pytest.raises(RendezvousError, match="no-such-host.invalid:29555 .*does not resolve"):
        distributed.rendezvous(1, 2, timeout_s=600)
    assert time.monotonic() - t0 < 10


def _catches(pid: int, sig: int) -> bool:
    """True once process `pid` has a handler for `sig` (SigCgt of /proc/<pid>/status)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.slow
def test_sigterm_ends_a_rank_waiting_for_its_peer(s4_shards, tmp_path):
    """Rank 1 of 2 started alone (no rank 0): SIGTERM ends it in seconds with the one-line error."""
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(distributed.free_port())}
    cmd = [sys.executable, "-m", "avs_dist.launch.rank", "--config", "tiny", "--shards", str(s4_shards),
           "--run-dir", str(tmp_path / "run"), "data.batch_videos=2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        end = time.monotonic() + 120
        while not _catches(proc.pid, signal.SIGTERM):
            assert proc.poll() is None and time.monotonic() < end
            time.sleep(0.1)
        time.sleep(2)  # inside the wait for the store
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=60)
        assert time.monotonic() - t0 < 10
        assert proc.returncode == 1, out
        assert out.strip().splitlines()[-1].startswith(
            f"error: rendezvous at MASTER_ADDR:MASTER_PORT=127.0.0.1:{env['MASTER_PORT']} (rank 1 of 2) stopped "
            "(SIGTERM) while waiting for the store"), out
        assert "Traceback" not in out
    finally:
        kill_session(proc)
