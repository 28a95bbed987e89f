"""run_dir/RESULTS.md: one short page a person reads to know what a run did and where it is.

Written by rank 0 at the end of every run (completed or stopped; train/session.py) from the
run's own files, so it can be rebuilt at any time (`write_results`):

    config.json          what was run (config name and the settings that matter)
    status.json          completed / stopped, at which step
    final_metrics.json   completed runs: best val mIoU, the final test figures and their source
    checkpoints/         where the weights are (best/ with the step it was chosen at)

`completed_run` tells `avs-dist train` that a run directory already holds this exact run,
completed, so that it reports it instead of evaluating it again.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from avs_dist.fileio import read_json_dict, write_text_atomic
from avs_dist.provenance import describe

RESULTS_FILE = "RESULTS.md"
# The figures a person compares (those a result has; miou_frame_objects: AVSS, the objects alone,
# avss/evaluation.py).
HEADLINE = ("miou_avsbench", "f_avsbench", "miou", "f", "audio_gap", "miou_frame_objects")


def best_checkpoint(run_dir) -> dict | None:
    """{"step", "epoch", "path"} of run_dir/checkpoints/best (its COMPLETE.json), or None."""
    best = Path(run_dir) / "checkpoints" / "best"
    complete = read_json_dict(best / "COMPLETE.json")
    if "step" not in complete:
        return None
    return {"step": complete["step"], "epoch": complete.get("epoch"), "path": str(best)}


def headline(metrics: dict | None) -> str:
    """"miou_avsbench 0.7587, f_avsbench 0.8123, ..." of the figures in HEADLINE that `metrics` has."""
    parts = []
    for key in HEADLINE:
        value = (metrics or {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{key} {value:+.4f}" if key == "audio_gap" else f"{key} {value:.4f}")
    return ", ".join(parts) or "-"


def _what_ran(cfg: dict, final: dict) -> str:
    model, optim, train, data = (cfg.get(k, {}) for k in ("model", "optim", "train", "data"))
    ranks = f" on {final['world_size']} rank(s)" if final.get("world_size") else ""
    batch = final.get("global_batch_videos") or data.get("global_batch_videos") or "auto"
    return (f"config `{cfg.get('name', '?')}` ({cfg.get('subset', '?')}), {model.get('backbone', '?')}"
            f"{' + crop branch' if model.get('crop_branch') else ''}, {train.get('strategy', '?')}{ranks}, "
            f"precision {final.get('precision', train.get('precision', '?'))}, global batch {batch} videos, "
            f"{optim.get('name', '?')} lr {optim.get('lr', '?')} ({optim.get('schedule', '?')}), "
            f"shards {data.get('shards', '?')}")


def _progress(status: dict, final: dict) -> str:
    step, total = status.get("step", "?"), status.get("total_steps", "?")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(status["time"])) if status.get("time") else "?"
    epochs = ""
    if final.get("epoch") is not None and final.get("steps_per_epoch"):
        epochs = f" ({final['epoch'] + 1} epochs of {final['steps_per_epoch']} steps)"
    return f"{status.get('status', 'unknown')} at step {step} of {total}{epochs}, {when}"


def results_text(run_dir) -> str:
    """The RESULTS.md page of `run_dir` (see the module docstring)."""
    run_dir = Path(run_dir).resolve()
    cfg, status = read_json_dict(run_dir / "config.json"), read_json_dict(run_dir / "status.json")
    final = read_json_dict(run_dir / "final_metrics.json") if status.get("status") == "completed" else {}
    best = best_checkpoint(run_dir)
    lines = [f"# Results: {run_dir}", "",
             f"- **Run:** {_what_ran(cfg, final)}",
             f"- **Status:** {_progress(status, final)}"]
    if best is not None:
        value = final.get("best_val_miou")
        shown = f"{value:.4f} " if isinstance(value, (int, float)) else ""
        lines.append(f"- **Best val mIoU:** {shown}at step {best['step']}: `{best['path']}`")
    if final.get("test"):
        lines.append(f"- **Test**, {describe(final.get('test_source'))}: {headline(final['test'])}")
    elif status.get("status") == "completed":
        lines.append("- **Test:** none (the shard set has no test videos)")
    else:
        lines.append("- **Test:** not yet (the run is not complete; the same `avs-dist train` command resumes it)")
    lines += [f"- **Checkpoints:** `{run_dir / 'checkpoints'}`",
              f"- **Logs:** `metrics.jsonl` (every step), `eval.jsonl` (every evaluation), `final_metrics.json`; "
              f"`tensorboard --logdir {run_dir / 'tb'}`"]
    if best is not None and cfg.get("data", {}).get("shards"):
        lines.append(f"- **Evaluate the best checkpoint:** `avs-dist eval --checkpoint {best['path']} "
                     f"--shards {cfg['data']['shards']} --split test`")
    return "\n".join(lines) + "\n"


def write_results(run_dir) -> Path:
    """Write run_dir/RESULTS.md (atomically) and return its path."""
    path = Path(run_dir) / RESULTS_FILE
    write_text_atomic(path, results_text(run_dir))
    return path


def completed_run(run_dir, cfg_dict: dict) -> dict | None:
    """status.json of `run_dir` when it says "completed" and the run's saved config.json is
    `cfg_dict` (the same run asked again), else None."""
    run_dir = Path(run_dir)
    status = read_json_dict(run_dir / "status.json")
    if status.get("status") != "completed" or not (run_dir / "final_metrics.json").is_file():
        return None
    saved = read_json_dict(run_dir / "config.json")
    return status if saved == json.loads(json.dumps(cfg_dict)) else None
