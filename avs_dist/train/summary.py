"""The end-of-run summary: each thing a person needs once, and only what is true.

`summary_rows` turns train/session.py Session.finish's result into (key, value) rows for the
terminal's "run summary" table: how far the run got (steps and epochs reached against the
plan), its speed, the loss at the end, the best val mIoU and at which step, the last val and
the final test figures with the weights they are of, the eval set sizes (once), and where the
results and logs are. `final_numbers` gives the figures TensorBoard's HParams view shows.
"""
from __future__ import annotations

import time
from pathlib import Path

from avs_dist.provenance import short
from avs_dist.train.results import RESULTS_FILE, headline
from avs_dist.train.sinks import EVAL_COUNTS, flatten, fmt, is_number, json_value

# Numbers of a result that are not figures of the model: bookkeeping and the eval sets' sizes.
NOT_FIGURES = {"step", "epoch", "total_steps", "world_size", "global_batch_videos", "steps_per_epoch",
               "best_val_step", *EVAL_COUNTS}


def final_numbers(result: dict) -> dict:
    """{"val/miou": .., "test/audio_gap": .., "best_val_miou": ..}: the figures of `result`, flat."""
    flat = flatten(json_value(dict(result)), sep="/")
    return {k: v for k, v in flat.items()
            if is_number(v) and k.split("/")[-1] not in NOT_FIGURES and "_source" not in k}


def _reached(result: dict, total_steps: int, steps_per_epoch: int, last_step: int) -> str:
    step = result.get("step", last_step)
    text = f"{result.get('status', 'ended')}: step {step} of {total_steps}"
    if steps_per_epoch > 0:
        epochs = -(-total_steps // steps_per_epoch)  # the last epoch may be cut short by max_steps
        reached = result["epoch"] + 1 if isinstance(result.get("epoch"), int) else -(-step // steps_per_epoch)
        text += f", epoch {reached} of {epochs} ({steps_per_epoch} steps each)"
    return text


def _speed(perf: dict) -> str:
    parts = [time.strftime("%H:%M:%S", time.gmtime(perf["wall_s"]))]
    if perf.get("fps") is not None:
        parts.append(f"{fmt(perf['fps'], '.1f')} frames/s (median)")
    if perf.get("wait") is not None:
        parts.append(f"data wait {100 * perf['wait']:.1f}%")
    parts.append(f"peak mem {perf.get('peak_mem', 0) / 2**30:.2f} GiB")
    return ", ".join(parts)


def _loss(terms: dict) -> str:
    if not terms:
        return "-"
    rest = ", ".join(f"{k} {fmt(v)}" for k, v in terms.items() if k != "total")
    if "total" not in terms:
        return rest
    return f"total {fmt(terms['total'])}" + (f" ({rest})" if rest else "")


def _sizes(result: dict) -> str:
    parts = [f"{split} {m['videos']} videos ({m.get('frames', '?')} frames)"
             for split in ("val", "test") if isinstance(m := result.get(split), dict) and "videos" in m]
    return ", ".join(parts)


def summary_rows(result: dict, perf: dict, total_steps: int, steps_per_epoch: int, run_dir) -> list[tuple]:
    """Rows of the run summary (module docstring). `perf`: {"wall_s", "fps", "wait", "peak_mem",
    "loss": the last step's loss terms}."""
    run_dir = Path(run_dir)
    rows = [("run", _reached(result, total_steps, steps_per_epoch, result.get("step", 0))),
            ("wall time", _speed(perf)), ("loss at the end", _loss(perf.get("loss") or {}))]
    if result.get("best_val_miou") is not None:
        at = f" at step {result['best_val_step']}" if result.get("best_val_step") is not None else ""
        rows.append(("best val mIoU", f"{fmt(result['best_val_miou'])}{at} (checkpoints/best)"))
    if result.get("val"):
        rows.append(("val (last validation)", headline(result["val"])))
    if result.get("test"):
        rows.append((f"test ({short(result.get('test_source'))})", headline(result["test"])))
    if _sizes(result):
        rows.append(("eval sets", _sizes(result)))
    rows += [("results", str(run_dir / RESULTS_FILE)),
             ("tensorboard", f"tensorboard --logdir {run_dir / 'tb'}")]
    return rows
