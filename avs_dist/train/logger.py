"""RunLogger: the trainer's one logger. It decides when to log and hands host values to the
sinks (train/sinks.py: metrics.jsonl / eval.jsonl, TensorBoard, terminal).

Only rank 0 has sinks. The other ranks stay silent except for warnings, which go to stderr
prefixed with the rank so a Slurm log shows who complained.

The training loop calls `record_step` once per optimizer step with the step's device
tensors. Rank 0 queues them and copies them to the host in one transfer (one host sync)
every `train.log_every_steps` steps, at the last step, and whenever the loop asks for it
(`flush=True`: before a validation, a checkpoint or a stop, so metrics.jsonl always holds
every step a checkpoint covers); every queued step then becomes one metrics.jsonl line.
Overlay images go to TensorBoard every `train.image_every_steps` steps. The terminal shows
a line at the first step, every log_every steps and at the last one (rich bars on a TTY).
With `train.record_videos`, every rank also writes run_dir/videos/rank<r>.jsonl: per step
{"step", "epoch", "names"} of the videos it trained on (audits of the data order).
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from avs_dist.train.sinks import (STEP_KEYS, JsonlSink, TensorBoardSink, TerminalSink, flatten, fmt, is_number,
                                  json_value, overlay_grid)
from avs_dist.train.summary import final_numbers, summary_rows


def _scalar(value):
    """Python number from a float, tensor or numpy scalar; None stays None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"expected a scalar, got a tensor of shape {tuple(value.shape)}")
        return value.detach().float().item()
    if hasattr(value, "item"):  # numpy scalar
        return value.item()
    return value


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated on `device`, or this process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def frame_captions(batch: dict) -> list[str]:
    """"name  frame t  class" for each of the B x T frames of a loader batch (class: the S4
    class that sounds, by batch["label"]; MS3 videos have none)."""
    from avs_dist.data.classes import S4_CLASSES

    t = batch["mask_valid"].shape[1]
    labels = batch["label"].tolist() if "label" in batch else [-1] * len(batch["name"])
    out = []
    for name, label in zip(batch["name"], labels):
        sounds = f"  sounds: {S4_CLASSES[label]}" if 0 <= label < len(S4_CLASSES) else ""
        out += [f"{name}  frame {i + 1}{sounds}" for i in range(t)]
    return out


