"""The pictures avs-dist writes, made to be read on any content.

- `overlay(frame, mask)`: a mask drawn over its frame as a light tint plus an outline (a line in
  a colour picked to stand out from the pixels under it, edged in black or white), so a mask
  stays visible on an object of any colour, including the tint's own.
- `labelled_grid(rows, column_titles, row_titles)`: panels with a title over each column and
  a caption over each row (video, frame, class, score), enlarged to a readable size. Used by
  the TensorBoard strip (train/sinks.py overlay_grid), `avs-dist inspect --save-png`.
- `plot_run(run_dir)`: the loss curves and the val/test mIoU of a run as PNGs, from its
  metrics.jsonl and eval.jsonl (written at the end of every run; callable on any run folder,
  `avs-dist plot RUN_DIR`).
- `plot_audio_gap(per_class, path)`: the audio gap per class as a bar chart (`avs-dist eval`;
  S4 categories, or the AVSS object classes present).

Images are uint8 numpy arrays [H,W,3]; text is Pillow's default font (scalable with
Pillow >= 10.1); charts are matplotlib with the Agg backend (no display needed).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# Line colours to choose from: saturated, far apart, each readable with a black or white edge.
PALETTE = ((0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 255, 0), (255, 140, 0), (60, 110, 255), (255, 40, 40))
TINT_ALPHA = 0.3  # light enough to see the object through it
MIN_PANEL = 160  # px: panels are enlarged (nearest neighbour, whole factors) to at least this side
BACKGROUND = (24, 24, 24)
TEXT = (240, 240, 240)
FONT_PX = 13
# plot_losses: smooth lines longer than this, over about this many logged steps
SMOOTH_MIN_POINTS = 50
SMOOTH_SPAN = 20


def contrast_colour(pixels: np.ndarray) -> tuple[int, int, int]:
    """The PALETTE colour farthest from most of `pixels` [N,3] (uint8): the one whose 10th
    percentile RGB distance to them is largest."""
    if pixels.size == 0:
        return PALETTE[0]
    px = pixels.reshape(-1, 3).astype(np.float32)
    if len(px) > 4096:  # a spread-out sample is enough to rank seven colours
        px = px[:: len(px) // 4096]
    scores = [np.percentile(np.linalg.norm(px - np.array(c, np.float32), axis=1), 10) for c in PALETTE]
    return PALETTE[int(np.argmax(scores))]


def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.filter(ImageFilter.MaxFilter(2 * px + 1))) > 0


def overlay_style(frame: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] | None = None) -> dict | None:
    """What `overlay` draws for `mask` on `frame`: the two rings (bool [H,W]) and their colours;
    None for an empty mask. Reusable on the next frames while the mask stays the same (the
    overlay video holds each mask for many frames; its outline colour then does not flicker)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    ring1 = _dilate(mask, 1) & ~mask
    ring2 = _dilate(mask, 2) & ~mask & ~ring1
    if colour is None:
        colour = contrast_colour(np.asarray(frame)[..., :3][_dilate(mask, 2)])
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    edge = (0, 0, 0) if luminance > 110 else (255, 255, 255)
    return {"mask": mask, "ring1": ring1, "ring2": ring2, "colour": colour, "edge": edge}


def overlay(frame: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] | None = None,
            style: dict | None = None) -> np.ndarray:
    """uint8 [H,W,3] frame with bool [H,W] mask: a TINT_ALPHA tint inside, a 1-px line of
    `colour` just outside the mask (default: contrast_colour of the pixels around and under it)
    and a 1-px black or white edge outside that line. The pixels of the mask itself keep the
    object visible under the tint. An empty mask leaves the frame as it is. `style`: an
    `overlay_style` of the same mask to reuse (then `mask` and `colour` are not looked at)."""
    frame = np.ascontiguousarray(frame[..., :3], dtype=np.uint8)
    if style is None:
        style = overlay_style(frame, mask, colour)
    if style is None:
        return frame.copy()
    mask, colour = style["mask"], style["colour"]
    out = frame.copy()
    tinted = (1 - TINT_ALPHA) * out[mask].astype(np.float32) + TINT_ALPHA * np.array(colour, np.float32)
    out[mask] = tinted.round().clip(0, 255).astype(np.uint8)
    out[style["ring1"]] = colour
    out[style["ring2"]] = style["edge"]
    return out


