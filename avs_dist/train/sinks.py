"""Where run logs go: metrics.jsonl / eval.jsonl, TensorBoard, the terminal.

Each sink takes host values that RunLogger (train/logger.py) already decided to write:
`step(record, show)` with record = {"step", "epoch", <loss terms>, "lr", "grad_norm",
"frames_per_s", "data_wait_frac", "peak_mem_bytes", "time", "skipped" (None, "nonfinite" or
"fp16_overflow"), "nonfinite_steps"} (`show`: a terminal line is due for this step),
`eval(step, split, metrics, source)` with numbers only (source: provenance.py, which weights,
or None for the live model at `step`), `images(step, grid)`,
`finish(summary_rows, final, hparams, last_step)` and `close()`.
Only rank 0 has sinks.

Resuming after optimizer step ``start_step`` drops every record of a later step (the
crashed run logged steps that the resumed run repeats): from the JSONL files by an atomic
rewrite, from TensorBoard through ``purge_step``, so every step appears exactly once.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from avs_dist.data.transforms import denormalize
from avs_dist.provenance import describe

MAX_IMAGE_SAMPLES = 8  # rows in one overlay grid; more would make TensorBoard images huge


# ----------------------------------------------------------------------------- values
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


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def json_value(value):
    """JSON has no NaN/inf: write null so strict readers (jq, JS) still parse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return value


def fmt(value, spec: str = ".4f") -> str:
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


# ----------------------------------------------------------------------------- images
def overlay_grid(frames: torch.Tensor, masks: torch.Tensor, logits: torch.Tensor,
                 max_samples: int = MAX_IMAGE_SAMPLES, captions: list[str] | None = None) -> torch.Tensor:
    """One row per sample, labelled: frame | ground truth | prediction.

    One-channel logits (S4, MS3) [N,1,H,W] with masks [N,H,W] 0/1: plots.prediction_grid
    (outlined masks in a colour that stands out, each row's IoU). Class logits (AVSS) [N,K,H,W],
    K > 1, with masks [N,H,W] class indices: avss/pictures.py prediction_strip (each class tinted
    and outlined in its palette colour and named on the panel; the caption lists the classes of
    both and the frame's mIoU); the prediction is the argmax over classes.
    frames [N,3,H,W] ImageNet-normalised; captions: one per sample (video, frame, class), or none.
    Returns a [3,H',W'] float image in [0,1]. ValueError naming the argument of a wrong shape."""
    from avs_dist.plots import prediction_grid

    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"log_images: frames must be [N,3,H,W], got {tuple(frames.shape)}")
    n, _, h, w = frames.shape
    if tuple(masks.shape) != (n, h, w):
        raise ValueError(f"log_images: masks must be [N,H,W]={n, h, w}, got {tuple(masks.shape)}")
    if logits.dim() != 4 or logits.shape[0] != n or tuple(logits.shape[2:]) != (h, w):
        raise ValueError(f"log_images: logits must be [N,K,H,W]={n, 'K', h, w}, got {tuple(logits.shape)}")
    k = min(n, max_samples)
    images = (denormalize(frames[:k].detach().cpu().float()).clamp(0, 1) * 255).round().to(torch.uint8)
    images = images.permute(0, 2, 3, 1).numpy()
    captions = list(captions[:k]) if captions is not None else [f"sample {i + 1}" for i in range(k)]
    if logits.shape[1] > 1:
        from avs_dist.avss.pictures import prediction_strip

        gt = masks[:k].detach().cpu().long().numpy()
        pred = logits[:k].detach().cpu().float().argmax(1).numpy()
        grid = prediction_strip(images, gt, pred, captions)
    else:
        gt = (masks[:k].detach().cpu() > 0.5).numpy()
        pred = (torch.sigmoid(logits[:k, 0].detach().cpu().float()) > 0.5).numpy()
        grid = prediction_grid(images, gt, pred, captions)
    return torch.from_numpy(np.array(grid)).permute(2, 0, 1).float() / 255


# ----------------------------------------------------------------------------- JSONL
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


class JsonlSink:
    """run_dir/metrics.jsonl (one line per optimizer step) and run_dir/eval.jsonl."""

    def __init__(self, run_dir: Path, start_step: int, info):
        for name in ("metrics.jsonl", "eval.jsonl"):
            _, dropped = truncate_jsonl(run_dir / name, start_step)
            if dropped and start_step > 0:
                info(f"resume at step {start_step}: dropped {dropped} later line(s) of {name}")
        self._metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._eval = open(run_dir / "eval.jsonl", "a", encoding="utf-8")

    @staticmethod
    def per_rank(path: Path, start_step: int):
        """An append handle on a JSONL file of one rank, without the lines after start_step."""
        path.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(path, start_step)
        return open(path, "a", encoding="utf-8")

    def step(self, record: dict, show: bool) -> None:
        self._metrics.write(json.dumps(json_value(record)) + "\n")
        self._metrics.flush()

    def eval(self, step: int, split: str, metrics: dict, source: dict | None = None) -> None:
        extra = {"source": source} if source else {}
        self._eval.write(json.dumps({"step": step, "split": split, **json_value(metrics), **extra,
                                     "time": time.time()}) + "\n")
        self._eval.flush()

    def images(self, step, grid) -> None:
        pass

    def finish(self, rows, final: dict, hparams: dict, last_step: int) -> None:
        pass

    def close(self) -> None:
        self._metrics.close()
        self._eval.close()


