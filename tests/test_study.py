"""`avs-dist study`: study files and plans (checked before anything starts), and real studies of
`tiny` runs: on this machine (stopped by a signal mid-study and continued by the same command,
one arm failing), and as one Slurm job array. The report's statistics are tested on their own
in test_study_report.py; here its figures are checked against each run's own files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from procs import run_session

from avs_dist.study import plan as study_plan
from avs_dist.study.plan import run_dir
from avs_dist.study.state import run_state

# Three steps, one val evaluation (the best checkpoint) at the last; every step logged, so the
# test can stop a study once a run has begun.
STEPS = ["train.max_steps=3", "train.eval_every_steps=3", "train.eval_every_epochs=0", "train.ckpt_every_steps=1000",
         "train.log_every_steps=1", "train.image_every_steps=0", "train.audio_gap_eval=false", "data.num_workers=0",
         "data.batch_videos=2"]
NO_CROP = ["model.crop_branch=false", "loss.crop_ce=false", "loss.crop_pair=false", "loss.crop_audio=false"]


def _toml_list(items) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def write_study(path: Path, arms: dict[str, list[str]], seeds=(1, 2), baseline="a", extra: str = "") -> Path:
    text = f'name = "t"\nbaseline = "{baseline}"\nseeds = {list(seeds)}\ncommon = {_toml_list(STEPS)}\n{extra}'
    for name, overrides in arms.items():
        text += f'\n[[arms]]\nname = "{name}"\npreset = "tiny"\noverrides = {_toml_list(overrides)}\n'
    path.write_text(text)
    return path


def study_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "avs_dist.cli", "study", *args]


# ----------------------------------------------------------------------------- files and plans
@pytest.mark.parametrize("name", study_plan.study_names())
def test_shipped_studies_plan_and_check(name, s4_shards):
    study = study_plan.load_study(name)
    plan = study_plan.make_plan(study, s4_shards)
    assert len(plan["runs"]) == len(study["arms"]) * len(study["seeds"])
    assert plan["baseline"] == study["arms"][0]["name"]
    # seed-major: a study cut short has whole pairs; each run's seed is its train.seed
    assert [r["seed"] for r in plan["runs"][:len(study["arms"])]] == [study["seeds"][0]] * len(study["arms"])
    assert all(r["overrides"][-1] == f"train.seed={r['seed']}" for r in plan["runs"])
    assert len({r["run_dir"] for r in plan["runs"]}) == len(plan["runs"])


def test_seed_ablation_arms_are_the_seed_losses_one_at_a_time():
    from avs_dist.config import load_config

    study = study_plan.load_study("seed_ablation")
    terms = {}
    for arm in study["arms"]:
        cfg = load_config(arm["preset"], arm["overrides"])
        terms[arm["name"]] = (cfg.model.crop_branch, cfg.loss.crop_ce, cfg.loss.crop_pair, cfg.loss.crop_audio)
    assert terms == {"avsbench": (False, False, False, False), "crop_ce": (True, True, False, False),
                     "crop_pair": (True, False, True, False), "crop_audio": (True, False, False, True),
                     "all_three": (True, True, True, True)}


@pytest.mark.parametrize("edit, message", [
    ('nope = 1\n', "unknown key(s) ['nope']"),
    ('select = "last"\n', "select = 'last': the one selection available is 'best val miou'"),
])
def test_bad_study_files_are_one_line_errors(tmp_path, s4_shards, edit, message):
    path = write_study(tmp_path / "s.toml", {"a": NO_CROP, "b": []}, extra=edit)
    rc, out = run_session(study_cmd("run", str(path), "--shards", str(s4_shards), "--out", str(tmp_path / "o")), 120)
    assert rc == 2 and "Traceback" not in out, out
    assert f"avs-dist study run: error: {path.resolve()}: {message}" in out, out
    assert not (tmp_path / "o").exists()  # nothing made before the checks pass


def test_study_checks(tmp_path, s4_shards):
    bad = [({"a": []}, "needs at least two [[arms]]"),
           ({"a": [], "a ": []}, "arms[1].name must be letters"),
           ({"a": ["train.seed=3"], "b": []}, "arm a: ['train.seed=3']: the study sets train.seed"),
           ({"x": [], "b": []}, "baseline = 'a' is not an arm")]
    for i, (arms, message) in enumerate(bad):
        path = write_study(tmp_path / f"s{i}.toml", arms)
        with pytest.raises(study_plan.StudyError, match=message.replace("[", r"\[").replace("]", r"\]")):
            study_plan.load_study(str(path))
    # an arm's config is checked like `train` checks one, naming the arm
    path = write_study(tmp_path / "k.toml", {"a": [], "b": ["optim.nope=1"]})
    from avs_dist.config import ConfigError

    with pytest.raises(ConfigError, match="study t, arm b: .*optim.nope"):
        study_plan.make_plan(study_plan.load_study(str(path)), s4_shards)


def test_a_folder_of_another_plan_is_refused(tmp_path, s4_shards):
    study = study_plan.load_study(str(write_study(tmp_path / "s.toml", {"a": NO_CROP, "b": []})))
    plan = study_plan.make_plan(study, s4_shards)
    study_plan.save_plan(tmp_path / "o", plan)
    study_plan.save_plan(tmp_path / "o", study_plan.make_plan(study, s4_shards))  # the same plan: continues
    other = study_plan.make_plan(study, s4_shards, ["optim.lr=1e-3"], seeds=[1])
    with pytest.raises(study_plan.StudyError, match="holds another plan .*differs in seeds, common, runs"):
        study_plan.save_plan(tmp_path / "o", other)


# ----------------------------------------------------------------------------- real studies
def _nan_weights(path: Path) -> Path:
    from avs_dist.config import load_config
    from avs_dist.models import build_model

    torch.manual_seed(0)
    state = build_model(load_config("tiny").model).state_dict()
    state["avs.resnet.conv1.weight"].view(-1)[0] = float("nan")
    torch.save(state, path)
    return path


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if path.is_file() and path.read_text().strip():
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"{path} not written within {timeout} s")


@pytest.mark.slow
def test_local_study_stops_continues_reports_and_shows_a_failed_arm(tmp_path, s4_shards):
    """2 seeds x 3 arms: a (baseline, no crop branch), b (tiny), nan (starts from weights with a
    NaN: fails at its first step). SIGTERM mid-study stops the running training with a
    checkpoint; the same command resumes it and runs the rest; the report's figures are each
    run's own; the failed arm is shown with its error, not averaged."""
    init = _nan_weights(tmp_path / "nan.pt")
    path = write_study(tmp_path / "s.toml", {"a": NO_CROP, "b": [],
                                             "nan": [f"model.init_from={init}", "train.max_nonfinite_steps=0"]})
    out = tmp_path / "study"
    cmd = study_cmd("run", str(path), "--shards", str(s4_shards), "--out", str(out))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    _wait_for(out / "runs" / "a" / "seed1" / "metrics.jsonl", proc, 300)
    proc.send_signal(signal.SIGTERM)
    first = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and "study stopped (SIGTERM): the same command continues it" in first, first
    status = json.loads((out / "runs" / "a" / "seed1" / "status.json").read_text())
    assert status["status"] == "stopped" and status["step"] < 3, first
    assert not (out / "runs" / "b").exists()  # no run started after the stop

    rc, second = run_session(cmd, 900)
    assert rc == 1, second  # an arm failed
    assert "[1/6] a seed 1: resuming" in second and "[1/6] a seed 1: finished" in second, second
    assert "nan seed 1: failed: step 1: non-finite" in second, second
    plan = json.loads((out / "plan.json").read_text())
    states = {(r["arm"], r["seed"]): run_state(run_dir(out, r)) for r in plan["runs"]}
    assert {k: s["state"] for k, s in states.items()} == {
        ("a", 1): "finished", ("b", 1): "finished", ("nan", 1): "failed",
        ("a", 2): "finished", ("b", 2): "finished", ("nan", 2): "failed"}
    _check_report(out, plan)

    rc, third = run_session(cmd, 300)  # nothing left to train: reported, not redone
    assert rc == 1 and third.count("finished earlier") == 4 and third.count("failed earlier") == 2, third
    assert "resuming" not in third and "training (log" not in third
    rc, refused = run_session(cmd + ["--seeds", "1"], 120)
    assert rc == 2 and "holds another plan (it differs in seeds, runs)" in refused, refused


