"""Subprocesses for the multi-process tests: each runs in its own session, and the whole
session is killed afterwards, so no rank or loader worker outlives its test."""
from __future__ import annotations

import os
import signal
import subprocess


def kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_session(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
    """Run `cmd` to the end (stdout and stderr together) -> (exit code, output)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        kill_session(proc)
    return proc.returncode, out
