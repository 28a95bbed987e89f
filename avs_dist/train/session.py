"""Session: the components of one rank's training run, built, wired and resumed in one place.

    with Session.open(cfg, run_dir, resume="auto") as s:   # process group, components, resume
        result = s.finish(train(s, stop), stop)             # final test eval, status files

`open` joins the process group (distributed.setup) and `close` leaves it. Files of the run
directory: config.json / config.toml (the resolved config), pids/rank<r>.pid,
metrics.jsonl, eval.jsonl, tb/, checkpoints/ (train/checkpoint.py), final_metrics.json
(completed runs; with "test_source", which weights the test figures are of, and
"best_val_step"), status.json ({"status": "completed" | "stopped", "step", "total_steps",
"time"}, written last by rank 0), and RESULTS.md from them (train/results.py).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from avs_dist import distributed
from avs_dist.config import Config, save_config, to_dict
from avs_dist.data.loader import TrainStream
from avs_dist.fileio import write_json
from avs_dist.precision import resolve_precision
from avs_dist.provenance import final_source
from avs_dist.train import checkpoint as ckpt
from avs_dist.train.logger import RunLogger
from avs_dist.train.optim import build_optimizer, build_scheduler, hyperparameters, reapply
from avs_dist.train.runlock import RunDirBusy, RunLock
from avs_dist.train.results import best_checkpoint, write_results
from avs_dist.train.state import RankState, TrainState, seed_everything
from avs_dist.train.stop import LAUNCHER_ENV, stop_file
from avs_dist.train.strategy import build_strategy
from avs_dist.train.validate import Validator


def build_model_for_training(cfg: Config, d) -> nn.Module:
    """The model on this rank's device with the same initial weights on every rank."""
    from avs_dist.models import build_model, to_channels_last

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, crop_size=cfg.data.crop_size)
    if cfg.train.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(d.device)
    if d.device.type == "cuda" and cfg.model.channels_last:
        to_channels_last(model)  # Conv2d weights only: TPAVI's 5-d Conv3d weights cannot be
    return model


def _prepare_run_dir(run_dir: Path, d, opened_at: float) -> None:
    """Rank 0: the folders, no unfinished checkpoint, no status of an earlier run, no stop
    request older than this run (avs-dist train clears its own before it starts the ranks, and
    may write one while they start: left alone under it)."""
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        removed = ckpt.remove_temps(run_dir)
        if removed:
            print(f"removed unfinished checkpoint folders: {[str(p) for p in removed]}", flush=True)
        (run_dir / "status.json").unlink(missing_ok=True)
        stale = stop_file(run_dir)
        if LAUNCHER_ENV not in os.environ and stale.exists() and stale.stat().st_mtime < opened_at:
            stale.unlink()
            print(f"removed {stale}: a stop request from before this run", flush=True)
    distributed.barrier(d)
    (run_dir / "pids").mkdir(exist_ok=True)
    (run_dir / "pids" / f"rank{d.rank}.pid").write_text(f"{os.getpid()}\n")


def _own_run_dir(d, run_dir: Path, wait_s: float, held: list) -> None:
    """Rank 0 takes run_dir's lock (appended to `held`); RunDirBusy on every rank when another
    run owns it, so that no rank touches the folder."""
    busy = None
    if d.is_main:
        job = os.environ.get("SLURM_JOB_ID")
        what = f"rank 0 of Slurm job {job} (scancel {job})" if job else "rank 0 of a torchrun run"
        try:
            held.append(RunLock.acquire(run_dir, what, wait_s, warn=lambda m: print(f"WARNING: {m}", file=sys.stderr)))
        except (RunDirBusy, OSError) as e:
            busy = f"{e}" if isinstance(e, RunDirBusy) else f"cannot lock {run_dir}: {e}"
    busy = distributed.broadcast_object(d, busy)
    if busy is not None:
        raise RunDirBusy(busy)


