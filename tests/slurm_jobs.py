"""Slurm job helpers shared by the Slurm tests: `avs-dist submit --wait` in the background,
per-step losses, sacct states, the tiny run's overrides."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

DEV_CLUSTER = Path(__file__).resolve().parents[1] / "slurm" / "dev-cluster.sh"

STEPS = 4
# No per-epoch eval, no periodic checkpoint: the only checkpoints are the one a stop writes
# and the last one. log_every_steps=1 flushes metrics.jsonl at every step (the test watches it).
TINY = [f"train.max_steps={STEPS}", "train.eval_every_epochs=0", "train.audio_gap_eval=false",
        "train.ckpt_every_steps=1000", "train.log_every_steps=1"]


class Submission:
    """`avs-dist submit ... --wait` running in the background, its output collected."""

    def __init__(self, shards: Path, run_dir: Path, *extra: str, tasks: int = 2, nodes: int = 1):
        """`extra`: overrides first (they follow TINY's), then submit options."""
        cmd = [sys.executable, "-m", "avs_dist.cli", "submit", "--config", "tiny", "--shards", str(shards),
               "--run-dir", str(run_dir), *TINY, *extra, "--nodes", str(nodes), "--tasks-per-node", str(tasks),
               "--time", "10", "--wait"]
        self.run_dir = run_dir
        self.lines: list[str] = []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def job_id(self, timeout: float = 60) -> str:
        end = time.time() + timeout
        while time.time() < end:
            m = re.search(r"submitted job (\d+)", self.output)
            if m:
                return m.group(1)
            assert self.proc.poll() is None, f"submit exited early:\n{self.output}"
            time.sleep(0.2)
        raise AssertionError(f"no job id printed within {timeout}s:\n{self.output}")

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            subprocess.run(["scancel", self.job_id(1)])
            self.proc.kill()
            raise AssertionError(f"`avs-dist submit --wait` still running after {timeout}s:\n{self.output}")
        self._reader.join(10)
        return rc

    def wait_for_steps(self, n: int, timeout: float) -> None:
        metrics = self.run_dir / "metrics.jsonl"
        end = time.time() + timeout
        while time.time() < end:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
                return
            assert self.proc.poll() is None, f"job ended before step {n}:\n{self.output}"
            time.sleep(0.2)
        raise AssertionError(f"fewer than {n} steps after {timeout}s:\n{self.output}")


def losses(run_dir: Path) -> dict[int, float]:
    """step -> total loss; a step logged again after a resume replaces the earlier line."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["total"]
    return out


def sacct_states(job_id: str, timeout: float = 60) -> list[str]:
    """Every attempt's state, once the last one has ended (--wait returns as soon as the
    results are written, a moment before Slurm records the end)."""
    end = time.time() + timeout
    while True:
        out = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-j", job_id, "-o", "State"],
                             capture_output=True, text=True, check=True).stdout
        states = [s.split()[0] for s in out.splitlines() if s.strip()]
        if states and states[-1] not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED") or time.time() > end:
            return states
        time.sleep(0.5)
