"""Stop signals and the orphan watchdog of a rank process.

`install_stop_signals`: SIGTERM, SIGUSR2, SIGINT and SIGHUP each turn into a StopRequest
(train/stop.py): the run saves one checkpoint at the next step boundary and ends "stopped".
The handler only sets an attribute: Python runs it between bytecodes of the main thread,
possibly inside a collective. Loader workers inherit it until their worker_init ignores
these signals (data/loader.py); the pid check covers that window.

`watch_launcher`: a rank started by a launcher (torchrun; `avs-dist train` sets
AVS_LAUNCHER_PID) must not outlive it: a launcher killed with SIGKILL cannot tell anyone.
A daemon thread checks every `poll_s` seconds (2) that the launcher and the rank's parent
are the processes they were at start; when one is gone it requests a stop (the ranks save
at the next step boundary) and, if the process has not ended `grace_s` seconds later (300:
longer than a step and a large save; more means a peer is gone too and a collective waits
for it), leaves with exit code 1.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

from avs_dist.train.stop import LAUNCHER_ENV

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP)


def install_stop_signals(stop, signals=STOP_SIGNALS, also=None) -> None:
    """Each of `signals` calls stop.request("<SIGNAME>") in this process (and also(signum) if given)."""
    pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() == pid:
            stop.request(signal.Signals(signum).name)
            if also is not None:
                also(signum)

    for sig in signals:
        signal.signal(sig, handler)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (/proc/<pid>/stat field 22): a pid with another
    start time is another process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def watch_launcher(stop, poll_s: float = 2.0, grace_s: float = 300.0) -> threading.Thread | None:
    """Start the watchdog (module docstring) when this rank runs under a launcher; else None."""
    launcher = os.environ.get(LAUNCHER_ENV)
    if not launcher and "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    parent = os.getppid()
    watched = {parent: "the rank's parent (torchrun)"}
    if launcher:
        watched.setdefault(int(launcher), "the launcher (avs-dist train)")
    started = {pid: _start_time(pid) for pid in watched}

    def gone() -> str | None:
        if os.getppid() != parent:
            return f"{watched[parent]}, pid {parent}, is gone"
        for pid, what in watched.items():
            if _start_time(pid) != started[pid]:
                return f"{what}, pid {pid}, is gone"
        return None

    def run() -> None:
        while (why := gone()) is None:
            time.sleep(poll_s)
        print(f"[rank {os.environ.get('RANK', '0')}] {why}: stopping at the next step boundary", file=sys.stderr,
              flush=True)
        stop.request(why)
        time.sleep(grace_s)
        from avs_dist.distributed import hard_exit

        print(f"[rank {os.environ.get('RANK', '0')}] still running {grace_s:.0f} s after {why}: exiting",
              file=sys.stderr, flush=True)
        hard_exit(1)

    thread = threading.Thread(target=run, name="avs-launcher-watchdog", daemon=True)
    thread.start()
    return thread
