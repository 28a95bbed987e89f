"""StopRequest: ask a run to write one checkpoint at the next step boundary and end "stopped".

The launcher creates it (avs_dist/launch: signal handlers, the parent watchdog, Slurm's
preemption signal) and hands it to the loop; nothing else holds stop state. A request comes
from this process (`request`, safe in a signal handler: it only sets attributes) or from
the run directory's stop file (`avs-dist train` writes it when the launcher itself is
signalled; `touch RUN_DIR/STOP` works by hand too). At every step boundary the ranks
combine what they saw (`agreed`, a MAX over the gloo control group), so all of them save
the same step together. The stop file is removed once the stop checkpoint is written.
"""
from __future__ import annotations

from pathlib import Path

STOP_FILE = "STOP"
LAUNCHER_ENV = "AVS_LAUNCHER_PID"  # set by `avs-dist train` for every process of its run
FILE_CHECK_S = 1.0  # the stop file is looked at by rank 0, at most once a second


def stop_file(run_dir) -> Path:
    return Path(run_dir) / STOP_FILE


class StopRequest:
    def __init__(self, file: Path | None = None):
        self.file = None if file is None else Path(file)
        self.reason: str | None = None
        self._checked = 0.0

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    @property
    def requested(self) -> bool:
        """A request in this process, or (checked now) the stop file."""
        if self.reason is None and self.file is not None and self.file.exists():
            self.reason = f"stop file {self.file}"
        return self.reason is not None

    def requested_since(self, t: float) -> str | None:
        """The reason of a request in this process, or of a stop file written at or after `t`
        (time.time(); an older file is an earlier run's, removed once the run starts), else None."""
        if self.reason is None and self.file is not None:
            try:
                if self.file.stat().st_mtime >= t:
                    return f"stop file {self.file}"
            except OSError:  # no stop file
                pass
        return self.reason

    def agreed(self, d) -> bool:
        """True on every rank when any rank has a request (a collective: call on every rank).
        Only rank 0 looks at the stop file, at most every FILE_CHECK_S: one stat a second on a
        shared file system, not one per rank and step."""
        import time

        from avs_dist import distributed

        now = time.monotonic()
        if d.is_main and now - self._checked >= FILE_CHECK_S:
            self._checked = now
            self.requested
        return distributed.any_flag(d, self.reason is not None)

    def consume(self) -> None:
        """Remove the stop file after the stop it asked for (rank 0)."""
        if self.file is not None:
            self.file.unlink(missing_ok=True)
