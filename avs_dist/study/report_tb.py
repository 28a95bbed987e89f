"""A study in TensorBoard's HParams tab: `tensorboard --logdir STUDY_DIR`.

Each finished run gets one session in <run_dir>/tb/study: its hparams (`arm`, `seed`, `preset`
and every key that the study's common overrides or any arm overrides, minus the keys the
study sets itself (data.shards; train.seed is `seed`), each read from the run's config.json,
so every run of a study has the same keys) with its final figures (`study/test_<metric>`,
`study/best_val_miou`). The tab groups and compares runs by arm and seed.

TensorBoard takes the tab's columns from the first experiment record it finds, and every
training writes one of its own (tb/hparams: its whole config). So the report also writes the
study's experiment record at the top of the study folder (an event file named
`*.study_report`, the first run TensorBoard reads), which makes the study's keys the columns.
Rewriting the report replaces both (tb/study is deleted first), so no session appears twice.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from avs_dist.fileio import read_json_dict
from avs_dist.study.report import TEST_METRICS

STUDY_TB = Path("tb") / "study"
EVENT_SUFFIX = ".study_report"
NOT_HPARAMS = ("data.shards", "train.seed")  # the same in every run, or `seed` under another name


def hparam_keys(plan: dict) -> list[str]:
    """The sorted config keys any arm, the common list or a run overrides, minus NOT_HPARAMS."""
    overrides = list(plan.get("common", []))
    overrides += [o for arm in plan["arms"] for o in arm.get("overrides", [])]
    overrides += [o for run in plan["runs"] for o in run.get("overrides", [])]
    keys = {o.split("=", 1)[0].strip() for o in overrides if "=" in o}
    return sorted(k for k in keys if k and k not in NOT_HPARAMS)


def run_hparams(rec: dict, preset: str | None, config: dict, keys: list[str]) -> dict:
    """{"arm", "seed", "preset", key: the run's config.json value} as TensorBoard takes them
    (bool, int, float, str: lists as JSON, a missing key as "none")."""
    from avs_dist.train.sinks import flatten, hparam_value

    flat = flatten(config)
    hp = {"arm": rec["arm"], "seed": rec["seed"], "preset": preset or "none"}
    hp.update({key: hparam_value(flat.get(key)) for key in keys})
    return hp


def run_metrics(rec: dict) -> dict:
    """{"study/test_<metric>": value, "study/best_val_miou": value} of the figures the run has."""
    metrics = {f"study/test_{key}": rec["figures"][key] for key, _ in TEST_METRICS}
    metrics["study/best_val_miou"] = rec["figures"]["best_val_miou"]
    return {k: v for k, v in metrics.items() if v is not None}


def _write_experiment(study_dir: Path, hp: dict, metric_names: list[str]) -> None:
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    experiment, _, _ = hparams(hp, {name: 0.0 for name in metric_names})
    with SummaryWriter(log_dir=str(study_dir), filename_suffix=EVENT_SUFFIX) as writer:
        writer.file_writer.add_summary(experiment)


def write_hparams(study_dir, plan: dict, records: list[dict]) -> dict:
    """One HParams session per finished run in <run_dir>/tb/study (replacing what a previous
    report wrote; other runs' tb/study is removed) and the study's experiment record. Returns
    {"command": "tensorboard --logdir STUDY_DIR", "sessions": [run_dir/tb/study, ...],
    "hparams": [key, ...], "metrics": [tag, ...]}."""
    from torch.utils.tensorboard import SummaryWriter

    study_dir = Path(study_dir).resolve()
    keys = hparam_keys(plan)
    presets = {a["name"]: a.get("preset") for a in plan["arms"]}
    sessions, metric_names, example = [], set(), None
    for old in study_dir.glob(f"events.out.tfevents.*{EVENT_SUFFIX}"):  # the experiment record of a previous report
        old.unlink()
    for rec in records:
        folder = study_dir / rec["run_dir"] / STUDY_TB
        shutil.rmtree(folder, ignore_errors=True)
        if rec["state"] != "finished":
            continue
        hp = run_hparams(rec, presets.get(rec["arm"]), read_json_dict(study_dir / rec["run_dir"] / "config.json"), keys)
        metrics = run_metrics(rec)
        # log_dir is the session folder and run_name "." keeps add_hparams's writer in it:
        # a run_name below another folder would leave an empty event file there on every rewrite
        with SummaryWriter(log_dir=str(folder)) as writer:
            writer.add_hparams(hp, metrics, run_name=".", global_step=rec["step"])
        sessions.append(str(Path(rec["run_dir"]) / STUDY_TB))
        metric_names.update(metrics)
        example = example or hp
    if example is not None:
        _write_experiment(study_dir, example, sorted(metric_names))
    return {"command": f"tensorboard --logdir {study_dir}", "sessions": sessions,
            "hparams": ["arm", "seed", "preset", *keys], "metrics": sorted(metric_names)}
