"""A study's report, from its runs' own files: each arm's figures over its seeds, each arm
against the baseline paired by seed, and every run that did not finish, named with why.

What it reads (STUDY_DIR as `avs-dist study run` leaves it):

    plan.json                     {"study", "source", "baseline", "select", "seeds", "arms": [{"name",
                                  "preset", "overrides"}], "common", "runs": [{"arm", "seed", "run_dir"
                                  (relative to STUDY_DIR), "preset", "overrides"}]}
    <run_dir>/status.json         completed / stopped / failed ("reason"), "step", "total_steps"
    <run_dir>/selected_test.json  the test figures of the run's selected checkpoint (checkpoints/best,
                                  the best val mIoU) with their "source" (provenance.py)
    <run_dir>/final_metrics.json  "best_val_miou", "best_val_step"
    <run_dir>/eval.jsonl          the val mIoU curve (split "val", key "miou"; a step logged again
                                  after a resume: the later line)
    <run_dir>/study_error.txt     the one-line error of a run the study could not train or evaluate
    <run_dir>/config.json         the resolved config (the TensorBoard hparams, report_tb.py)

A run is "finished" (completed and its selected checkpoint evaluated on test), "trained"
(completed, test evaluation missing), "failed", "stopped" or "not started"; only finished runs
enter the figures, and every other run is listed with its state and error. What it writes
(`write_report`): report.md, report.json, runs.csv, plots/test_metrics.png, plots/val_miou.png
and each finished run's TensorBoard hparams (report_tb.py).

Figures are floats in [0, 1] (the audio gap in [-1, 1]); a figure a run lacks is None.
"""
from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from avs_dist.fileio import read_json_dict, write_json, write_text_atomic
from avs_dist.provenance import describe
from avs_dist.study.plan import read_plan
from avs_dist.study.state import SELECTED_FILE, run_state

# (key, words): the selected checkpoint's test figures, then the run's best val mIoU
TEST_METRICS = (("miou_avsbench", "test mIoU (AVSBench)"), ("f_avsbench", "test F (AVSBench)"),
                ("miou", "test mIoU (batch-free)"), ("f", "test F (batch-free)"),
                ("audio_gap", "test audio gap"))
METRICS = TEST_METRICS + (("best_val_miou", "best val mIoU"),)
LABELS = dict(METRICS)
CONFIDENCE = 0.95
SOURCE_WORDS = ("test figures: the best val mIoU checkpoint of each run (checkpoints/best), evaluated on test "
                "by the study; best val mIoU: the highest val mIoU over the run's evaluations")
STATE_ORDER = ("finished", "trained", "stopped", "failed", "not started")


