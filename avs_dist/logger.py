"""Run logging: metrics.jsonl / eval.jsonl, TensorBoard, and the terminal.

Only rank 0 writes files and prints progress. The other ranks stay silent except for
warnings, which go to stderr prefixed with the rank so a Slurm log shows who complained.

Resuming from a checkpoint taken after optimizer step ``start_step`` drops every record
with a later step (the crashed run logged steps that the resumed run repeats), from the
JSONL files by an atomic rewrite and from TensorBoard through ``purge_step``, so every
step appears exactly once.

On a TTY the terminal gets rich progress bars; otherwise (Slurm log files) a plain line
every ``train.log_every_steps`` steps with the same numbers and no escape codes.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from avs_dist.data.loader import IMAGENET_MEAN, IMAGENET_STD

GT_COLOUR = (0.0, 1.0, 0.0)
PRED_COLOUR = (1.0, 0.0, 0.0)
OVERLAY_ALPHA = 0.5
MAX_IMAGE_SAMPLES = 8  # rows in one overlay grid; more would make TensorBoard images huge

# Keys of a metrics.jsonl line that are not loss terms; a term with one of these names
# would silently overwrite it.
STEP_KEYS = ("step", "epoch", "lr", "grad_norm", "frames_per_s", "data_wait_frac",
             "peak_mem_bytes", "time")


def flatten(data: dict, prefix: str = "", sep: str = ".") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


def hparam_value(value):
    """What TensorBoard's hparams plugin accepts: bool, int, float, str."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value)


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


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_value(value):
    """JSON has no NaN/inf: write null so strict readers (jq, JS) still parse the file."""
    value = _scalar(value) if not isinstance(value, (dict, list, str)) else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def truncate_jsonl(path: Path, keep_through_step: int) -> tuple[int, int]:
    """Keep the lines of `path` with step <= keep_through_step; atomic rewrite.

    A line that does not parse is dropped: a crash can leave a half-written last line.
    Returns (lines kept, lines dropped).
    """
    if not path.exists():
        return 0, 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                dropped += 1
                continue
            if isinstance(step, int) and step <= keep_through_step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return len(kept), dropped


def _denormalize(frames: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (frames.float() * std + mean).clamp(0, 1)


def _tint(images: torch.Tensor, mask: torch.Tensor, colour) -> torch.Tensor:
    """Blend `colour` into `images` [N,3,H,W] where `mask` [N,H,W] is 1."""
    colour = torch.tensor(colour).view(1, 3, 1, 1)
    alpha = OVERLAY_ALPHA * mask.float().unsqueeze(1)
    return images * (1 - alpha) + colour * alpha


def overlay_grid(frames: torch.Tensor, masks: torch.Tensor, logits: torch.Tensor,
                 max_samples: int = MAX_IMAGE_SAMPLES) -> torch.Tensor:
    """One row per sample: frame | ground truth tinted green | prediction tinted red.

    frames [N,3,H,W] ImageNet-normalised, masks [N,H,W] 0/1, logits [N,1,H,W].
    Returns a [3,H',W'] float image in [0,1].
    """
    from torchvision.utils import make_grid

    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"log_images: frames must be [N,3,H,W], got {tuple(frames.shape)}")
    n, _, h, w = frames.shape
    if tuple(masks.shape) != (n, h, w):
        raise ValueError(f"log_images: masks must be [N,H,W]={n, h, w}, got {tuple(masks.shape)}")
    if tuple(logits.shape) != (n, 1, h, w):
        raise ValueError(f"log_images: logits must be [N,1,H,W]={n, 1, h, w}, got {tuple(logits.shape)}")
    k = min(n, max_samples)
    images = _denormalize(frames[:k].detach().cpu())
    gt = masks[:k].detach().cpu() > 0.5
    pred = torch.sigmoid(logits[:k, 0].detach().cpu().float()) > 0.5
    rows = torch.stack([images, _tint(images, gt, GT_COLOUR), _tint(images, pred, PRED_COLOUR)], dim=1)
    return make_grid(rows.flatten(0, 1), nrow=3, padding=2, pad_value=1.0)