def font(size: int = FONT_PX):
    """Pillow's default font at `size` px (a fixed bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _enlarge(panel: np.ndarray, side: int) -> np.ndarray:
    factor = max(1, math.ceil(side / max(panel.shape[:2])))
    if factor == 1:
        return panel
    return np.asarray(Image.fromarray(panel).resize((panel.shape[1] * factor, panel.shape[0] * factor),
                                                    Image.NEAREST))


def labelled_grid(rows: list[list[np.ndarray]], column_titles: list[str], row_titles: list[str],
                  min_panel: int = MIN_PANEL, pad: int = 4) -> np.ndarray:
    """uint8 [H,W,3]: a title band over the columns, then per row a caption band and its panels.

    rows: R lists of C uint8 [h,w,3] panels (the same size within a column); every panel is
    enlarged by a whole factor to a side of at least `min_panel`. ValueError when the titles
    do not match the rows and columns."""
    if not rows or any(len(r) != len(column_titles) for r in rows) or len(row_titles) != len(rows):
        raise ValueError(f"labelled_grid: {len(rows)} rows of {[len(r) for r in rows]} panels for "
                         f"{len(column_titles)} column titles and {len(row_titles)} row titles")
    rows = [[_enlarge(p, min_panel) for p in r] for r in rows]
    widths = [max(r[c].shape[1] for r in rows) for c in range(len(column_titles))]
    f = font()
    band = FONT_PX + 2 * pad
    width = sum(widths) + pad * (len(widths) + 1)
    height = band + sum(band + max(p.shape[0] for p in r) + pad for r in rows)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    x = pad
    for title, w in zip(column_titles, widths):
        draw.text((x + w // 2, pad), title, fill=TEXT, font=f, anchor="mt")
        x += w + pad
    y = band
    for caption, r in zip(row_titles, rows):
        draw.text((pad, y + pad), caption, fill=TEXT, font=f)
        y += band
        x = pad
        for panel, w in zip(r, widths):
            canvas.paste(Image.fromarray(panel), (x, y))
            x += w + pad
        y += max(p.shape[0] for p in r) + pad
    return np.asarray(canvas)


def frame_iou(gt: np.ndarray, pred: np.ndarray) -> float:
    """IoU of two bool masks; 1.0 when both are empty (AVSBench counts an empty ground truth
    as the background's IoU)."""
    union = np.logical_or(gt, pred).sum()
    return 1.0 if union == 0 else float(np.logical_and(gt, pred).sum() / union)


def prediction_grid(frames: np.ndarray, gt: np.ndarray, pred: np.ndarray, captions: list[str]) -> np.ndarray:
    """The strip of frame | ground truth | prediction, one row per frame, each row captioned
    with `captions[i]` and the frame's IoU. frames uint8 [N,H,W,3], gt / pred bool [N,H,W]."""
    rows, titles = [], []
    for frame, g, p, caption in zip(frames, gt, pred, captions):
        rows.append([frame, overlay(frame, g), overlay(frame, p)])
        empty = "  (empty prediction)" if not p.any() else ""
        titles.append(f"{caption}   IoU {frame_iou(g, p):.2f}{empty}".strip())
    return labelled_grid(rows, ["frame", "ground truth", "prediction"], titles)


# ---------------------------------------------------------------------------- charts
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash: the rest still plots
            continue
    return rows


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in pts], [v for _, v in pts]


