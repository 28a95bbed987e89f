"""Checkpoint folders: atomic writes, integrity manifest, keep-last-K, best, resume discovery.

Layout (docs/architecture.md, "Checkpoints")::

    run_dir/checkpoints/step_00000123/
        model.pt        {"model": fp32 state dict of the unwrapped model, "config", "step", "epoch", "metrics"}
        trainer.pt      step, epoch, data position, every rank's RNG state (+ optimizer, scheduler,
                        scaler for DDP)
        ds/             DeepSpeed engine checkpoint (ZeRO strategies only)
        COMPLETE.json   sha256 of every other file; written last
    run_dir/checkpoints/best/   model.pt + COMPLETE.json of the best val mIoU so far

A folder is written under a temporary name and renamed into place once complete, so a
crash leaves either the whole checkpoint or a temp folder that the next start deletes.
A checkpoint without COMPLETE.json, or whose files do not match it, is not resumed from.
This module is the file-system side; train.py decides when and which ranks take part.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from avs_dist.fileio import fsync_dir, sha256_file, write_text_atomic

COMPLETE = "COMPLETE.json"
STEP_RE = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"


def ckpt_root(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def temp_path(run_dir, name: str) -> Path:
    return ckpt_root(run_dir) / f"{TMP_PREFIX}{name}"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE)


def write_complete(folder: Path, meta: dict) -> None:
    """Hash every file in `folder` (recursively) into COMPLETE.json, written last and fsynced."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): sha256_file(p) for p in _files(folder)}
    record = {**meta, "files": files, "time": time.time()}
    write_text_atomic(folder / COMPLETE, json.dumps(record, indent=1))


def verify(folder: Path) -> str | None:
    """None when `folder` is a complete, intact checkpoint, else why not."""
    folder = Path(folder)
    marker = folder / COMPLETE
    if not marker.is_file():
        return f"{marker.name} missing (interrupted write)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"{marker.name} unreadable: {e}"
    if "model.pt" not in files:
        return "model.pt not listed in COMPLETE.json"
    for rel, digest in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} missing"
        if sha256_file(path) != digest:
            return f"{rel} sha256 mismatch (corrupt)"
    return None


def finalize(tmp: Path, final: Path) -> None:
    """Move a completed temp folder into place; an existing `final` is replaced."""
    if final.exists():
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def remove_temps(run_dir) -> list[Path]:
    """Delete temp folders left by a crashed writer (call on rank 0 before any rank writes)."""
    root = ckpt_root(run_dir)
    gone = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """(step, folder) of every step_* folder, oldest first; validity is not checked."""
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_valid(run_dir, warn=print) -> Path | None:
    """Newest checkpoint that verifies; corrupt or incomplete ones are passed over with a warning."""
    for step, path in reversed(list_checkpoints(run_dir)):
        problem = verify(path)
        if problem is None:
            return path
        warn(f"skipping checkpoint {path}: {problem}")
    return None


def resolve_resume(run_dir, resume: str, warn=print) -> Path | None:
    """'auto': newest valid checkpoint of run_dir (None for a fresh run); 'never': None;
    otherwise a checkpoint folder (or its model.pt) that must verify."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_valid(run_dir, warn)
    path = Path(resume)
    if path.is_file() and path.name == "model.pt":
        path = path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder")
    problem = verify(path)
    if problem is not None:
        raise ValueError(f"--resume {resume}: {problem}")
    return path


def prune(run_dir, keep_last: int) -> list[Path]:
    """Keep the newest `keep_last` step_* folders (best/ is separate and never pruned)."""
    ckpts = list_checkpoints(run_dir)
    gone = []
    for _, path in ckpts[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
        gone.append(path)
    return gone


def save_torch(obj, path: Path) -> None:
    """torch.save + fsync, so COMPLETE.json never vouches for data still in the page cache."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def load_torch(path: Path, map_location="cpu"):
    # Our own files: they hold numpy RNG states and config dicts, not just tensors.
    return torch.load(path, map_location=map_location, weights_only=False)


def write_model_folder(folder: Path, model_state: dict, config: dict, step: int, epoch: int,
                       metrics: dict | None = None) -> None:
    save_torch({"model": model_state, "config": config, "step": step, "epoch": epoch,
                "metrics": metrics or {}}, folder / "model.pt")


def save_best(run_dir, model_state: dict, config: dict, step: int, epoch: int, metrics: dict) -> Path:
    """Replace checkpoints/best/ with this model (rank 0 only)."""
    root = ckpt_root(run_dir)
    tmp = temp_path(run_dir, "best")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_model_folder(tmp, model_state, config, step, epoch, metrics)
    write_complete(tmp, {"step": step, "epoch": epoch, "kind": "best"})
    final = root / "best"
    finalize(tmp, final)
    return final


# ---------------------------------------------------------------- RNG state
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
