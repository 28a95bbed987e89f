"""Against a real Slurm (slurm/dev-cluster.sh start): submit, preempt + requeue + resume, cancel.

Skipped when `sinfo` does not answer. Jobs are submitted through `avs-dist submit` as a
subprocess, the way a person would; the tiny preset runs a few steps over small shards.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_jobs import STEPS, TINY, Submission, losses, sacct_states

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]


@pytest.fixture(scope="module")
def shards(s4_shards):
    return s4_shards


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """An uninterrupted 2-task run: the baseline of the resume test."""
    run_dir = tmp_path_factory.mktemp("slurm") / "reference"
    sub = Submission(shards, run_dir)
    rc = sub.wait(timeout=240)
    return SimpleResult(rc, sub.output, run_dir, sub.job_id(1))


class SimpleResult:
    def __init__(self, rc, output, run_dir, job_id):
        self.rc, self.output, self.run_dir, self.job_id = rc, output, run_dir, job_id


def test_two_task_job_completes_and_reports_metrics(reference):
    assert reference.rc == 0, reference.output
    final = json.loads((reference.run_dir / "final_metrics.json").read_text())
    assert final["status"] == "completed" and final["step"] == STEPS and final["world_size"] == 2
    assert 0.0 <= final["test"]["miou_avsbench"] <= 1.0
    assert f"job {reference.job_id} completed" in reference.output
    assert f"tensorboard --logdir {reference.run_dir / 'tb'}" in reference.output
    assert sorted(losses(reference.run_dir)) == list(range(1, STEPS + 1))
    assert sacct_states(reference.job_id) == ["COMPLETED"]


def test_usr2_saves_on_all_ranks_requeues_and_resumes_exactly(reference, shards, tmp_path):
    assert reference.rc == 0, reference.output
    sub = Submission(shards, tmp_path / "interrupted")
    job = sub.job_id()
    sub.wait_for_steps(1, timeout=180)  # the stop lands at a later step boundary, before the last
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    rc = sub.wait(timeout=300)
    assert rc == 0, sub.output
    states = sacct_states(job)
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", states
    stops = sorted(p.name for p in (sub.run_dir / "checkpoints").glob("step_*"))
    assert len(stops) == 2 and stops[-1] == f"step_{STEPS:08d}", stops  # the stop's checkpoint + the last
    log = (sub.run_dir / "slurm" / f"{job}_0_log.err").read_text()
    assert "requeueing (requeue 1 of at most 3)" in log and "attempt 2" in log
    assert losses(sub.run_dir) == losses(reference.run_dir)


def test_requeue_limit_stops_with_a_clear_message(shards, tmp_path):
    sub = Submission(shards, tmp_path / "limited", "--max-requeues", "0", tasks=1)
    job = sub.job_id()
    sub.wait_for_steps(1, timeout=180)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    rc = sub.wait(timeout=180)
    assert rc == 1, sub.output
    assert "RequeueLimitError" in sub.output and "--max-requeues is 0" in sub.output
    assert "REQUEUED" not in sacct_states(job)
    assert any((tmp_path / "limited" / "checkpoints").glob("step_*/COMPLETE.json"))


def test_cancelled_job_is_a_clear_error_not_a_hang(shards, tmp_path):
    sub = Submission(shards, tmp_path / "cancelled", "train.max_steps=100000", tasks=1)
    job = sub.job_id()
    end = time.time() + 60
    while "RUNNING" not in sub.output and time.time() < end:
        time.sleep(0.2)
    subprocess.run(["scancel", job], check=True)
    rc = sub.wait(timeout=120)
    assert rc == 1, sub.output
    assert f"job {job} ended without a result (Slurm state CANCELLED" in sub.output


def test_plain_sbatch_template_runs_two_ranks(shards, tmp_path):
    run_dir = tmp_path / "sbatch"
    run_dir.mkdir()
    script = Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch"
    name = f"avs-test-{os.getpid()}"
    try:
        out = subprocess.run(
            ["sbatch", "--wait", "--parsable", f"--job-name={name}", "--ntasks-per-node=2", "--cpus-per-task=1",
             "--time=10", f"--output={run_dir}/slurm-%j.out", str(script), "--config", "tiny", "--shards",
             str(shards), "--run-dir", str(run_dir), *TINY, "train.max_steps=2"],
            capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHON": sys.executable})
    finally:
        subprocess.run(["scancel", "--name", name])  # never leave it queued after a failure
    logs = "".join(p.read_text() for p in run_dir.glob("slurm-*.out"))
    assert out.returncode == 0, out.stderr + logs
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["status"] == "completed" and final["world_size"] == 2 and final["step"] == 2
    assert "2 task(s) on 1 node(s)" in logs and "run status 'completed'" in logs
