"""What a study's run folder has become, read from its files (the runner, the Slurm job and
the report agree on it here).

    <run_dir>/study_error.txt      the runner's one-line error of a run that failed
    <run_dir>/selected_test.json   `avs-dist eval` of the run's selected checkpoint on test
    <run_dir>/status.json          the training's (train/session.py)
"""
from __future__ import annotations

from pathlib import Path

from avs_dist.fileio import read_json_dict

ERROR_FILE = "study_error.txt"
SELECTED_FILE = "selected_test.json"


def run_state(run_dir) -> dict:
    """{"state", "error", "step", "total_steps"} of one run folder (see the module docstring):
    study_error.txt or status "failed" -> failed (with the error), "completed" -> finished or
    trained (selected_test.json missing), "stopped" or a folder with checkpoints but no status
    (still running, or killed) -> stopped, else not started."""
    folder = Path(run_dir)
    status = read_json_dict(folder / "status.json")
    out = {"state": "not started", "error": None, "step": status.get("step"), "total_steps": status.get("total_steps")}
    try:
        error = (folder / ERROR_FILE).read_text().strip().splitlines()
    except OSError:
        error = None
    if error is not None or status.get("status") == "failed":
        reason = (error or [None])[0] or status.get("reason")
        out.update(state="failed", error=reason or "failed (no error recorded)")
    elif status.get("status") == "completed":
        out["state"] = "finished" if (folder / SELECTED_FILE).is_file() else "trained"
    elif status.get("status") == "stopped" or (folder / "checkpoints").is_dir():
        out["state"] = "stopped"
    return out
