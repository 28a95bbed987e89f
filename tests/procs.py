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


def pids_with_env(key: str, value: str) -> list[int]:
    """Processes whose environment has key=value (e.g. every process of one `avs-dist train`,
    which hands AVS_LAUNCHER_PID to torchrun, the ranks and their loader workers, in sessions
    of their own)."""
    import pathlib

    want = f"{key}={value}".encode()
    found = []
    for proc in pathlib.Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if want in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


def kill_env(key: str, value: str) -> None:
    for pid in pids_with_env(key, value):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