def _check_report(out: Path, plan: dict) -> None:
    """report.json's per-arm figures are the mean of each run's own selected_test.json /
    final_metrics.json; failed runs are listed with their error and kept out of the means."""
    import numpy as np

    report = json.loads((out / "report.json").read_text())
    arms = {a["name"]: a for a in report["arms"]}
    for arm in ("a", "b"):
        runs = [r for r in plan["runs"] if r["arm"] == arm]
        tests = [json.loads((out / r["run_dir"] / "selected_test.json").read_text()) for r in runs]
        finals = [json.loads((out / r["run_dir"] / "final_metrics.json").read_text()) for r in runs]
        stats = arms[arm]
        assert (stats["finished"], stats["planned"]) == (2, 2)
        assert stats["metrics"]["miou"]["mean"] == pytest.approx(np.mean([t["miou"] for t in tests]), abs=1e-12)
        assert stats["metrics"]["best_val_miou"]["mean"] == pytest.approx(
            np.mean([f["best_val_miou"] for f in finals]), abs=1e-12)
        assert all(t["source"]["kind"] == "best" for t in tests)
    assert (arms["nan"]["finished"], arms["nan"]["planned"]) == (0, 2)
    failed = [r for r in report["runs"] if r["arm"] == "nan"]
    assert all(r["state"] == "failed" and "non-finite" in r["error"] for r in failed), failed
    rows = (out / "runs.csv").read_text().splitlines()
    assert len(rows) == 1 + 6
    assert (out / "report.md").is_file() and (out / "plots" / "test_metrics.png").is_file()


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_study_as_one_slurm_array(tmp_path, s4_shards):
    """2 arms x 2 seeds as one array of 4 one-task jobs; each evaluates its best checkpoint in the
    job; the report covers all four; submitting again submits nothing."""
    path = write_study(tmp_path / "s.toml", {"a": NO_CROP, "b": []})
    out = tmp_path / "study"
    cmd = study_cmd("submit", str(path), "--shards", str(s4_shards), "--out", str(out), "--tasks-per-node", "1",
                    "--time", "10", "--wait")
    rc, text = run_session(cmd, 600)
    assert rc == 0, text
    assert "submitted 4 of 4 runs as one array" in text, text
    jobs = json.loads((out / "jobs.json").read_text())
    assert len({j["job_id"].split("_")[0] for j in jobs}) == 1 and len(jobs) == 4
    plan = json.loads((out / "plan.json").read_text())
    assert all(run_state(run_dir(out, r))["state"] == "finished" for r in plan["runs"]), text
    report = json.loads((out / "report.json").read_text())
    assert [(a["name"], a["finished"]) for a in report["arms"]] == [("a", 2), ("b", 2)]
    rc, again = run_session(cmd, 300)
    assert rc == 0 and "nothing to submit" in again, again
