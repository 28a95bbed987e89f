"""Checkpoints: the one place that knows their format, when to write them and which are valid.

Format (FORMAT_VERSION 2)::

    run_dir/checkpoints/step_00000123/
        model.pt        {"model": fp32 state dict of the unwrapped model (BatchNorm statistics
                        averaged over ranks; never the frozen VGGish), "config": config dict, "step",
                        "epoch", "metrics"}: the only copy of the weights
        trainer.pt      {"format": 2, "world_size", "strategy": train.strategy,
                         "train": TrainState.state_dict()      step, best val mIoU, last val, pending_epoch,
                         "data": TrainStream.state_dict()      epoch, step in epoch, global batch, seed,
                         "strategy_state": Strategy.state_dict()   DDP: optimizer, scheduler, scaler,
                         "ranks": [RankState.state_dict() of every rank]   RNG streams, own BN statistics}
        ds/             DeepSpeed engine checkpoint (ZeRO strategies only): each rank's optimizer
                        partition (fp32 master weights and moments) and a model-states file with the
                        buffers and metadata, without weights (train/strategy.py)
        COMPLETE.json   {"step", "epoch", "world_size", "strategy", "global_batch_videos",
                         "train_shards": sha256 of the train shards' sha256s, "config": the run's config,
                         "files": {relative path: sha256}}, written last; what the checks before a
                        resume read (resume_changes, config.RESUME_RULES)
    run_dir/checkpoints/best/   model.pt + COMPLETE.json of the best val mIoU so far
    run_dir/checkpoints/.tmp-*  a folder being written (deleted at the next start)

A checkpoint folder is valid iff COMPLETE.json is readable, lists model.pt, and every file
it lists is there with that sha256 (`verify`): `--resume auto` (`latest_valid`) and
`avs-dist eval` (`model_file`) both use this rule. A folder is written under a temporary
name and renamed into place once complete, so a crash leaves either the whole checkpoint
or a temp folder. A write that fails (a full disk) fails the save on every rank at once with
CheckpointSaveError: which file, why (needed and free bytes), and which checkpoint the run can
resume from (`resume_hint`); the temp folder is removed. Each saved checkpoint's size is logged.

The world size does not bind a checkpoint: the data position is counted in global batches
(data/loader.py), DDP's optimizer state is replicated, and a ZeRO checkpoint of another world
size is loaded through DeepSpeed's universal format (train/strategy.py). RNG streams and
per-rank BN statistics then restart as train/state.py describes.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch

from avs_dist import distributed
from avs_dist.errors import BadFileError, MissingFileError
from avs_dist.fileio import (describe_write_failure, folder_bytes, free_bytes, fsync_dir, human_bytes, sha256_file,
                             write_text_atomic)

FORMAT_VERSION = 2


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


def step_folders(root) -> list[tuple[int, Path]]:
    """(step, folder) of every step_* folder directly in `root`, oldest first; validity is not checked."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir())


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint of a run, oldest first; validity is not checked."""
    return step_folders(ckpt_root(run_dir))


class NonFiniteError(RuntimeError):
    """Non-finite weights or training past train.max_nonfinite_steps (one line: what, where,
    and the checkpoint to resume from)."""


def nonfinite_tensors(state: dict) -> list[str]:
    """Names of the floating tensors of a state dict that hold NaN or inf (one pass, on CPU)."""
    return [k for k, v in state.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def describe_nonfinite(names: list[str], total: int) -> str:
    return f"{len(names)} of {total} tensors hold NaN/inf (first: {names[0]})"


def nonfinite_problem(folder: Path) -> str | None:
    """Why the weights in `folder`/model.pt cannot be used, or None when every tensor is finite."""
    try:
        state = load_torch(Path(folder) / "model.pt")["model"]
        bad = nonfinite_tensors(state)
    except Exception as e:  # verified bytes that torch cannot read as our model.pt
        return f"model.pt unreadable: {type(e).__name__}: {e}"
    return f"model.pt: {describe_nonfinite(bad, len(state))}" if bad else None


def latest_valid(run_dir, warn=print) -> Path | None:
    """Newest checkpoint that verifies and holds finite weights; others are passed over with a warning."""
    for step, path in reversed(list_checkpoints(run_dir)):
        problem = verify(path) or nonfinite_problem(path)
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
        raise MissingFileError(f"--resume {resume}: no such checkpoint folder (give one, auto or never)")
    problem = verify(path) or nonfinite_problem(path)
    if problem is not None:
        raise BadFileError(f"--resume {resume}: {problem}; pick another checkpoint, or --resume auto")
    return path


def prune(run_dir, keep_last: int) -> list[Path]:
    """Keep the newest `keep_last` step_* folders (best/ is separate and never pruned)."""
    ckpts = list_checkpoints(run_dir)
    gone = []
    for _, path in ckpts[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
        gone.append(path)
    return gone


class WriteError(OSError):
    """A checkpoint file could not be written; str() says which file and why (fileio.describe_write_failure)."""

    def __str__(self) -> str:
        return self.args[0]


class CheckpointSaveError(RuntimeError):
    """A checkpoint was not saved (raised on every rank): which file failed, why, and which
    checkpoint the run can resume from."""


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) dict / list / tuple: about what torch.save writes."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_torch(obj, path: Path) -> None:
    """torch.save + fsync, so COMPLETE.json never vouches for data still in the page cache.

    WriteError naming `path` and why when the write fails (a full disk: how much was needed
    and how much is free), instead of torch's `unexpected pos` / `basic_ios::clear` errors."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        Path(path).unlink(missing_ok=True)  # the partial file: its space is free again
        raise WriteError(describe_write_failure(path, e, tensor_bytes(obj))) from e


