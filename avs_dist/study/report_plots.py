"""The study report's pictures, readable without a legend (matplotlib, Agg backend):

- `plot_test_metrics`: one panel per figure (study/report.py METRICS); per arm a bar at the mean
  over its finished runs, an error bar of the sample std and every seed as a dot labelled
  "s<seed>" (the same colour and offset in every arm and panel, so a seed's pairs line up);
  under each arm its mean, std and runs finished / planned.
- `plot_val_curves`: per arm the mean val mIoU over its finished runs against the step, a band
  from the lowest to the highest seed, and the arm's name written at the end of its line.

Files are written whole or not at all (a temp name, then a rename).
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from avs_dist.plots import _pyplot
from avs_dist.study.report import LABELS, METRICS

ARM_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
               "tab:olive", "tab:cyan", "tab:gray")
SEED_COLOURS = ("#1b1b1b", "#c0392b", "#1f5fbf", "#1e8449", "#8e44ad", "#b9770e", "#117a65", "#7b241c")


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return path


def _seed_style(seeds: list) -> dict:
    """seed -> (colour, x offset within a bar): the same for a seed in every arm and panel."""
    seeds = sorted(set(seeds))
    # an even count of slots has none at the centre, where the error bar is drawn
    offsets = np.linspace(-0.28, 0.28, len(seeds) + len(seeds) % 2)
    return {s: (SEED_COLOURS[i % len(SEED_COLOURS)], float(offsets[i])) for i, s in enumerate(seeds)}


def _ylim(ax, points: list[float], signed: bool) -> None:
    """Zoom on the data (arms differ by little next to the bars' height), keeping 0 in view
    for a signed figure (the audio gap)."""
    if not points:
        return
    lo, hi = min(points + ([0.0] if signed else [])), max(points + ([0.0] if signed else []))
    span = max(hi - lo, 0.02)
    bottom = lo - 0.15 * span if signed else max(lo - 0.15 * span, -0.03 * span)  # mIoU / F: no room below 0
    ax.set_ylim(bottom, hi + 0.2 * span)


def _metric_panel(ax, arms: list[dict], key: str, style: dict) -> None:
    points, ticks = [], []
    for x, arm in enumerate(arms):
        s = arm["metrics"][key]
        colour = ARM_COLOURS[x % len(ARM_COLOURS)]
        if s["n"]:
            ax.bar(x, s["mean"], width=0.7, color=colour, alpha=0.3, edgecolor=colour)
            if s["std"] is not None:
                ax.errorbar(x, s["mean"], yerr=s["std"], color="black", capsize=6, linewidth=1.4)
                points += [s["mean"] - s["std"], s["mean"] + s["std"]]
        for seed, value in zip(s["seeds"], s["values"]):
            dot_colour, dx = style[seed]
            ax.plot(x + dx, value, "o", color=dot_colour, markersize=6, zorder=3)
            ax.annotate(f"s{seed}", (x + dx, value), xytext=(4, 0), textcoords="offset points", fontsize=7,
                        color=dot_colour, va="center")
            points.append(value)
        std = f" ± {s['std']:.3f}" if s["std"] is not None else ""
        mean = f"{s['mean']:.3f}{std}" if s["n"] else "no finished run"
        ticks.append(f"{arm['name']}\n{mean}\n{arm['finished']}/{arm['planned']} runs")
    ax.set_xticks(range(len(arms)), ticks, fontsize=8)
    ax.set_xlim(-0.6, len(arms) - 0.4)
    _ylim(ax, points, signed=key == "audio_gap")
    if key == "audio_gap":
        ax.axhline(0, color="black", linewidth=0.8)
    ax.set_title(LABELS[key], fontsize=11)
    ax.grid(axis="y", alpha=0.3)


def plot_test_metrics(summary: dict, path) -> Path | None:
    """PNG at `path`: a panel per METRICS figure (see the module docstring); None when no
    arm has a finished run."""
    arms = summary["arms"]
    if not any(a["finished"] for a in arms):
        return None
    plt = _pyplot()
    style = _seed_style([s for a in arms for m in a["metrics"].values() for s in m["seeds"]])
    cols = 3
    rows = -(-len(METRICS) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(11, cols * (1.0 * len(arms) + 1.0)), 4.2 * rows), dpi=100,
                             squeeze=False)
    for ax, (key, _) in zip(axes.flat, METRICS):
        _metric_panel(ax, arms, key, style)
    for ax in list(axes.flat)[len(METRICS):]:
        ax.axis("off")
    fig.suptitle(f"study {summary['study']}: bar = mean over finished runs, error bar = sample std, dot = one seed "
                 "(s<seed>)\ntest figures from each run's best val mIoU checkpoint", fontsize=11)
    fig.tight_layout()
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def _common_curve(curves: list[list[list[float]]]) -> tuple[np.ndarray, np.ndarray]:
    """(steps [S], values [runs, S]) at the steps every curve has."""
    steps = sorted(set.intersection(*(set(step for step, _ in c) for c in curves)))
    table = [dict((step, v) for step, v in c) for c in curves]
    return np.array(steps, dtype=float), np.array([[t[s] for s in steps] for t in table], dtype=float)


def _spread_labels(ends: list[tuple[float, str, str]], gap: float) -> list[tuple[float, str, str]]:
    """End-of-line labels moved apart to at least `gap` (data units), keeping their order."""
    placed = []
    for y, name, colour in sorted(ends):
        if placed and y - placed[-1][0] < gap:
            y = placed[-1][0] + gap
        placed.append((y, name, colour))
    return placed


def plot_val_curves(summary: dict, records: list[dict], path) -> Path | None:
    """PNG at `path`: per arm the mean val mIoU of its finished runs at the steps they all
    evaluated, with a min-to-max band over seeds and its name at the line's end; None when no
    finished run has a val evaluation."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=100)
    ends, last = [], 0.0
    for i, arm in enumerate(summary["arms"]):
        curves = [r["val_curve"] for r in records
                  if r["arm"] == arm["name"] and r["state"] == "finished" and r["val_curve"]]
        steps, values = _common_curve(curves) if curves else (np.array([]), None)
        if not steps.size:
            continue
        colour = ARM_COLOURS[i % len(ARM_COLOURS)]
        mean = values.mean(0)
        ax.plot(steps, mean, "-o", color=colour, markersize=3, linewidth=2)
        ax.fill_between(steps, values.min(0), values.max(0), color=colour, alpha=0.18, linewidth=0)
        ends.append((float(mean[-1]), f"{arm['name']} (n={len(curves)})", colour))
        last = max(last, float(steps[-1]))
    if not ends:
        plt.close(fig)
        return None
    low, high = ax.get_ylim()
    for y, name, colour in _spread_labels(ends, gap=0.04 * (high - low)):
        ax.annotate(name, (last, y), xytext=(8, 0), textcoords="offset points", color=colour, fontsize=10,
                    va="center", fontweight="bold")
    ax.set_xlim(right=last * 1.25 if last > 0 else 1.0)
    ax.set(xlabel="optimizer step", ylabel="val mIoU (batch-free, per frame)",
           title=f"study {summary['study']}: val mIoU per arm, mean over finished runs "
                 "(band: lowest to highest seed)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)