# ---------------------------------------------------------------------------- reading
def _number(value) -> float | None:
    """A finite figure as float, else None (null, NaN, a string, a bool)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def val_curve(run_dir) -> list[list[float]]:
    """[[step, val miou], ...] by step from run_dir/eval.jsonl; a step logged twice (a resumed
    run repeats steps after its checkpoint) keeps its later line; cut or bad lines are skipped."""
    path = Path(run_dir) / "eval.jsonl"
    points = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a line cut by a crash
            continue
        if (isinstance(row, dict) and row.get("split") == "val" and isinstance(row.get("step"), int)
                and _number(row.get("miou")) is not None):
            points[row["step"]] = float(row["miou"])
    return [[step, points[step]] for step in sorted(points)]


def state_words(rec: dict) -> str:
    """The state of a run record in words, with what to do about it."""
    state, step, total = rec["state"], rec.get("step"), rec.get("total_steps")
    at = f" at step {step} of {total}" if step is not None else ""
    if state == "finished":
        return f"finished{at}"
    if state == "trained":
        return (f"trained{at}, but {rec.get('error') or 'its selected checkpoint is not evaluated on test'}; "
                "`avs-dist study run` evaluates it")
    if state == "failed":
        return f"failed{at}: {rec.get('error')}"
    if state == "stopped":
        why = at if step is not None else " (no status.json: still running, or killed)"
        return f"stopped{why}; `avs-dist study run` resumes it"
    return "not started"


def _record(study_dir: Path, run: dict) -> dict:
    folder = study_dir / run["run_dir"]
    rec = {"arm": run["arm"], "seed": run["seed"], "run_dir": run["run_dir"], **run_state(folder),
           "figures": {key: None for key, _ in METRICS}, "best_val_step": None, "test_source": None,
           "val_curve": val_curve(folder)}
    if rec["state"] == "finished":
        selected, final = read_json_dict(folder / SELECTED_FILE), read_json_dict(folder / "final_metrics.json")
        if not selected:
            rec.update(state="trained", error=f"{SELECTED_FILE} is unreadable")
        else:
            rec["figures"].update({key: _number(selected.get(key)) for key, _ in TEST_METRICS})
            rec["figures"]["best_val_miou"] = _number(final.get("best_val_miou"))
            rec.update(best_val_step=final.get("best_val_step"), test_source=selected.get("source"))
    rec["test_source_words"] = describe(rec["test_source"]) if rec["state"] == "finished" else None
    rec["words"] = state_words(rec)
    return rec


def collect(study_dir) -> list[dict]:
    """One record per planned run, in plan order: {"arm", "seed", "run_dir", "state", "error",
    "step", "total_steps", "figures": {metric: float | None} (METRICS; finished runs only),
    "best_val_step", "test_source" (provenance record), "test_source_words", "val_curve"
    [[step, miou], ...], "words" (the state in words)}. Errors: see read_plan."""
    study_dir = Path(study_dir).resolve()
    return [_record(study_dir, run) for run in read_plan(study_dir)["runs"]]


# ---------------------------------------------------------------------------- statistics
def describe_values(values) -> dict:
    """{"n", "mean", "std" (sample, ddof=1; None for n < 2), "min", "max"} of a list of floats
    (all None but n when it is empty)."""
    a = np.asarray(list(values), dtype=float)
    n = int(a.size)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": n, "mean": float(a.mean()), "std": float(a.std(ddof=1)) if n >= 2 else None,
            "min": float(a.min()), "max": float(a.max())}


def paired_comparison(arm: dict, base: dict) -> dict:
    """arm - baseline over the seeds both have: `arm` and `base` map seed -> figure. Returns
    {"seeds", "n", "mean_diff", "std_diff", "ci_low", "ci_high", "pvalue", "statistic",
    "distinguishable" (bool, None when untestable), "words"}; the t statistic, p-value and
    CONFIDENCE interval are scipy.stats.ttest_rel(arm, base)'s. n < 2, or differences that are
    all equal (no spread: the t-test divides by zero), give no p-value or interval and say why."""
    from scipy import stats

    seeds = sorted(set(arm) & set(base))
    n = len(seeds)
    out = {"seeds": seeds, "n": n, "mean_diff": None, "std_diff": None, "ci_low": None, "ci_high": None,
           "pvalue": None, "statistic": None, "distinguishable": None}
    if n < 2:
        return {**out, "words": f"needs 2+ paired seeds (finished in both arms; {n} now)"}
    a, b = np.array([arm[s] for s in seeds]), np.array([base[s] for s in seeds])
    diffs = a - b
    out.update(mean_diff=float(diffs.mean()), std_diff=float(diffs.std(ddof=1)))
    if np.ptp(diffs) <= 1e-12 * max(1.0, float(np.abs(diffs).max())):
        same = ("the two arms give the same figure at every paired seed" if out["mean_diff"] == 0
                else f"all {n} paired differences are {out['mean_diff']:+.4f}")
        return {**out, "words": f"{same}: no seed-to-seed spread, so the t-test is undefined (no p-value or interval)"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # near-equal differences: scipy's precision note
        result = stats.ttest_rel(a, b)
        ci = result.confidence_interval(CONFIDENCE)
    out.update(statistic=float(result.statistic), pvalue=float(result.pvalue),
               ci_low=float(ci.low), ci_high=float(ci.high), distinguishable=bool(ci.low > 0 or ci.high < 0))
    return {**out, "words": _verdict(out)}


def _verdict(c: dict) -> str:
    n, d, lo, hi = c["n"], c["mean_diff"], c["ci_low"], c["ci_high"]
    interval = f"{CONFIDENCE:.0%} CI [{lo:+.4f}, {hi:+.4f}]"
    if c["distinguishable"]:
        words = f"distinguishable from seed noise at n={n} (p={c['pvalue']:.3g}, {interval} excludes 0)"
    else:
        words = f"not distinguishable from seed noise at n={n} ({interval} includes 0, p={c['pvalue']:.3g})"
    half = (hi - lo) / 2
    if d != 0:
        words += f"; the interval's half-width {half:.4f} is {half / abs(d):.1f}x the difference {d:+.4f}"
    return words


def _arm_summary(arm: dict, recs: list[dict]) -> dict:
    finished = [r for r in recs if r["state"] == "finished"]
    metrics = {}
    for key, _ in METRICS:
        pairs = [(r["seed"], r["figures"][key]) for r in finished if r["figures"][key] is not None]
        metrics[key] = {**describe_values(v for _, v in pairs), "seeds": [s for s, _ in pairs],
                        "values": [v for _, v in pairs]}
    states = Counter(r["state"] for r in recs)
    return {"name": arm["name"], "preset": arm.get("preset"), "overrides": list(arm.get("overrides", [])),
            "description": arm.get("description"), "planned": len(recs), "finished": len(finished),
            "states": {s: states[s] for s in STATE_ORDER if states[s]},
            "not_finished": [f"seed {r['seed']}: {r['words']}" for r in recs if r["state"] != "finished"],
            "metrics": metrics}


def _source_notes(records: list[dict]) -> list[str]:
    """Finished runs whose test figures do not come from checkpoints/best at the best val step."""
    notes = []
    for r in records:
        src = r["test_source"] or {}
        if r["state"] != "finished":
            continue
        if src.get("kind") != "best":
            notes.append(f"{r['arm']} seed {r['seed']}: test figures from the {describe(src)}, not checkpoints/best")
        elif r["best_val_step"] is not None and src.get("step") != r["best_val_step"]:
            notes.append(f"{r['arm']} seed {r['seed']}: test figures from step {src.get('step')}, but "
                         f"final_metrics.json has the best val mIoU at step {r['best_val_step']}")
    return notes


def summarize(records: list[dict], plan: dict) -> dict:
    """The report as data: {"study", "source", "baseline", "seeds", "planned", "finished",
    "arms": [per arm: "name", "preset", "overrides", "planned", "finished", "states",
    "not_finished" (words per run), "metrics": {metric: describe_values + "seeds", "values"}],
    "comparisons": [per non-baseline arm and metric: "arm", "baseline", "metric" +
    paired_comparison], "runs": records without their val curves, "sources", "notes"}."""
    base = plan["baseline"]
    position = {arm["name"]: i for i, arm in enumerate(plan["arms"])}

    def order(r: dict) -> tuple:  # the runs listed by arm, then seed
        return position.get(r["arm"], len(position)), r["seed"]

    arms = [_arm_summary(arm, [r for r in records if r["arm"] == arm["name"]]) for arm in plan["arms"]]
    by_name = {a["name"]: a for a in arms}
    comparisons = []
    for arm in arms:
        if arm["name"] == base or base not in by_name:
            continue
        for key, _ in METRICS:
            mine, theirs = arm["metrics"][key], by_name[base]["metrics"][key]
            comparisons.append({"arm": arm["name"], "baseline": base, "metric": key,
                                **paired_comparison(dict(zip(mine["seeds"], mine["values"])),
                                                    dict(zip(theirs["seeds"], theirs["values"])))})
    notes = [] if base in by_name else [f"the baseline arm {base!r} is not among the plan's arms: no comparison"]
    return {"study": plan.get("study"), "source": plan.get("source"), "baseline": base, "select": plan.get("select"),
            "seeds": plan.get("seeds"), "planned": len(records),
            "finished": sum(r["state"] == "finished" for r in records), "arms": arms, "comparisons": comparisons,
            "runs": [{k: v for k, v in r.items() if k != "val_curve"} for r in sorted(records, key=order)],
            "sources": SOURCE_WORDS, "notes": notes + _source_notes(records)}


# ---------------------------------------------------------------------------- words
def _fig(value, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if sign else f"{value:.4f}"


def cell(stats: dict, sign: bool = False) -> str:
    """"0.7012 ± 0.0123 (n=3, 0.6900-0.7100)"; "-" when no run has the figure."""
    if not stats["n"]:
        return "- (n=0)"
    std = f" ± {stats['std']:.4f}" if stats["std"] is not None else ""
    return f"{_fig(stats['mean'], sign)}{std} (n={stats['n']}, {_fig(stats['min'], sign)} to {_fig(stats['max'], sign)})"


def _arm_setting(arm: dict) -> str:
    return f"`{arm['preset']}`" + "".join(f" `{o}`" for o in arm["overrides"])


def _comparison_lines(comparisons: list[dict]) -> list[str]:
    """Terminal lines: per arm the seeds paired, then one line per figure."""
    lines, width = [], max(len(label) for _, label in METRICS)
    for arm in dict.fromkeys(c["arm"] for c in comparisons):
        rows = [c for c in comparisons if c["arm"] == arm]
        seeds = sorted({s for c in rows for s in c["seeds"]})
        lines.append(f"  {arm} - {rows[0]['baseline']} (seeds finished in both: {', '.join(map(str, seeds)) or 'none'})")
        lines += [f"    {LABELS[c['metric']]:{width}} {_fig(c['mean_diff'], True):>8}  {c['words']}" for c in rows]
    return lines


def format_markdown(summary: dict) -> str:
    """report.md: the study, where the figures come from, a table of the arms (mean ± sample
    std, n, min to max per figure), the paired comparisons, every run with its state, the files."""
    lines = [f"# Study `{summary['study']}`: report", "",
             f"- **Study folder:** `{summary.get('study_dir', '.')}` (plan.json; study file `{summary.get('source')}`)",
             f"- **Runs finished / planned:** {summary['finished']} / {summary['planned']}; seeds "
             f"{', '.join(map(str, summary.get('seeds') or []))}; baseline `{summary['baseline']}`",
             f"- **Where the figures come from:** {summary['sources']}. Each cell: mean ± sample std "
             "(n finished runs, min to max). Runs that did not finish are listed below and enter no figure.",
             f"- **TensorBoard:** `{tensorboard_command(summary)}` (HParams tab: one session per finished run, "
             "`runs/<arm>/seed<seed>/tb/study`)", ""]
    lines += [f"- **Note:** {note}" for note in summary["notes"]] + ([""] if summary["notes"] else [])
    head = ["arm", "setting", "finished / planned", *(LABELS[k] for k, _ in METRICS)]
    lines += ["## Arms", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in summary["arms"]:
        cells = [cell(arm["metrics"][k], sign=k == "audio_gap") for k, _ in METRICS]
        lines.append(f"| {arm['name']} | {_arm_setting(arm)} | {arm['finished']} / {arm['planned']} | "
                     + " | ".join(cells) + " |")
    lines += ["", f"## Against the baseline `{summary['baseline']}`, paired by seed", "",
              f"Mean difference (arm - baseline), {CONFIDENCE:.0%} confidence interval and p-value of a paired "
              "t-test (scipy.stats.ttest_rel) over the seeds finished in both arms.", ""]
    lines += _md_comparisons(summary["comparisons"]) or ["No other arm."]
    lines += ["", "## Runs", "", "| arm | seed | state | " + " | ".join(LABELS[k] for k, _ in METRICS)
              + " | test figures from | folder |", "|" + "---|" * (len(METRICS) + 5)]
    for r in summary["runs"]:
        figs = " | ".join(_fig(r["figures"][k], k == "audio_gap") for k, _ in METRICS)
        lines.append(f"| {r['arm']} | {r['seed']} | {r['words']} | {figs} | {r['test_source_words'] or '-'} "
                     f"| `{r['run_dir']}` |")
    lines += ["", "## Files", ""] + [f"- `{name}`" for name in summary.get("files", {})]
    for name, caption in (("plots/test_metrics.png", "test figures per arm"), ("plots/val_miou.png", "val mIoU per arm")):
        if name in summary.get("files", {}):
            lines += ["", f"![{caption}]({name})"]
    return "\n".join(lines) + "\n"


def _md_comparisons(comparisons: list[dict]) -> list[str]:
    """Per arm: the seeds paired, then a row per figure (difference, interval, p, in words)."""
    lines = []
    for arm in dict.fromkeys(c["arm"] for c in comparisons):
        rows = [c for c in comparisons if c["arm"] == arm]
        seeds = sorted({s for c in rows for s in c["seeds"]})
        lines += [f"### {arm} - {rows[0]['baseline']} (seeds finished in both: {', '.join(map(str, seeds)) or 'none'})",
                  "", f"| figure | mean difference | {CONFIDENCE:.0%} CI | p | n | in words |", "|---|---|---|---|---|---|"]
        for c in rows:
            ci = f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]" if c["ci_low"] is not None else "-"
            p = f"{c['pvalue']:.3g}" if c["pvalue"] is not None else "-"
            lines.append(f"| {LABELS[c['metric']]} | {_fig(c['mean_diff'], True)} | {ci} | {p} | {c['n']} | {c['words']} |")
        lines.append("")
    return lines


def tensorboard_command(summary: dict) -> str:
    return f"tensorboard --logdir {summary.get('study_dir', '.')}"


def format_text(summary: dict) -> str:
    """The terminal report: per arm a table of its figures, the comparisons with the
    baseline, the runs that did not finish, the files written and the TensorBoard command."""
    lines = [f"study {summary['study']}: {summary['finished']} / {summary['planned']} runs finished; "
             f"{summary['sources']}"]
    width = max(len(label) for _, label in METRICS)
    for arm in summary["arms"]:
        lines += ["", f"{arm['name']} ({_arm_setting(arm).replace('`', '')}): {arm['finished']} / {arm['planned']} "
                      "runs finished",
                  f"  {'':{width}}  {'mean':>8} {'std':>8} {'n':>3} {'min':>8} {'max':>8}"]
        for key, label in METRICS:
            s, sign = arm["metrics"][key], key == "audio_gap"
            lines.append(f"  {label:{width}}  {_fig(s['mean'], sign):>8} {_fig(s['std']):>8} {s['n']:>3} "
                         f"{_fig(s['min'], sign):>8} {_fig(s['max'], sign):>8}")
        lines += [f"  not finished: {words}" for words in arm["not_finished"]]
    if summary["comparisons"]:
        lines += ["", f"against {summary['baseline']}, paired by seed (scipy.stats.ttest_rel):"]
        lines += _comparison_lines(summary["comparisons"])
    lines += [f"note: {note}" for note in summary["notes"]]
    if summary.get("files"):
        lines += ["", "wrote " + ", ".join(str(p) for p in summary["files"].values())]
    lines.append(tensorboard_command(summary))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- files
CSV_COLUMNS = ("arm", "seed", "state", "details", "error", "step", "total_steps", *(k for k, _ in METRICS),
               "best_val_step", "test_source", "run_dir")


def runs_csv(summary: dict) -> str:
    """runs.csv: one row per planned run (not finished ones too, with their state and error);
    figures as plain decimals, empty when the run has none."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in summary["runs"]:
        row = {k: r.get(k) for k in CSV_COLUMNS}
        row.update(r["figures"], details=r["words"], test_source=r["test_source_words"])
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