@dataclass
class Session:
    cfg: Config
    d: distributed.Dist
    run_dir: Path
    precision: str
    total_steps: int
    state: TrainState
    data: TrainStream
    strategy: object
    checkpointer: ckpt.Checkpointer
    validator: Validator
    log: RunLogger
    lock: RunLock | None = None  # rank 0's ownership of run_dir, when this session took it

    @classmethod
    def open(cls, cfg: Config, run_dir, resume: str = "auto", lock_wait_s: float | None = 0.0,
             stop=None) -> Session:
        """This process as one rank of the job the environment describes (RANK, WORLD_SIZE, ...
        as torchrun sets them; a world of one without them). `resume`: "auto" (the newest valid
        checkpoint of run_dir, if any), "never", or a checkpoint folder. `lock_wait_s`: rank 0
        takes the run directory's lock (train/runlock.py), waiting up to that long for a dead
        owner's lock to clear, else every rank raises RunDirBusy; None: the launcher holds it.
        `stop` (train/stop.py): a request ends the wait for the other ranks (RendezvousError)."""
        opened_at = time.time()
        stopped = (lambda: stop.requested_since(opened_at)) if stop is not None else (lambda: None)
        d = distributed.setup(cfg.train.strategy, rendezvous_timeout_s=cfg.train.rendezvous_timeout_s,
                              stopped=stopped)
        held: list = []
        try:
            if lock_wait_s is not None:
                _own_run_dir(d, Path(run_dir), lock_wait_s, held)
            session = cls._build(cfg, Path(run_dir), d, resume, opened_at)
            session.lock = held[0] if held else None
            return session
        except BaseException:
            for lock in held:
                if lock is not None:
                    lock.release()
            distributed.teardown()
            raise

    @classmethod
    def _build(cls, cfg: Config, run_dir: Path, d, resume: str, opened_at: float) -> Session:
        _prepare_run_dir(run_dir, d, opened_at)

        def early_warn(msg):  # before the logger exists (it needs the resumed step)
            print(f"[rank {d.rank}] WARNING: {msg}" if d.rank else f"WARNING: {msg}", file=sys.stderr, flush=True)

        found = ckpt.find_resume(run_dir, resume, d, early_warn)
        precision = resolve_precision(cfg.train.precision, d.device)
        data = TrainStream(cfg.data.shards, cfg.data, d.rank, d.world_size, cfg.train.seed, cfg.optim.grad_accum,
                           device=d.device, crops=cfg.model.crop_branch)
        # what differs from the checkpoint's config is applied below, or refused here (ConfigError)
        changes = ckpt.resume_changes(*found, cfg, d.world_size, data.manifest) if found else []
        if d.is_main:
            save_config(cfg, run_dir / "config.json")  # the config this run uses
        total = cfg.train.max_steps or cfg.train.epochs * data.steps_per_epoch
        model = build_model_for_training(cfg, d)
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, cfg, total)
        fresh = hyperparameters(optimizer)  # this run's settings, before a checkpoint's replace them
        strategy = build_strategy(model, optimizer, scheduler, cfg, d, precision,
                                  resume_world_size=found[1]["world_size"] if found else None)
        seed_everything(cfg.train.seed + d.rank)  # per-rank streams (augmentation is the loader's, seeded apart)
        state, rank_state = TrainState(), RankState(strategy.module, d.rank, cfg.train.seed)
        states = {"train": state, "data": data}
        if found:
            ckpt.restore(found[0], strategy, states, rank_state, d, early_warn)
            reapply(strategy.optimizer, strategy.scheduler, fresh)
        log = RunLogger(run_dir, to_dict(cfg), d.rank, total, data.steps_per_epoch, start_step=state.step,
                        videos_per_step=data.global_batch)
        if found:
            log.info(f"resumed from {found[0]} (step {state.step}, epoch {data.epoch}, "
                     f"step {data.step_in_epoch} of the epoch)")
            for change in changes:
                log.info(change.line())
        log.info(f"rank 0 of {d.world_size} on {d.device} ({d.backend}), strategy {cfg.train.strategy}, "
                 f"precision {precision}, global batch {data.global_batch} videos ({data.micro_batch} per rank x "
                 f"grad_accum {cfg.optim.grad_accum}), {data.steps_per_epoch} steps/epoch, {total} steps")
        checkpointer = ckpt.Checkpointer(run_dir, d, cfg, strategy, states, rank_state, log,
                                         {"train_shards": ckpt.train_shards_digest(data.manifest),
                                          "global_batch_videos": data.global_batch})
        validator = Validator(cfg, d, strategy, checkpointer, log, data.manifest.get("splits", {}))
        return cls(cfg, d, run_dir, precision, total, state, data, strategy, checkpointer, validator, log)

    def finish(self, status: str, stop=None) -> dict:
        """The run's result on every rank; after a completed run, the final test evaluation.
        Rank 0 writes final_metrics.json (completed) and status.json, and removes the stop file
        of the stop it honoured."""
        state, d = self.state, self.d
        result = {"status": status, "step": state.step, "epoch": self.data.last_epoch,
                  "total_steps": self.total_steps, "world_size": d.world_size, "strategy": self.cfg.train.strategy,
                  "precision": self.precision, "global_batch_videos": self.data.global_batch,
                  "best_val_miou": state.best, "val": state.last_val}
        if status == "completed":
            result.update(self.validator.final(state.step))
            result.update(self._provenance(result))
            self.log.finish(result, to_dict(self.cfg))
        if d.is_main:
            if status == "completed":
                write_json(self.run_dir / "final_metrics.json", result)
            elif stop is not None:
                stop.consume()
            write_json(self.run_dir / "status.json", {"status": status, "step": state.step,
                                                      "total_steps": self.total_steps, "time": time.time()})
            try:  # the run itself is done and saved: a failure here must not leave ranks waiting
                write_results(self.run_dir)  # RESULTS.md, from the files just written
                self._plot()
            except Exception as e:  # noqa: BLE001
                self.log.warn(f"RESULTS.md / plots not written: {type(e).__name__}: {e}")
        distributed.barrier(d)
        return result

    def _plot(self) -> None:
        """run_dir/plots/*.png from the run's logs (plots.plot_run), at the end of every run. A
        machine without matplotlib (the GPU machine's image) gets a warning, not a failed run."""
        self.log.flush()
        try:
            from avs_dist.plots import plot_run

            paths = plot_run(self.run_dir)
        except ImportError as e:
            self.log.warn(f"no plots: {e} (pip install matplotlib; then `avs-dist plot {self.run_dir}`)")
            return
        self.log.info("plots: " + ", ".join(str(p) for p in paths))

    def fail(self, reason: str) -> None:
        """Rank 0 writes status.json "failed" with `reason` (the caller then raises)."""
        self.log.flush()
        if self.d.is_main:
            write_json(self.run_dir / "status.json", {"status": "failed", "reason": reason, "step": self.state.step,
                                                      "total_steps": self.total_steps, "time": time.time()})

    def _provenance(self, result: dict) -> dict:
        """Where the final figures come from: the test of the weights after the last step (also
        checkpoints/step_<last>), and the step of checkpoints/best (rank 0 reads it)."""
        out = {"steps_per_epoch": self.data.steps_per_epoch}
        if "test" in result:
            out["test_source"] = final_source(self.state.step, self.data.last_epoch,
                                              ckpt.ckpt_root(self.run_dir) / ckpt.step_name(self.state.step))
        best = best_checkpoint(self.run_dir) if self.d.is_main else None
        out["best_val_step"] = best["step"] if best else None
        return out

    def close(self) -> None:
        self.log.close()
        self.data.close()
        distributed.teardown()
        if self.lock is not None:
            self.lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
