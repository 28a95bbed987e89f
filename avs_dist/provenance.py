"""Which checkpoint a figure comes from: one record, one wording, for every command.

A result printed or written by `avs-dist eval`, `predict`, the demo or the training's final
test evaluation carries a `source`:

    {"kind": "best" | "last" | "step" | "reference" | "file",
     "step": optimizer step of the weights (None for a reference checkpoint),
     "epoch": 0-based epoch of that step (None when unknown),
     "selected_by": "val miou" and "value": its value (best/ only),
     "checkpoint": the model file's absolute path (None: the live model at the end of training)}

"best" is checkpoints/best/ (the best val mIoU, per-frame `miou`), "last" the weights at the
end of a completed run (its last step), "step" any other step_*/ checkpoint, "reference" an
AVSBench .pth and "file" a model.pt outside a checkpoint folder. `describe` turns it into
the words every command prints, e.g. "best checkpoint (val miou 0.8086 at step 250)".
"""
from __future__ import annotations

import json
from pathlib import Path

BEST_METRIC = "miou"  # train/state.py TrainState.record_validation keeps the best of val/miou


def _completed_step(run_dir: Path) -> int | None:
    """The last step of the completed run in `run_dir` (status.json), else None."""
    try:
        status = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None
    return status.get("step") if status.get("status") == "completed" else None


def checkpoint_source(file, obj) -> dict:
    """The source record of model file `file` (Path) whose loaded content is `obj`: an
    avs-dist model.pt dict ({"model", "config", "step", "epoch", "metrics"}) or anything else
    (an AVSBench reference state dict)."""
    file = Path(file).resolve()
    if not (isinstance(obj, dict) and "model" in obj and "config" in obj):
        return {"kind": "reference", "step": None, "epoch": None, "checkpoint": str(file)}
    step, epoch = obj.get("step"), obj.get("epoch")
    source = {"kind": "file", "step": step, "epoch": epoch, "checkpoint": str(file)}
    folder = file.parent
    if folder.name == "best":
        val = (obj.get("metrics") or {}).get("val") or {}
        source.update(kind="best", selected_by=f"val {BEST_METRIC}", value=val.get(BEST_METRIC))
    elif folder.name.startswith("step_"):
        last = _completed_step(folder.parent.parent) if folder.parent.name == "checkpoints" else None
        source["kind"] = "last" if last is not None and last == step else "step"
    return source


def final_source(step: int, epoch: int | None, checkpoint=None) -> dict:
    """The source of the training's own final evaluation: the weights after its last step."""
    return {"kind": "last", "step": step, "epoch": epoch,
            "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve())}


def describe(source: dict | None) -> str:
    """Words for a source record: "best checkpoint (val miou 0.8086 at step 250)",
    "last model (step 300, end of training)", "checkpoint of step 150", ..."""
    if not source:
        return "unknown checkpoint"
    kind, step = source.get("kind"), source.get("step")
    if kind == "best":
        value = source.get("value")
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else "?"
        return f"best checkpoint ({source.get('selected_by', 'val ' + BEST_METRIC)} {shown} at step {step})"
    if kind == "last":
        return f"last model (step {step}, end of training)"
    if kind == "step":
        return f"checkpoint of step {step}"
    if kind == "reference":
        return f"AVSBench reference checkpoint {Path(source.get('checkpoint') or '?').name}"
    return f"{source.get('checkpoint')} (step {step})"


def short(source: dict | None) -> str:
    """Few words for a table key: "last, step 300", "best val miou, step 250", "step 150"."""
    if not source:
        return "?"
    kind, step = source.get("kind"), source.get("step")
    if kind == "best":
        return f"best {source.get('selected_by', 'val ' + BEST_METRIC)}, step {step}"
    if kind == "reference":
        return "reference"
    return f"{'last, ' if kind == 'last' else ''}step {step}"