def size_summary(folder: Path) -> str:
    """'380.1 MB (model.pt 94.9 MB, trainer.pt 236.7 kB, ds/ 285.3 MB)': a checkpoint's size on disk."""
    parts = [(p.name + ("/" if p.is_dir() else ""), folder_bytes(p)) for p in sorted(Path(folder).iterdir())
             if p.name != COMPLETE]
    detail = ", ".join(f"{name} {human_bytes(n)}" for name, n in parts)
    return f"{human_bytes(sum(n for _, n in parts))} ({detail})"


def resume_hint(run_dir) -> str:
    """Which checkpoint of `run_dir` a run can resume from, as the end of an error message."""
    last = latest_valid(run_dir, warn=lambda msg: None)
    if last is None:
        return f"{run_dir} has no checkpoint to resume from (the same command starts the run over)"
    step = int(STEP_RE.match(last.name).group(1))
    return f"the run can resume from {last} (step {step}): the same command resumes it"


def _attempt(fn, rank: int | None) -> str | None:
    """Run a write; None when it worked, else why not (prefixed with the rank when one is given)."""
    try:
        fn()
        return None
    except WriteError as e:
        why = str(e)
    except OSError as e:
        why = describe_write_failure(e.filename, e) if e.filename else f"{type(e).__name__}: {e}"
    except RuntimeError as e:  # DeepSpeed's own checks
        why = f"{type(e).__name__}: {e}"
    return why if rank is None else f"rank {rank}: {why}"


def load_torch(path: Path, map_location="cpu"):
    # Our own files: they hold numpy RNG states and config dicts, not just tensors.
    return torch.load(path, map_location=map_location, weights_only=False)


def write_model_folder(folder: Path, model_state: dict, config: dict, step: int, epoch: int,
                       metrics: dict | None = None) -> None:
    """model.pt of the format above."""
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


def read_complete(folder: Path) -> dict:
    """The COMPLETE.json record of a (verified) checkpoint folder."""
    return json.loads((Path(folder) / COMPLETE).read_text())


