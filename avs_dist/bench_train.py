"""`avs-dist bench train`: end-to-end trainer throughput against its own synthetic-input rate.

Two measurements in one process, one rank (a 1-process group, so DDP and its all-reduce run),
both through the same train_step (train/step.py):

synthetic  the trainer's own session (model, DDP wrapper, autocast, clipping, optimizer,
           scheduler) and its `train_step` (train/step.py), on random tensors of one real
           step's batch shapes, already on the device. No loading, no logging: the rate the
           harness should reach.
harness    the real trainer (train/session.py + train/loop.py): shard loading with
           `data.num_workers` workers, DDP, metrics.jsonl / TensorBoard / terminal logging,
           the final checkpoint. Its rate is measured on wall time between two step
           boundaries at which the trainer flushes its log lines (every
           `train.log_every_steps` and at the last step), read back from metrics.jsonl: so it
           counts everything between the steps (data waits, logging, epoch restarts of the
           loader) except the warm-up steps.

Validation is switched off in the harness run (train.eval_every_epochs=0,
train.eval_every_steps=0) and checkpoints are written only at the end, so that both rates
describe training steps; the trainer's final test evaluation runs after the measured window.
Writes JSON with both rates, their ratio, the device, torch version and date.

Frames are those that exist: G x 5 per step for S4 / MS3; for AVSBench-semantic the frames of
the step's clips (5 or 10 each, `TrainOrder.step_frames`), padded frames not counted, so the
rates of data.avss_batching="bucket" and "pad" compare as useful work.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from avs_dist import distributed
from avs_dist.config import Config, ConfigError, load_config
from avs_dist.bench_model import device_name, sync
from avs_dist.fileio import write_json
from avs_dist.helpformat import HelpFormatter

# Forced on the harness run: see the module docstring.
BENCH_OVERRIDES = ["train.eval_every_epochs=0", "train.eval_every_steps=0", "train.audio_gap_eval=false",
                   "train.ckpt_every_steps=1000000000"]


def synthetic_like(batch: dict, device: torch.device, num_classes: int, seed: int = 0) -> dict:
    """Random tensors with the shapes and dtypes of a loader batch, on `device`.

    mask_valid is kept: it decides which frames the BCE loss supervises (S4 train: frame 0).
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in batch.items():
        if not torch.is_tensor(value):
            out[key] = value
        elif key in ("frames", "crops", "audio"):
            out[key] = torch.randn(value.shape, generator=g, dtype=value.dtype)
        elif key == "masks":
            out[key] = (torch.rand(value.shape, generator=g) > 0.5).to(value.dtype)
        elif key == "label" and bool((value >= 0).all()):
            out[key] = torch.randint(0, num_classes, value.shape, generator=g, dtype=value.dtype)
        else:
            out[key] = value.clone()
    if "masks" in out and "mask_valid" in out:
        out["masks"] = out["masks"] * out["mask_valid"].to(out["masks"].dtype)[..., None, None]
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}


def _fresh_port(own_env: bool) -> None:
    # Each phase creates and destroys its own process group; a new port avoids binding the
    # previous store's port while the kernel still holds it.
    if own_env:
        os.environ["MASTER_PORT"] = str(distributed.free_port())


def measure_synthetic(cfg: Config, work_dir: Path, steps: int, warmup: int) -> dict:
    from avs_dist.train.session import Session
    from avs_dist.train.step import train_step

    with Session.open(cfg, work_dir, resume="never") as s:
        d = s.d
        real = s.data.next_step().micro
        micro = [synthetic_like(b, d.device, cfg.model.num_classes, seed=i) for i, b in enumerate(real)]
        s.strategy.module.train()
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        t0 = None
        for i in range(warmup + steps):
            if i == warmup:
                sync(d.device)
                t0 = time.perf_counter()
            train_step(s.strategy, micro, cfg.loss)
        sync(d.device)
        wall = time.perf_counter() - t0
        # the one step repeated: its clips' frames (the harness counts each step's own)
        frames = _existing_frames(real) * steps
        result = {"frames_per_s": frames / wall, "steps": steps, "warmup_steps": warmup, "wall_s": wall,
                  "precision": s.precision, "device": device_name(d.device),
                  "batch_shapes": {k: list(v.shape) for k, v in real[0].items() if torch.is_tensor(v)}}
        if d.device.type == "cuda":
            result["peak_mem_gib"] = torch.cuda.max_memory_allocated(d.device) / 2**30
        return result


def _existing_frames(micro: list[dict]) -> int:
    """Frames that exist in these micro-batches: B x T, less AVSS padding (frame_exists)."""
    return sum(int(b["frame_exists"].sum()) if "frame_exists" in b else b["frames"].shape[0] * b["frames"].shape[1]
               for b in micro)


def step_frames(cfg: Config, global_batch: int):
    """k -> frames that exist in global batch k (0-based, from the run's start) of a run of
    `cfg` on its shards: data/loader.py:TrainOrder.step_frames."""
    from avs_dist.data.loader import TrainOrder

    order = TrainOrder.from_shards(cfg.data.shards, cfg.train.seed, global_batch, cfg.data.hflip,
                                   bucket=cfg.data.avss_batching == "bucket")
    return order.step_frames