class RunLogger:
    """See the module docstring. `videos_per_step`: the global batch, for frames/s in
    record_step: a step's frames are that many videos of as many frames as rank 0's
    micro-batches hold on average (their T, padded frames included: S4 / MS3 5, AVSS batches
    10 or 5; the frames the model computed). Rank 0's T stands for every rank's: the shapes
    are on the host, the other ranks' are not."""

    def __init__(self, run_dir, cfg_dict: dict, rank: int, total_steps: int, steps_per_epoch: int,
                 start_step: int = 0, tty: bool | None = None, videos_per_step: int = 0):
        self.run_dir, self.cfg_dict, self.rank = Path(run_dir), cfg_dict, rank
        self.total_steps, self.start_step, self.videos_per_step = int(total_steps), int(start_step), videos_per_step
        train = cfg_dict.get("train", {})
        self.log_every = int(train.get("log_every_steps", 10))
        self.image_every = int(train.get("image_every_steps", 0))
        if self.log_every <= 0:
            raise ValueError(f"train.log_every_steps must be > 0 (got {self.log_every})")
        self._t0 = time.time()
        self._warned_nonfinite = self._closed = False
        self._pending: list = []
        self._last_step, self._last_terms = self.start_step, {}
        self.steps_per_epoch = int(steps_per_epoch)
        self._fps: list[float] = []
        self._wait: list[float] = []
        self._peak_mem = 0
        self.terminal = None
        self.kept = True  # run_dir outlives the run (not bench train's temporary one): finish() names its logs
        self.sinks: list = []
        self.videos = None
        if train.get("record_videos"):
            self.videos = JsonlSink.per_rank(self.run_dir / "videos" / f"rank{rank}.jsonl", self.start_step)
        if rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tty = sys.stdout.isatty() if tty is None else tty
        self.terminal = TerminalSink(cfg_dict, f"config ({self.run_dir})", self.total_steps, int(steps_per_epoch),
                                     self.start_step, tty)
        self.sinks = [JsonlSink(self.run_dir, self.start_step, self.info),
                      TensorBoardSink(self.run_dir, self.start_step), self.terminal]

    # ---------------------------------------------------------------- messages
    def info(self, msg) -> None:
        if self.terminal is not None:
            self.terminal.info(msg)

    def warn(self, msg) -> None:
        if self.terminal is not None:
            self.terminal.warn(f"WARNING: {msg}")
        else:
            print(f"[rank {self.rank}] WARNING: {msg}", file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- training steps
    def record_step(self, step: int, batches, out, seconds: float, flush: bool = False,
                    nonfinite_steps: int = 0) -> None:
        """One optimizer step of the loop: `batches` (data/loader.py StepBatches), `out`
        (train/step.py StepOutput), `seconds` from asking for the data to the optimizer step,
        `nonfinite_steps`: steps skipped for NaN/inf so far in the run."""
        if self.videos is not None:
            self.videos.write(json.dumps({"step": step, "epoch": batches.epoch,
                                          "names": [n for b in batches.micro for n in b["name"]]}) + "\n")
            self.videos.flush()
        if self.rank != 0:
            return  # only rank 0 logs: the other ranks skip the device-to-host copies
        device = out.losses.device
        frames = self.videos_per_step * statistics.fmean(b["frames"].shape[1] for b in batches.micro)  # no sync
        vec = torch.cat([out.losses.float(), out.grad_norm.reshape(1).to(device, torch.float32)])
        self._pending.append((vec, out.names, {
            "step": step, "epoch": batches.epoch, "lr": out.lr, "frames_per_s": frames / seconds,
            "data_wait_frac": batches.wait_s / seconds, "peak_mem_bytes": peak_memory_bytes(device),
            "wall_time": time.time(), "skipped": out.skipped, "nonfinite_steps": nonfinite_steps}))
        if self.image_every and step % self.image_every == 0:
            self._images_of(step, out)
        if flush or step % self.log_every == 0 or step == self.total_steps:
            self.flush()

    def flush(self) -> None:
        """Write the queued steps (one device-to-host copy for all of them)."""
        if not self._pending:
            return
        values = torch.stack([v for v, _, _ in self._pending]).cpu().tolist()
        for row, (_, names, meta) in zip(values, self._pending):
            self.log_step(meta.pop("step"), meta.pop("epoch"), dict(zip(names, row[:-1])), grad_norm=row[-1], **meta)
        self._pending.clear()

    def _images_of(self, step: int, out) -> None:
        """The labelled frames of the step's last micro-batch, taken frame by frame across its
        videos (video 1 frame 1, video 2 frame 1, ..., video 1 frame 2, ...): the strip's rows
        (MAX_IMAGE_SAMPLES) show every video, not the first clip's near-identical frames."""
        batch = out.batch
        b, t = batch["mask_valid"].shape
        order = torch.arange(b * t).view(b, t).t().reshape(-1)  # row index of video v, frame f: v * t + f
        order = order[batch["mask_valid"].reshape(-1).cpu()[order]]
        captions = frame_captions(batch)
        frames = batch["frames"].reshape(-1, *batch["frames"].shape[2:])[order.to(batch["frames"].device)]
        masks = batch["masks"].reshape(-1, *batch["masks"].shape[2:])[order.to(batch["masks"].device)]
        logits = out.out["logits"].detach()
        self.log_images(step, frames.float().cpu(), masks.float().cpu(),
                        logits[order.to(logits.device)].float().cpu(), captions=[captions[i] for i in order.tolist()])

    def log_step(self, step, epoch, terms: dict, lr, grad_norm, frames_per_s, data_wait_frac,
                 peak_mem_bytes, wall_time: float | None = None, skipped: str | None = None,
                 nonfinite_steps: int = 0) -> None:
        """One optimizer step's line, written now. `wall_time` (time.time() when the step
        ended; default: now) lets a caller that writes several steps at once keep each one's time.
        `skipped`: why the update was skipped ("nonfinite", "fp16_overflow"), None when it was
        applied; `nonfinite_steps`: the run's count of non-finite steps so far."""
        terms = {str(k): _scalar(v) for k, v in terms.items()}
        clash = sorted(set(terms) & set(STEP_KEYS))
        if clash:
            raise ValueError(f"log_step: loss term names {clash} clash with metrics.jsonl keys")
        if self.rank != 0:
            return
        step, epoch = int(step), int(epoch)
        record = {"step": step, "epoch": epoch, **terms, "lr": _scalar(lr), "grad_norm": _scalar(grad_norm),
                  "frames_per_s": _scalar(frames_per_s), "data_wait_frac": _scalar(data_wait_frac),
                  "peak_mem_bytes": int(_scalar(peak_mem_bytes) or 0),
                  "time": time.time() if wall_time is None else float(wall_time), "skipped": skipped,
                  "nonfinite_steps": int(nonfinite_steps)}
        self._last_step, self._last_terms = step, terms
        if record["frames_per_s"] is not None and step > self.start_step + 1:  # first step: warm-up
            self._fps.append(record["frames_per_s"])
        if record["data_wait_frac"] is not None:
            self._wait.append(record["data_wait_frac"])
        self._peak_mem = max(self._peak_mem, record["peak_mem_bytes"])
        if skipped == "nonfinite":
            self.warn(f"step {step}: non-finite loss or gradient, update skipped ({nonfinite_steps} in this run; "
                      f"grad norm {fmt(record['grad_norm'], '.3g')}, {terms}; null in metrics.jsonl)")
        elif not self._warned_nonfinite and any(v is not None and not math.isfinite(v) for v in terms.values()):
            self._warned_nonfinite = True  # an fp16 overflow step: the scaler's own rule
            self.warn(f"non-finite loss at step {step}: {terms} (written as null in metrics.jsonl)")
        show = step % self.log_every == 0 or step == self.total_steps or step == self.start_step + 1
        for sink in self.sinks:
            sink.step(record, show)

    # ---------------------------------------------------------------- evaluation, images, end
    def log_eval(self, step, metrics: dict, split: str = "val", source: dict | None = None) -> None:
        """An evaluation's figures. `source` (provenance.py): which weights they are of, when
        not the live model at `step` (the final test: the last model); eval.jsonl keeps it."""
        if self.rank != 0:
            return
        values = json_value({k: _scalar(v) if not isinstance(v, (dict, list, str)) else v for k, v in metrics.items()})
        numbers = {k: v for k, v in flatten(values, sep="/").items() if is_number(v)}
        for sink in self.sinks:
            sink.eval(int(step), split, values if isinstance(sink, JsonlSink) else numbers, source)

    def log_images(self, step, frames, masks, logits, captions: list[str] | None = None) -> None:
        if self.rank != 0:
            return
        grid = overlay_grid(frames, masks, logits, captions=captions)
        for sink in self.sinks:
            sink.images(int(step), grid)

    def finish(self, result: dict, hparams: dict) -> None:
        """Summary table (summary_rows), and the config beside the final metrics for
        TensorBoard's HParams. `result`: train/session.py Session.finish's dict."""
        if self.rank != 0:
            return
        self.flush()
        perf = {"wall_s": time.time() - self._t0, "fps": statistics.median(self._fps) if self._fps else None,
                "wait": statistics.fmean(self._wait) if self._wait else None, "peak_mem": self._peak_mem,
                "loss": self._last_terms}
        rows = summary_rows(result, perf, self.total_steps, self.steps_per_epoch, self.run_dir)
        if not self.kept:  # a temporary run folder (bench train): no pointers into it
            rows = [row for row in rows if row[0] not in ("results", "tensorboard")]
        for sink in self.sinks:
            sink.finish(rows, final_numbers(result), dict(hparams or self.cfg_dict), self._last_step)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sink in self.sinks:
            sink.close()
        if self.videos is not None:
            self.videos.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