def plot_losses(rows: list[dict], path: Path, title: str) -> Path | None:
    """Each loss term of metrics.jsonl against the optimizer step (log scale when all > 0).

    Per-step losses of small batches jump by 10x from step to step; five such lines on one
    axis hide each other. With more than SMOOTH_MIN_POINTS points each term is drawn faint as
    logged and bold smoothed by pandas' exponentially weighted mean (span SMOOTH_SPAN, bias
    corrected: TensorBoard's smoothing slider does the same)."""
    import pandas as pd

    from avs_dist.losses import TERMS

    keys = [k for k in ("total", *TERMS) if any(k in r for r in rows)]
    if not keys:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    positive, smoothed = True, False
    for i, key in enumerate(keys):
        steps, values = _series(rows, key)
        positive = positive and all(v > 0 for v in values)
        colour, width = f"C{i}", 2.2 if key == "total" else 1.4
        if len(values) > SMOOTH_MIN_POINTS:
            smoothed = True
            ax.plot(steps, values, color=colour, linewidth=0.6, alpha=0.25)
            values = pd.Series(values).ewm(span=SMOOTH_SPAN).mean().tolist()
        ax.plot(steps, values, color=colour, label=key, linewidth=width)
    if positive:
        ax.set_yscale("log")
    ax.set(xlabel="optimizer step", ylabel="loss (unweighted terms; total is weighted)",
           title=f"{title} (bold: smoothed, faint: each step)" if smoothed else title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")  # "best" scans every point: slow on a long run
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_eval(rows: list[dict], path: Path, title: str) -> Path | None:
    """val mIoU / F (and AVSBench mIoU) against the step; the test evaluations as points in
    the colour of the same metric's val line, labelled with the weights they scored. AVSS
    results add the object classes' mIoU (`miou_frame_objects`): their `miou` is the mean over
    all 71 classes, a few hundredths on a set of a few classes, where learning cannot be seen."""
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    styles = {"miou": ("-o", "*", 13), "miou_avsbench": ("--", "X", 9), "f": ("-s", "D", 7)}
    if any("miou_frame_objects" in r for r in rows):
        styles["miou_frame_objects"] = ("-^", "P", 11)
    for i, (key, (line, point, size)) in enumerate(styles.items()):
        steps, values = _series([r for r in rows if r.get("split") == "val"], key)
        if steps:
            ax.plot(steps, values, line, color=f"C{i}", markersize=3, label=f"val {key}")
        test = [r for r in rows if r.get("split") == "test"]
        steps, values = _series(test, key)
        if steps:
            kinds = sorted({r.get("source", {}).get("kind", "") for r in test} - {""})
            weights = f" ({', '.join(kinds)} model)" if kinds else ""
            ax.plot(steps, values, point, color=f"C{i}", markersize=size, markeredgecolor="black",
                    linestyle="none", label=f"test {key}{weights}")
    ax.set(xlabel="optimizer step", ylabel="score", title=title, ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")  # a few evaluations: cheap to place where no curve is
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_run(run_dir) -> list[Path]:
    """run_dir/plots/loss.png and run_dir/plots/eval.png from metrics.jsonl / eval.jsonl (those
    that have data); returns the paths written. FileNotFoundError when run_dir has neither file."""
    run_dir = Path(run_dir)
    metrics, evals = _read_jsonl(run_dir / "metrics.jsonl"), _read_jsonl(run_dir / "eval.jsonl")
    if not metrics and not evals:
        from avs_dist.errors import MissingFileError

        raise MissingFileError(f"{run_dir}: no metrics.jsonl or eval.jsonl to plot (not a run folder, or no step yet)")
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    name = run_dir.resolve().name
    written = [plot_losses(metrics, out / "loss.png", f"{name}: training loss"),
               plot_eval(evals, out / "eval.png", f"{name}: evaluation")]
    return [p for p in written if p is not None]


def plot_audio_gap(per_class: dict[str, float], path, title: str = "audio gap per class",
                   xlabel: str | None = None) -> Path:
    """A horizontal bar per class: mIoU with its own audio minus with another class's audio
    (S4: per category; AVSS: per object class present, avss/evaluation.py). `xlabel`: what
    the gap is (default: the S4 wording)."""
    plt = _pyplot()
    names = list(per_class)
    values = [per_class[n] if per_class[n] is not None else float("nan") for n in names]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.35 * max(len(names), 3)), dpi=100)
    ax.barh(names, values, color=["tab:blue" if v >= 0 else "tab:red" for v in values])
    for y, v in enumerate(values):
        label = f" {v:+.3f} " if math.isfinite(v) else " n/a (no partner) "
        v = v if math.isfinite(v) else 0.0
        ax.text(v, y, label, va="center", ha="left" if v >= 0 else "right", fontsize=8)
    finite = [v for v in values if math.isfinite(v)] + [0.0]
    span = max(max(finite) - min(finite), 0.05)
    ax.set_xlim(min(finite) - 0.2 * span, max(finite) + 0.2 * span)  # room for the value labels
    ax.axvline(0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set(xlabel=xlabel or "mIoU(own audio) - mIoU(another class's audio)", title=title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """`avs-dist plot RUN_DIR...`: write the curves of each run folder."""
    import argparse

    from avs_dist.helpformat import HelpFormatter

    p = argparse.ArgumentParser(prog="avs-dist plot", formatter_class=HelpFormatter,
                                description="write RUN_DIR/plots/loss.png and eval.png from the run's logs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    args = p.parse_args(argv)
    for run_dir in args.run_dirs:
        for path in plot_run(run_dir):
            print(f"wrote {path}")
    return 0