def write_report(study_dir) -> dict:
    """Write STUDY_DIR/report.md, report.json, runs.csv, plots/test_metrics.png,
    plots/val_miou.png and each finished run's TensorBoard hparams (<run_dir>/tb/study,
    replaced on every call), each file whole or not at all. Returns the summary (summarize)
    with "study_dir" and "files" {name: absolute path} added; format_text prints it.
    Errors: read_plan's for a folder without a readable plan.json."""
    from avs_dist.study.report_plots import plot_test_metrics, plot_val_curves
    from avs_dist.study.report_tb import write_hparams

    study_dir = Path(study_dir).resolve()
    plan = read_plan(study_dir)
    records = [_record(study_dir, run) for run in plan["runs"]]
    summary = summarize(records, plan)
    summary["study_dir"] = str(study_dir)
    files = {"report.md": study_dir / "report.md", "report.json": study_dir / "report.json",
             "runs.csv": study_dir / "runs.csv"}
    for name, path in (("plots/test_metrics.png", plot_test_metrics(summary, study_dir / "plots" / "test_metrics.png")),
                       ("plots/val_miou.png", plot_val_curves(summary, records, study_dir / "plots" / "val_miou.png"))):
        if path is not None:
            files[name] = path
        else:  # nothing to draw now: a picture from an earlier report would show what is no longer so
            (study_dir / name).unlink(missing_ok=True)
    summary["tensorboard"] = write_hparams(study_dir, plan, records)
    summary["files"] = {name: str(path) for name, path in files.items()}
    write_text_atomic(files["runs.csv"], runs_csv(summary))
    write_json(files["report.json"], summary)
    write_text_atomic(files["report.md"], format_markdown(summary))
    return summary
