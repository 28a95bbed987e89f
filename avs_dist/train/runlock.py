"""One owner per run directory: an OS lock (flock) on run_dir/owner.lock, held for the run's life.

Two runs on one run directory would resume from each other's checkpoints, write the same
checkpoint folders and truncate each other's metrics. So the process that owns a run holds
an exclusive `fcntl.flock` on `run_dir/owner.lock`:

- `avs-dist train` (launch/local.py): the launcher itself, before it touches the folder; its
  torchrun inherits the lock's descriptor, so the lock lives while the launcher or its
  torchrun does (the ranks do not inherit it: torchrun closes descriptors for its workers;
  ranks whose launcher and torchrun both died notice within seconds and end, launch/signals.py);
- plain torchrun (`-m avs_dist.launch.rank`) and Slurm (launch/slurm.py): rank 0, in
  Session.open, before it touches the folder; the other ranks fail with it.

The kernel drops an flock when its holder dies (SIGKILL included), so an owner that died
leaves nothing that blocks a resume; the file itself stays. The holder writes its host, pid,
start time and what it is into the file, for the message a second run gets (`RunDirBusy`).

Shared file systems: on NFS, Linux emulates flock with NFS byte-range locks, so it holds
across hosts; the lock of a host that died is freed when the server's lease ends (NFSv4:
about 90 s), which is why a requeued Slurm job waits up to that long for it (`wait_s`).
Lustre honours flock across nodes only when mounted with `-o flock` (`localflock` locks per
node only); where flock is not supported at all, a warning says two runs are not prevented.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = "owner.lock"


class RunDirBusy(RuntimeError):
    """Another live process owns the run directory (one line: who, and what to do)."""


def lock_path(run_dir) -> Path:
    return Path(run_dir) / LOCK_FILE


def _owner_line(text: str) -> str:
    try:
        o = json.loads(text)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(o["started"]))
        line = f"{o['what']} on host {o['host']}, pid {o['pid']}, since {started}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not recorded itself yet"
    if o["host"] == socket.gethostname() and not Path(f"/proc/{o['pid']}").exists():
        # the lock is shared with the run's children (torchrun): they are still ending
        line += " (that pid has ended; the rest of its run is still finishing: retry in a minute)"
    return line


class RunLock:
    """The held lock: `release()` (or the process's end) frees it. `fd` can be handed to a
    child process (pass_fds) so that the lock outlives this process while the child runs."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, run_dir, what: str, wait_s: float = 0.0, warn=print) -> RunLock | None:
        """Own `run_dir` (created if missing) as `what` (e.g. "avs-dist train"), or RunDirBusy
        naming the owner, after trying for `wait_s` seconds. None (with a warning) where the
        file system has no flock."""
        path = lock_path(run_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    owner = _owner_line(os.pread(fd, 4096, 0).decode(errors="replace"))
                    os.close(fd)
                    raise RunDirBusy(
                        f"{Path(run_dir)} is in use by another run: {owner} (lock {path}); stop that run "
                        f"(kill -TERM its pid on its host, or touch {Path(run_dir) / 'STOP'}) and run this again "
                        "to resume, or use another --run-dir") from None
                time.sleep(1.0)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    warn(f"cannot lock {path} ({e.strerror}): this file system has no flock, so a second run on "
                         f"{run_dir} is not prevented")
                    return None
                raise
        record = {"what": what, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor of the lock frees it
            self.fd = -1
