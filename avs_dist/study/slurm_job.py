"""One run of a study as a task of a Slurm job array: the training (launch/slurm.py TrainJob,
with its requeue on SIGUSR2), then rank 0 evaluates the run's selected checkpoint on test and
writes <run_dir>/selected_test.json, as `avs-dist study run` does on one machine. A training
that raises leaves its one-line error in <run_dir>/study_error.txt for the report."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import submitit

from avs_dist.fileio import write_json, write_text_atomic
from avs_dist.launch.slurm import TrainJob
from avs_dist.study.state import ERROR_FILE, SELECTED_FILE


@dataclass
class StudyJob(TrainJob):
    shards: str = ""  # the study's shard set (the test split is read from it)

    def __call__(self) -> dict:
        rank = submitit.JobEnvironment().global_rank
        try:
            result = super().__call__()
        except Exception as e:  # the job fails as it would; the report says why
            if rank == 0:
                write_text_atomic(Path(self.run_dir) / ERROR_FILE, f"{type(e).__name__}: {e}".splitlines()[0] + "\n")
            raise
        if rank == 0 and isinstance(result, dict) and result.get("status") == "completed":
            from avs_dist.evaluation import evaluate_checkpoint

            # this rank's device; the run folder: its best/ checkpoint (the best val mIoU)
            write_json(Path(self.run_dir) / SELECTED_FILE, evaluate_checkpoint(self.run_dir, self.shards, "test"))
        return result
