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


def stop_file(run_dir) -> Path:
    return Path(run_dir) / STOP_FILE


class StopRequest:
    def __init__(self, file: Path | None = None):
        self.file = None if file is None else Path(file)
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    @property
    def requested(self) -> bool:
        if self.reason is None and self.file is not None and self.file.exists():
            self.reason = f"stop file {self.file}"
        return self.reason is not None

    def agreed(self, d) -> bool:
        """True on every rank when any rank has a request (a collective: call on every rank)."""
        from avs_dist import distributed

        return distributed.any_flag(d, self.requested)

    def consume(self) -> None:
        """Remove the stop file after the stop it asked for (rank 0)."""
        if self.file is not None:
            self.file.unlink(missing_ok=True)