def model_file(path) -> Path:
    """The model.pt to evaluate for `path`: a file as it is; a valid checkpoint folder's model.pt;
    for a run or checkpoints/ folder, best/ if valid, else the newest valid step_*/.

    Raises FileNotFoundError when there is none, ValueError for an invalid folder named directly."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / "model.pt").is_file() or (path / COMPLETE).is_file():
        problem = verify(path)
        if problem is not None:
            raise BadFileError(f"{path}: not a valid checkpoint ({problem}); pass {path / 'model.pt'} itself "
                               "to evaluate that file anyway")
        return path / "model.pt"
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    for folder in [root / "best", *(p for _, p in reversed(step_folders(root)))]:
        if folder.is_dir() and verify(folder) is None:
            return folder / "model.pt"
    raise MissingFileError(f"{path}: no model.pt here, and no valid best/ or step_*/ checkpoint below it")


def find_resume(run_dir, resume: str, d, warn) -> tuple[Path, dict] | None:
    """`resolve_resume` on rank 0, the answer on every rank: (folder, its COMPLETE.json) or None."""
    found = distributed.on_main(d, lambda: resolve_resume(run_dir, resume, warn))
    return None if found is None else (Path(found), read_complete(found))


def train_shards_digest(manifest: dict) -> str | None:
    """sha256 over the names and sha256s of a shard set's train shards (its manifest): what a
    checkpoint records of the data it was trained on. None without train shards."""
    shards = sorted((s["file"], s["sha256"]) for s in manifest.get("shards", []) if s.get("split") == "train")
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest() if shards else None


def peek_resume(run_dir, resume: str) -> tuple[Path, dict] | None:
    """The checkpoint a run would resume from and its COMPLETE.json, for the checks before any
    process starts: cheap, without the sha256s (the ranks verify: resolve_resume). "auto": the
    newest step folder whose COMPLETE.json reads; a folder (or its model.pt): that one."""
    if resume == "never":
        return None
    folders = [p for _, p in reversed(list_checkpoints(run_dir))] if resume == "auto" else [Path(resume)]
    for folder in folders:
        folder = folder.parent if folder.name == "model.pt" else folder
        try:
            return folder, read_complete(folder)
        except (OSError, ValueError):
            continue
    return None


def saved_config(folder: Path, record: dict) -> dict:
    """The config a checkpoint was trained with: COMPLETE.json's, or (older checkpoints) model.pt's."""
    if "config" in record:
        return record["config"]
    try:
        return torch.load(Path(folder) / "model.pt", map_location="cpu", weights_only=False, mmap=True)["config"]
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError) as e:
        raise BadFileError(f"{Path(folder) / 'model.pt'}: unreadable ({type(e).__name__}: {e}); resume another "
                           "checkpoint (--resume DIR), or start a new --run-dir") from None


def resume_changes(folder: Path, record: dict, cfg, world_size: int, manifest: dict) -> list:
    """config.resume_changes between checkpoint `folder` (its COMPLETE.json `record`) and a run
    of `cfg` on `world_size` ranks reading the shard set of `manifest` ({}: not checked).

    ConfigError "cannot resume from <folder>: ..." naming every setting that cannot change."""
    from avs_dist.config import ConfigError, config_from_dict, global_batch
    from avs_dist.config import resume_changes as classify

    try:
        saved = config_from_dict(saved_config(folder, record))
        old_g = record.get("global_batch_videos") or global_batch(saved.data, record["world_size"],
                                                                  saved.optim.grad_accum)[0]
        new_g = global_batch(cfg.data, world_size, cfg.optim.grad_accum)[0]
        digest = train_shards_digest(manifest)
        same = None if digest is None or "train_shards" not in record else digest == record["train_shards"]
        return classify(saved, cfg, (old_g, new_g), same)
    except ConfigError as e:
        raise ConfigError(f"cannot resume from {folder}: {e}") from None


def restore(folder: Path, strategy, states: dict, rank_state, d, warn) -> dict:
    """Load checkpoint `folder` into the components (all ranks); returns its trainer.pt.

    BadFileError (a ValueError) naming the folder when it is not of this format, was written by another
    strategy, or does not fit the components (another global batch, another model...)."""
    trainer = load_torch(folder / "trainer.pt")
    if not isinstance(trainer, dict) or trainer.get("format") != FORMAT_VERSION:
        found = trainer.get("format") if isinstance(trainer, dict) else type(trainer).__name__
        raise BadFileError(f"{folder}: written by an older avs-dist (trainer.pt format {found!r}, expected "
                         f"{FORMAT_VERSION}); it cannot be resumed, but model.init_from={folder} starts a new run "
                         "from its weights")
    if trainer["strategy"].startswith("zero") != strategy.__class__.__name__.startswith("Zero"):
        raise BadFileError(f"{folder}: written with train.strategy={trainer['strategy']}; resume it with that "
                         "strategy (DDP and ZeRO checkpoints are not interchangeable)")
    model = functools.cache(lambda: load_torch(folder / "model.pt")["model"])  # read only if needed
    same_world = trainer["world_size"] == d.world_size
    try:
        strategy.load_state_dict(trainer["strategy_state"], model)
        strategy.load_shards(folder, trainer["world_size"], model)
        for name, component in states.items():
            component.load_state_dict(trainer[name])
        if same_world:
            rank_state.load_state_dict(trainer["ranks"][d.rank])
        else:
            rank_state.reseed(trainer["train"]["step"], model())
    except (KeyError, ValueError, RuntimeError) as e:
        raise BadFileError(f"{folder}: cannot be resumed by this run: {type(e).__name__}: {e}; resume it with the "
                           "config it was written with, or start a new --run-dir") from None
    if not same_world:
        warn(f"{folder} was written by {trainer['world_size']} ranks, this run has {d.world_size}: same data "
             "order from here on; RNG streams reseeded and every rank starts from the rank-averaged BatchNorm "
             "statistics (the run continues, but not bit-identically)")
    return trainer


class Checkpointer:
    """Decides when to checkpoint and writes the folders of the format above.

    `states`: the Stateful components whose state_dict goes into trainer.pt (same on every
    rank: "train", "data"); `rank_state`: gathered from every rank; `strategy`: the model
    weights, its own state and per-rank shards. Every method is called on every rank."""

    def __init__(self, run_dir, d, cfg, strategy, states: dict, rank_state, log, record: dict | None = None):
        self.run_dir, self.d, self.cfg, self.strategy = Path(run_dir), d, cfg, strategy
        self.states, self.rank_state, self.log = states, rank_state, log
        self.record = record or {}  # more facts for COMPLETE.json (train_shards, global_batch_videos)
        self.every, self.keep_last = cfg.train.ckpt_every_steps, cfg.train.keep_last

    def due(self, step: int, total_steps: int, stopping: bool) -> bool:
        return stopping or step == total_steps or step % self.every == 0

    def save(self, step: int, epoch: int, metrics: dict) -> Path:
        """checkpoints/step_<step>/; rank 0 renames the finished folder into place and logs its size.

        CheckpointSaveError on every rank when a rank's write fails (which file, why, and what
        the run can resume from); the temp folder is removed."""
        from avs_dist.config import to_dict

        d = self.d
        name = step_name(step)
        tmp, final = temp_path(self.run_dir, name), ckpt_root(self.run_dir) / name
        rank = d.rank if d.world_size > 1 else None
        with distributed.averaged_buffers(self.strategy.module, d):
            model_state = self.strategy.model_state_dict()
        self._refuse_nonfinite(model_state, f"checkpoint {final}")

        def prepare():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

        def write_main():
            write_model_folder(tmp, model_state, to_dict(self.cfg), step, epoch, metrics)
            save_torch({"format": FORMAT_VERSION, "world_size": d.world_size, "strategy": self.cfg.train.strategy,
                        **{k: s.state_dict() for k, s in self.states.items()},
                        "strategy_state": self.strategy.state_dict(), "ranks": ranks}, tmp / "trainer.pt")

        def publish():
            write_complete(tmp, {"step": step, "epoch": epoch, "world_size": d.world_size,
                                 "strategy": self.cfg.train.strategy, **self.record, "config": to_dict(self.cfg)})
            finalize(tmp, final)

        self._agree(name, _attempt(prepare, rank) if d.is_main else None, tmp)
        problem = _attempt(lambda: self.strategy.save_shards(tmp), rank)
        ranks = distributed.gather_objects(d, self.rank_state.state_dict())
        if d.is_main and problem is None:
            problem = _attempt(write_main, rank)
        self._agree(name, problem, tmp)  # every rank's files are on disk
        self._agree(name, _attempt(publish, rank) if d.is_main else None, tmp)
        if d.is_main:
            prune(self.run_dir, self.keep_last)
            self.log.info(f"checkpoint {final}: {size_summary(final)}")
        distributed.barrier(d)
        return final

    def _agree(self, name: str, problem: str | None, tmp: Path) -> None:
        """Every rank learns whether any rank's write failed; then all raise CheckpointSaveError
        together (none is left waiting in a collective) and rank 0 removes the temp folder."""
        problems = distributed.gather_objects(self.d, problem)
        message = None
        if self.d.is_main and any(problems):
            shutil.rmtree(tmp, ignore_errors=True)
            why = "; ".join(p for p in problems if p)
            if "space" in why or "quota" in why:  # ranks write at once: the whole checkpoint against the disk
                last = latest_valid(self.run_dir, warn=lambda msg: None)
                took = f", and {last.name} took {human_bytes(folder_bytes(last))}" if last else ""
                why += f" (with the partial checkpoint removed, {human_bytes(free_bytes(tmp.parent) or 0)} are free{took})"
            message = f"checkpoint {name} not saved: {why}; {resume_hint(self.run_dir)}"
        message = distributed.broadcast_object(self.d, message)
        if message is not None:
            raise CheckpointSaveError(message)

    def save_best(self, step: int, epoch: int, metrics: dict) -> None:
        """checkpoints/best/ with the current weights (a collective under ZeRO)."""
        from avs_dist.config import to_dict

        state = self.strategy.model_state_dict()
        self._refuse_nonfinite(state, f"best checkpoint {ckpt_root(self.run_dir) / 'best'}")
        problem, path = None, ckpt_root(self.run_dir) / "best"
        if self.d.is_main:
            problem = _attempt(lambda: save_best(self.run_dir, state, to_dict(self.cfg), step, epoch, metrics), None)
        self._agree(f"best (step {step})", problem, temp_path(self.run_dir, "best"))
        if self.d.is_main:
            self.log.info(f"best val mIoU {metrics['val'].get('miou'):.4f} at step {step}: {path} "
                          f"({human_bytes(folder_bytes(path))})")

    def _refuse_nonfinite(self, model_state: dict | None, what: str) -> None:
        """NonFiniteError on every rank, before anything is written, when rank 0's weights
        hold NaN/inf (a non-finite model is never a checkpoint, nor best)."""
        def check():
            bad = nonfinite_tensors(model_state)
            if not bad:
                return None
            return describe_nonfinite(bad, len(model_state)), resume_hint(self.run_dir)

        found = distributed.on_main(self.d, check)
        if found:
            raise NonFiniteError(f"not writing {what}: the weights' {found[0]}; {found[1]}")