class RunLogger:
    """The trainer's one place for logging. See the module docstring."""

    def __init__(self, run_dir, cfg_dict: dict, rank: int, total_steps: int, steps_per_epoch: int,
                 start_step: int = 0, tty: bool | None = None):
        self.run_dir = Path(run_dir)
        self.cfg_dict = cfg_dict
        self.rank = rank
        self.total_steps = int(total_steps)
        self.steps_per_epoch = int(steps_per_epoch)
        self.start_step = int(start_step)
        self.log_every = int(cfg_dict.get("train", {}).get("log_every_steps", 10))
        if self.log_every <= 0:
            raise ValueError(f"train.log_every_steps must be > 0 (got {self.log_every})")
        self.tty = sys.stdout.isatty() if tty is None else tty
        self._closed = False
        self._warned_nonfinite = False
        self._t0 = time.time()
        self._first_step_time = None  # ETA counts from the first logged step: no start-up cost
        self._last_step = self.start_step
        self._last_terms: dict = {}
        self._fps: list[float] = []
        self._wait: list[float] = []
        self._peak_mem = 0
        self._last_eval: dict = {}
        self._progress = None
        self._metrics_f = self._eval_f = self.writer = None
        if rank != 0:
            return

        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "eval.jsonl"):
            kept, dropped = truncate_jsonl(self.run_dir / name, self.start_step)
            if dropped and self.start_step > 0:
                self.info(f"resume at step {self.start_step}: dropped {dropped} later line(s) of {name}")
        self._metrics_f = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._eval_f = open(self.run_dir / "eval.jsonl", "a", encoding="utf-8")

        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides every event at or after it written by the run we resume; our
        # first new step is start_step + 1, and start_step itself was logged before the
        # checkpoint, so it must survive.
        purge = self.start_step + 1 if self.start_step > 0 else None
        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge, flush_secs=30)
        self._start()

    # ---------------------------------------------------------------- terminal
    def _console(self, stderr: bool = False):
        from rich.console import Console

        if self.tty:
            return Console(stderr=stderr, force_terminal=True)
        # Slurm log files: no colours, no cursor movement, a fixed width.
        return Console(stderr=stderr, force_terminal=False, color_system=None, width=110,
                       no_color=True, highlight=False)

    def _print(self, renderable) -> None:
        if self._progress is not None:
            self._progress.console.print(renderable)
        else:
            self._console().print(renderable)

    def _table(self, title: str, rows, headers=("key", "value")):
        from rich import box
        from rich.table import Table
        from rich.text import Text

        table = Table(title=title, box=box.SIMPLE_HEAVY if self.tty else box.ASCII,
                      show_header=True, title_justify="left")
        for h in headers:
            table.add_column(h)
        for row in rows:
            # Text, not str: a config value such as "[0, 1]" must not be read as rich markup.
            table.add_row(*[Text(str(c)) for c in row])
        return table

    def _start(self) -> None:
        """Config table and (on a TTY) progress bars, on rank 0."""
        rows = [(k, hparam_value(v)) for k, v in flatten(self.cfg_dict).items()]
        half = (len(rows) + 1) // 2  # two key/value column pairs: half as many lines
        left, right = rows[:half], rows[half:] + [("", "")] * (2 * half - len(rows))
        self._print(self._table(f"config ({self.run_dir})", [(*a, *b) for a, b in zip(left, right)],
                                headers=("key", "value", "key", "value")))
        if self.start_step:
            self.info(f"resuming at step {self.start_step}/{self.total_steps}")
        if self.tty:
            self._start_progress()

    def _start_progress(self) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            console=self._console(),
        )
        self._progress.start()
        self._task_total = self._progress.add_task("train", total=self.total_steps,
                                                   completed=self.start_step, stats="")
        self._task_epoch = None
        self._epoch_shown = None

    def _update_progress(self, step, epoch, stats: str) -> None:
        p = self._progress
        p.update(self._task_total, completed=step, stats=stats)
        if self.steps_per_epoch <= 0:
            return
        in_epoch = (step - 1) % self.steps_per_epoch + 1
        if epoch != self._epoch_shown:
            if self._task_epoch is not None:
                p.remove_task(self._task_epoch)
            self._task_epoch = p.add_task(f"epoch {epoch}", total=self.steps_per_epoch, stats="")
            self._epoch_shown = epoch
        p.update(self._task_epoch, completed=in_epoch)

    def info(self, msg) -> None:
        if self.rank != 0:
            return
        if self._progress is not None:
            self._progress.console.print(str(msg), markup=False, highlight=False)
        else:
            print(str(msg), flush=True)

    def warn(self, msg) -> None:
        prefix = f"[rank {self.rank}] " if self.rank != 0 else ""
        text = f"{prefix}WARNING: {msg}"
        if self.rank == 0 and self._progress is not None:
            # Printed through the progress console so the bars are redrawn below it.
            self._progress.console.print(text, style="yellow", markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def _eta(self, step) -> str:
        done = step - self.start_step
        if self._first_step_time is None or done <= 1:
            return "?"
        rate = (done - 1) / max(time.time() - self._first_step_time, 1e-9)
        left = (self.total_steps - step) / rate if rate > 0 else 0
        return time.strftime("%H:%M:%S", time.gmtime(left)) if left < 86400 else f"{left / 86400:.1f}d"

    # ---------------------------------------------------------------- logging
    def log_step(self, step, epoch, terms: dict, lr, grad_norm, frames_per_s, data_wait_frac,
                 peak_mem_bytes, wall_time: float | None = None) -> None:
        """One optimizer step. `wall_time` (time.time() when the step ended) lets a trainer
        that flushes several steps at once keep each line's own time; default: now."""
        step, epoch = int(step), int(epoch)
        wall_time = time.time() if wall_time is None else float(wall_time)
        terms = {str(k): _scalar(v) for k, v in terms.items()}
        clash = sorted(set(terms) & set(STEP_KEYS))
        if clash:
            raise ValueError(f"log_step: loss term names {clash} clash with metrics.jsonl keys")
        lr, grad_norm = _scalar(lr), _scalar(grad_norm)
        frames_per_s, data_wait_frac = _scalar(frames_per_s), _scalar(data_wait_frac)
        peak_mem_bytes = int(_scalar(peak_mem_bytes) or 0)
        if self._first_step_time is None:
            self._first_step_time = time.time()
        self._last_step, self._last_terms = step, terms
        if frames_per_s is not None and step > self.start_step + 1:  # first step: warm-up
            self._fps.append(frames_per_s)
        if data_wait_frac is not None:
            self._wait.append(data_wait_frac)
        self._peak_mem = max(self._peak_mem, peak_mem_bytes)
        if self.rank != 0:
            return
        if not self._warned_nonfinite and any(v is not None and not math.isfinite(v) for v in terms.values()):
            self._warned_nonfinite = True
            self.warn(f"non-finite loss at step {step}: {terms} (written as null in metrics.jsonl)")

        record = {"step": step, "epoch": epoch, **terms, "lr": lr, "grad_norm": grad_norm,
                  "frames_per_s": frames_per_s, "data_wait_frac": data_wait_frac,
                  "peak_mem_bytes": peak_mem_bytes, "time": wall_time}
        self._metrics_f.write(json.dumps(_json_value(record)) + "\n")
        self._metrics_f.flush()

        scalars = {f"loss/{name}": value for name, value in terms.items()}
        scalars.update({"train/lr": lr, "train/grad_norm": grad_norm, "perf/frames_per_s": frames_per_s,
                        "perf/data_wait_frac": data_wait_frac, "perf/peak_mem_gib": peak_mem_bytes / 2**30})
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step, walltime=wall_time)

        loss = terms.get("total", next(iter(terms.values()), None))
        if self._progress is not None:
            stats = f"loss {_fmt(loss)} lr {_fmt(lr, '.1e')} {_fmt(frames_per_s, '.1f')} fr/s"
            self._update_progress(step, epoch, stats)
        elif step % self.log_every == 0 or step == self.total_steps or step == self.start_step + 1:
            self.info(self._plain_line(step, epoch, terms, lr, grad_norm, frames_per_s,
                                       data_wait_frac, peak_mem_bytes))

    def _plain_line(self, step, epoch, terms, lr, grad_norm, fps, wait, mem) -> str:
        parts = [f"step {step}/{self.total_steps}", f"epoch {epoch}"]
        if "total" in terms:
            parts.append(f"loss {_fmt(terms['total'])}")
        parts += [f"{k} {_fmt(v)}" for k, v in terms.items() if k != "total"]
        parts += [f"lr {_fmt(lr, '.1e')}", f"gnorm {_fmt(grad_norm, '.3g')}", f"fps {_fmt(fps, '.1f')}",
                  f"wait {_fmt(None if wait is None else 100 * wait, '.0f')}%",
                  f"mem {mem / 2**30:.2f}GiB", f"eta {self._eta(step)}"]
        return " ".join(parts)

    def log_eval(self, step, metrics: dict, split="val") -> None:
        step = int(step)
        if self.rank != 0:
            return
        values = _json_value(dict(metrics))
        self._eval_f.write(json.dumps({"step": step, "split": split, **values, "time": time.time()}) + "\n")
        self._eval_f.flush()
        numbers = {k: v for k, v in flatten(values, sep="/").items() if _is_number(v)}
        self._last_eval.update({f"{split}/{k}": v for k, v in numbers.items()})
        for key, value in numbers.items():
            self.writer.add_scalar(f"{split}/{key}", value, step)
        self.writer.flush()
        shown = " ".join(f"{k} {_fmt(v)}" for k, v in numbers.items())
        self.info(f"eval {split} step {step}: {shown}")

    def log_images(self, step, frames, masks, logits) -> None:
        if self.rank != 0:
            return
        grid = overlay_grid(frames, masks, logits)
        self.writer.add_image("images/frame_gt_pred", grid, int(step), dataformats="CHW")

    def finish(self, final_metrics: dict, hparams: dict) -> None:
        """Summary table, and the run's config beside its final metrics for TensorBoard's
        HParams dashboard (the final step's metrics are its comparison columns)."""
        if self.rank != 0:
            return
        self._stop_progress()
        final = {k: v for k, v in flatten(_json_value(dict(final_metrics)), sep="/").items()}
        metric_dict = {f"final/{k}": float(v) for k, v in final.items() if _is_number(v)}
        hp = {k: hparam_value(v) for k, v in flatten(dict(hparams or self.cfg_dict)).items()}
        self.writer.add_hparams(hp, metric_dict, run_name="hparams", global_step=self._last_step)
        self.writer.flush()

        elapsed = time.time() - self._t0
        rows = [("steps", f"{self._last_step}/{self.total_steps}"),
                ("wall time", time.strftime("%H:%M:%S", time.gmtime(elapsed))),
                ("frames/s (median)", _fmt(statistics.median(self._fps), ".1f") if self._fps else "-"),
                ("data wait (mean)", f"{100 * statistics.fmean(self._wait):.1f}%" if self._wait else "-"),
                ("peak memory", f"{self._peak_mem / 2**30:.2f} GiB")]
        rows += [(f"last {k}", _fmt(v)) for k, v in self._last_terms.items()]
        rows += [(f"last eval {k}", _fmt(v)) for k, v in self._last_eval.items()]
        rows += [(f"final {k}", _fmt(v) if _is_number(v) else v) for k, v in final.items()]
        self._print(self._table("run summary", rows))
        self.info(f"logs: {self.run_dir / 'metrics.jsonl'}, tensorboard --logdir {self.run_dir / 'tb'}")

    def _stop_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_progress()
        for f in (self._metrics_f, self._eval_f):
            if f is not None:
                f.close()
        if self.writer is not None:
            self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _fmt(value, spec: str = ".4f") -> str:
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)