def harness_rate(metrics_path: Path, frames_per_step, log_every: int, warmup: int) -> dict:
    """Frames/s between the first flush boundary at or after `warmup` and the last step.

    frames_per_step: an int (every step the same), or a function of the global batch k
    (0-based; the line of step k + 1) for steps of different frame counts (AVSS)."""
    if not metrics_path.is_file():
        raise RuntimeError(f"{metrics_path}: the trainer wrote no metrics")
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        raise RuntimeError(f"{metrics_path}: no step lines")
    by_step = {r["step"]: r for r in rows}
    last = max(by_step)
    # Each line's "time" is when its step was handed to the device; at these steps the logger
    # then copies the queued losses to the host (a sync), so the GPU cannot be more than one
    # flush interval behind the times the window is measured between.
    bounds = sorted(s for s in by_step if s % log_every == 0 or s == last)
    start = next((s for s in bounds if s >= warmup), None)
    if start is None or start >= last:
        raise RuntimeError(f"{metrics_path}: no log flush at or after step {warmup} before the last step {last}; "
                           f"use more --steps (train.log_every_steps={log_every})")
    wall = by_step[last]["time"] - by_step[start]["time"]
    window = [by_step[s] for s in range(start + 1, last + 1) if s in by_step]
    step_fps = [r["frames_per_s"] for r in window if r.get("frames_per_s") is not None]
    waits = [r["data_wait_frac"] for r in window if r.get("data_wait_frac") is not None]
    frames_of = frames_per_step if callable(frames_per_step) else (lambda k: frames_per_step)
    frames = sum(frames_of(k) for k in range(start, last))  # lines start + 1 .. last
    return {
        "frames_per_s": frames / wall,
        "frames_per_step": frames / (last - start),
        "window_steps": [start, last],
        "wall_s": wall,
        "step_frames_per_s_median": statistics.median(step_fps) if step_fps else None,
        "data_wait_frac_mean": statistics.fmean(waits) if waits else None,
        "peak_mem_bytes": max((r.get("peak_mem_bytes") or 0) for r in rows),
    }


def measure_harness(cfg: Config, run_dir: Path, warmup: int, kept: bool = True) -> dict:
    from avs_dist.train.loop import train
    from avs_dist.train.session import Session
    from avs_dist.train.stop import StopRequest

    t0 = time.perf_counter()
    with Session.open(cfg, run_dir, resume="never") as s:
        s.log.kept = kept  # a temporary run dir is deleted: its logs are not to be pointed at
        result = s.finish(train(s, StopRequest()))
    total_wall = time.perf_counter() - t0
    if result.get("status") != "completed":
        raise RuntimeError(f"the trainer ended with status {result.get('status')!r}")
    frames = step_frames(cfg, result["global_batch_videos"])
    out = harness_rate(run_dir / "metrics.jsonl", frames, cfg.train.log_every_steps, warmup)
    out.update(steps=result["step"], precision=result["precision"], run_wall_s=total_wall,
               num_workers=cfg.data.num_workers, global_batch_videos=result["global_batch_videos"])
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="avs-dist bench train", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--config", required=True, help="preset name (tiny, s4_seed, ...) or a .toml path")
    p.add_argument("--shards", required=True, help="shard set written by `avs-dist pack`")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per measurement (default 60)")
    p.add_argument("--warmup", type=int, default=10,
                   help="steps not timed; the harness window starts at the first log flush at or after it")
    p.add_argument("--run-dir", help="keep the harness run here (default: a temporary folder, deleted)")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.num_workers=8")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    if args.steps < 2 or not 0 <= args.warmup < args.steps:
        print(f"bench train: need --steps >= 2 and 0 <= --warmup < --steps (got {args.steps}, {args.warmup})",
              file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != 1:
        print(f"bench train: runs as one process (WORLD_SIZE={world}); start it without torchrun",
              file=sys.stderr)
        return 2
    try:
        from avs_dist.launch.args import check_run

        cfg = load_config(args.config, [*args.overrides, f"data.shards={json.dumps(str(args.shards))}",
                                         f"train.max_steps={args.steps}", *BENCH_OVERRIDES])
        check_run(cfg, 1, torch.cuda.is_available())
    except (ConfigError, RuntimeError) as e:
        print(f"bench train: {e}", file=sys.stderr)
        return 2

    own_env = "RANK" not in os.environ
    tmp = Path(tempfile.mkdtemp(prefix="avs-bench-train-"))
    run_dir = Path(args.run_dir) if args.run_dir else tmp / "run"
    if args.run_dir and run_dir.exists() and any(run_dir.iterdir()):
        print(f"bench train: --run-dir {run_dir} is not empty", file=sys.stderr)
        return 2
    try:
        _fresh_port(own_env)
        synthetic = measure_synthetic(cfg, tmp / "synthetic", args.steps - args.warmup, args.warmup)
        _fresh_port(own_env)
        harness = measure_harness(cfg, run_dir, args.warmup, kept=bool(args.run_dir))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ratio = harness["frames_per_s"] / synthetic["frames_per_s"]
    report = {
        "bench": "train", "config": args.config, "shards": str(args.shards), "overrides": args.overrides,
        "device": synthetic["device"], "torch": torch.__version__, "cuda": torch.version.cuda,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "strategy": cfg.train.strategy, "precision": synthetic["precision"],
        "global_batch_videos": harness["global_batch_videos"], "grad_accum": cfg.optim.grad_accum,
        "frames_per_step": harness["frames_per_step"],  # the window's mean (AVSS: steps differ)
        "steps": args.steps, "warmup": args.warmup,
        "synthetic": synthetic, "harness": harness,
        "harness_over_synthetic": ratio,
        "within_5_percent": ratio >= 0.95,
    }
    print(f"bench train ({args.config}, {report['device']}, torch {torch.__version__}): "
          f"synthetic {synthetic['frames_per_s']:.1f} frames/s, harness {harness['frames_per_s']:.1f} frames/s "
          f"(steps {harness['window_steps'][0]}..{harness['window_steps'][1]}), ratio {ratio:.3f}", flush=True)
    text = json.dumps(report, indent=2)
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