# ----------------------------------------------------------------------------- TensorBoard
class TensorBoardSink:
    """run_dir/tb: scalars (loss/*, train/*, perf/*, <split>/*), overlay images, hparams."""

    def __init__(self, run_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides every event at or after it written by the run we resume; our
        # first new step is start_step + 1, and start_step itself was logged before the
        # checkpoint, so it must survive.
        purge = start_step + 1 if start_step > 0 else None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge, flush_secs=30)

    def step(self, r: dict, show: bool) -> None:
        scalars = {f"loss/{k}": v for k, v in r.items() if k not in STEP_KEYS}
        scalars.update({"train/lr": r["lr"], "train/grad_norm": r["grad_norm"], "perf/frames_per_s": r["frames_per_s"],
                        "perf/data_wait_frac": r["data_wait_frac"], "perf/peak_mem_gib": r["peak_mem_bytes"] / 2**30,
                        "train/skipped": float(r.get("skipped") is not None),
                        "train/nonfinite_steps": r.get("nonfinite_steps", 0)})
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, value, r["step"], walltime=r["time"])

    def eval(self, step: int, split: str, metrics: dict, source: dict | None = None) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"{split}/{key}", value, step)
        self.writer.flush()

    def images(self, step, grid) -> None:
        self.writer.add_image("images/frame_gt_pred", grid, int(step), dataformats="CHW")

    def finish(self, rows, final: dict, hparams: dict, last_step: int) -> None:
        """The run's config beside its final metrics for TensorBoard's HParams dashboard."""
        if not hparams.get("train", {}).get("tb_hparams", True):
            return  # a study's run: the study writes its session (study/report.py)
        metric_dict = {f"final/{k}": float(v) for k, v in final.items() if is_number(v)}
        hp = {k: hparam_value(v) for k, v in flatten(hparams).items()}
        self.writer.add_hparams(hp, metric_dict, run_name="hparams", global_step=last_step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# Keys of a metrics.jsonl line that are not loss terms; a term with one of these names
# would silently overwrite it.
STEP_KEYS = ("step", "epoch", "lr", "grad_norm", "frames_per_s", "data_wait_frac", "peak_mem_bytes", "time",
             "skipped", "nonfinite_steps")
ETA_MIN_STEPS = 3  # steps after the first before a rate is worth showing
# Counts of an evaluation's set (metrics.py; AVSS: avss/metrics.py summarize's frame and class
# counts), not figures of the model.
EVAL_COUNTS = ("videos", "frames", "empty_frames", "batch_videos", "frames_scored", "frames_padded",
               "frames_unlabelled", "frames_avsbench", "classes_present", "objects_present")


# ----------------------------------------------------------------------------- terminal
def config_rows(cfg_dict: dict, total_steps: int, steps_per_epoch: int) -> list[tuple]:
    """(key, value) of every config field, where the value says what the run will do:
    train.max_steps overrides train.epochs, so the table shows the plan instead of a number
    the run never follows."""
    rows = {k: hparam_value(v) for k, v in flatten(cfg_dict).items()}
    if rows.get("train.max_steps") and steps_per_epoch > 0:
        epochs = -(-total_steps // steps_per_epoch)
        rows["train.max_steps"] = f"{rows['train.max_steps']} (= {epochs} epochs of {steps_per_epoch} steps)"
        if "train.epochs" in rows:
            rows["train.epochs"] = f"{rows['train.epochs']} (not used: max_steps)"
    elif "train.epochs" in rows and steps_per_epoch > 0:
        rows["train.epochs"] = f"{rows['train.epochs']} (= {total_steps} steps of {steps_per_epoch} per epoch)"
    return list(rows.items())


class TerminalSink:
    """rich progress bars on a TTY; otherwise (Slurm log files) plain lines without escape
    codes, at the steps RunLogger marks `show`. Config table at the start, summary at the end."""

    def __init__(self, cfg_dict: dict, title: str, total_steps: int, steps_per_epoch: int, start_step: int,
                 tty: bool):
        self.tty, self.total_steps, self.steps_per_epoch = tty, total_steps, steps_per_epoch
        self.start_step = start_step
        self._eta_origin = None  # (step, time) of the first step: its start-up cost is not in the rate
        self._progress = None
        rows = config_rows(cfg_dict, total_steps, steps_per_epoch)
        half = (len(rows) + 1) // 2  # two key/value column pairs: half as many lines
        left, right = rows[:half], rows[half:] + [("", "")] * (2 * half - len(rows))
        self._print(self._table(title, [(*a, *b) for a, b in zip(left, right)], headers=("key", "value") * 2))
        if start_step:
            self.info(f"resuming at step {start_step}/{total_steps}")
        if tty:
            self._start_progress(start_step)

    def _console(self, stderr: bool = False):
        from rich.console import Console

        if self.tty:
            return Console(stderr=stderr, force_terminal=True)
        # Slurm log files: no colours, no cursor movement, a fixed width.
        return Console(stderr=stderr, force_terminal=False, color_system=None, width=110,
                       no_color=True, highlight=False)

    def _print(self, renderable) -> None:
        (self._progress.console if self._progress is not None else self._console()).print(renderable)

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

    def _start_progress(self, start_step: int) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                  TextColumn("{task.fields[stats]}"), console=self._console())
        self._progress.start()
        self._task_total = self._progress.add_task("train", total=self.total_steps, completed=start_step, stats="")
        self._task_epoch = self._epoch_shown = None

    def info(self, msg) -> None:
        if self._progress is not None:
            self._progress.console.print(str(msg), markup=False, highlight=False)
        else:
            print(str(msg), flush=True)

    def warn(self, text: str) -> None:
        if self._progress is not None:  # through the progress console: the bars are redrawn below it
            self._progress.console.print(text, style="yellow", markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def _eta(self, step: int, ended: float) -> str | None:
        """Time left after `step`, which ended at `ended` (time.time()), from the rate since the
        first step; None until ETA_MIN_STEPS steps are behind it. Records arrive in batches of
        log_every (one host sync), so the rate comes from each step's own end time, not from now."""
        first, t_first = self._eta_origin
        if step - first < ETA_MIN_STEPS or ended <= t_first:
            return None
        rate = (step - first) / (ended - t_first)
        left = max((self.total_steps - step) / rate - (time.time() - ended), 0.0)
        return time.strftime("%H:%M:%S", time.gmtime(left)) if left < 86400 else f"{left / 86400:.1f}d"

    def step(self, r: dict, show: bool) -> None:
        if self._eta_origin is None:
            self._eta_origin = (r["step"], r["time"])
        terms = {k: v for k, v in r.items() if k not in STEP_KEYS}
        if self._progress is not None:
            loss = terms.get("total", next(iter(terms.values()), None))
            self._update_progress(r["step"], r["epoch"],
                                  f"loss {fmt(loss)} lr {fmt(r['lr'], '.1e')} {fmt(r['frames_per_s'], '.1f')} fr/s")
        elif show:
            parts = [f"step {r['step']}/{self.total_steps}", f"epoch {r['epoch']}"]
            if "total" in terms:
                parts.append(f"loss {fmt(terms['total'])}")
            wait = r["data_wait_frac"]
            parts += [f"{k} {fmt(v)}" for k, v in terms.items() if k != "total"]
            parts += [f"lr {fmt(r['lr'], '.1e')}", f"gnorm {fmt(r['grad_norm'], '.3g')}",
                      f"fps {fmt(r['frames_per_s'], '.1f')}", f"wait {fmt(None if wait is None else 100 * wait, '.0f')}%",
                      f"mem {r['peak_mem_bytes'] / 2**30:.2f}GiB"]
            eta = self._eta(r["step"], r["time"])
            parts += [f"eta {eta}"] if eta else []
            self.info(" ".join(parts))

    def _update_progress(self, step, epoch, stats: str) -> None:
        p = self._progress
        p.update(self._task_total, completed=step, stats=stats)
        if self.steps_per_epoch <= 0:
            return
        if epoch != self._epoch_shown:
            if self._task_epoch is not None:
                p.remove_task(self._task_epoch)
            self._task_epoch = p.add_task(f"epoch {epoch}", total=self.steps_per_epoch, stats="")
            self._epoch_shown = epoch
        p.update(self._task_epoch, completed=(step - 1) % self.steps_per_epoch + 1)

    def eval(self, step: int, split: str, metrics: dict, source: dict | None = None) -> None:
        # the figures only: the set sizes are the same at every evaluation (the summary has them once)
        of = f" of the {describe(source)}" if source else f" step {step}"
        if "frames_avsbench" in metrics:  # AVSS: some 40 figures; the line shows the headline ones
            from avs_dist.avss.evaluation import TERMINAL_KEYS

            metrics = {k: metrics[k] for k in TERMINAL_KEYS if k in metrics}
        self.info(f"eval {split}{of}: " + " ".join(f"{k} {fmt(v)}" for k, v in metrics.items()
                                                               if k not in EVAL_COUNTS))

    def images(self, step, grid) -> None:
        pass

    def finish(self, rows, final: dict, hparams: dict, last_step: int) -> None:
        self._stop_progress()
        self._print(self._table("run summary", rows))

    def _stop_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def close(self) -> None:
        self._stop_progress()
