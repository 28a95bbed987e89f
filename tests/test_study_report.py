"""The study report (avs_dist/study/report.py): figures recomputed here from each run's own
files, the paired interval recomputed with scipy, runs that did not finish shown with why,
plots and TensorBoard hparams read back. A fake study folder, no training."""
import csv
import io
import json

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from avs_dist.errors import BadFileError, MissingFileError
from avs_dist.study import report
from avs_dist.study.state import ERROR_FILE
from avs_dist.study.report_tb import EVENT_SUFFIX

SEEDS = [1, 2, 3, 4, 5]
ARMS = [{"name": "avsbench", "preset": "s4_avsbench", "overrides": []},
        {"name": "all_three", "preset": "s4_seed", "overrides": ["loss.crop_ce=true", "optim.lr=0.0002"]},
        {"name": "crop_ce", "preset": "s4_seed", "overrides": ["loss.crop_pair=false"]}]
COMMON = ["train.max_steps=40", "data.shards=/data/s4"]
ERROR = "ConfigError: model.backbone: 'resnet5' is not a backbone (resnet18, resnet50, pvt_v2_b5)"
# arm -> seed -> what became of the run (default: finished)
NOT_FINISHED = {"avsbench": {5: "not started"}, "all_three": {2: "failed"}, "crop_ce": {2: "stopped", 5: "not started"}}
BASE_SHIFT = {"avsbench": 0.0, "all_three": 0.03, "crop_ce": 0.01}
EVAL_STEPS = (10, 20, 30, 40)


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)


def _config(arm, seed):
    crop = arm["preset"] == "s4_seed"
    cfg = {"name": arm["preset"], "subset": "s4", "data": {"shards": "/data/s4", "batch_videos": 4},
           "model": {"backbone": "resnet50", "crop_branch": crop, "tpavi_stages": [0, 1, 2, 3]},
           "loss": {"crop_ce": crop, "crop_pair": crop and arm["name"] != "crop_ce", "crop_audio": crop},
           "optim": {"lr": 0.0002 if arm["name"] == "all_three" else 0.0001},
           "train": {"max_steps": 40, "seed": seed}}
    return cfg


def _finished_run(folder, arm, seed):
    shift = BASE_SHIFT[arm["name"]]
    # seed noise; crop_ce shares the baseline's: it is the baseline + 0.01 at every seed (no spread)
    rng = np.random.default_rng(seed + (100 if arm["name"] == "all_three" else 0))
    noise = rng.normal(0, 0.01)
    base = 0.6 + 0.02 * seed
    val_noise = rng.normal(0, 0.005)
    val = [0.3 + 0.1 * i + 0.01 * seed + shift + val_noise for i in range(len(EVAL_STEPS))]
    lines = [{"step": s, "split": "val", "miou": v, "f": v + 0.1, "miou_avsbench": v - 0.01}
             for s, v in zip(EVAL_STEPS, val)]
    lines.insert(2, {"step": 20, "split": "val", "miou": 0.05})  # crashed after step 20; the resumed run's wins
    lines[1], lines[2] = lines[2], lines[1]
    lines.append({"step": 40, "split": "test", "miou": 0.99})  # the last model's test: not a val point
    lines.append({"split": "val", "miou": 0.98})  # no step: not a point either
    _write(folder / "eval.jsonl", "\n".join(json.dumps(row) for row in lines) + "\n{\"step\": 5")
    best_step = EVAL_STEPS[int(np.argmax(val))]
    _write(folder / "status.json", {"status": "completed", "step": 40, "total_steps": 40, "time": 1.0})
    _write(folder / "final_metrics.json", {"status": "completed", "step": 40, "best_val_miou": max(val),
                                           "best_val_step": best_step, "test": {"miou": 0.11, "f": 0.12},
                                           "test_source": {"kind": "last", "step": 40}})
    _write(folder / "checkpoints" / "best" / "COMPLETE.json", {"step": best_step})
    figures = {"miou_avsbench": base + shift + noise, "f_avsbench": base + 0.1 + shift + 1.5 * noise,
               "miou": base - 0.01 + shift + noise, "f": base + 0.09 + shift + noise,
               "audio_gap": 0.02 + shift / 3 + noise / 2, "miou_mismatched": 0.5, "f_mismatched": 0.6,
               "videos": 10, "frames": 50}
    source = {"kind": "best", "step": best_step, "epoch": 3, "selected_by": "val miou", "value": max(val),
              "checkpoint": str(folder / "checkpoints" / "best" / "model.pt")}
    _write(folder / "selected_test.json", {**figures, "source": source})


def make_study(tmp_path):
    """A study folder as the runner leaves it: 3 arms x 5 seeds, some not finished."""
    runs = []
    for seed in SEEDS:
        for arm in ARMS:
            run_dir = f"runs/{arm['name']}/seed{seed}"
            runs.append({"arm": arm["name"], "seed": seed, "run_dir": run_dir, "preset": arm["preset"],
                         "overrides": COMMON + arm["overrides"] + [f"train.seed={seed}"]})
            folder = tmp_path / run_dir
            state = NOT_FINISHED[arm["name"]].get(seed, "finished")
            if state == "not started":
                continue
            _write(folder / "config.json", _config(arm, seed))
            if state == "finished":
                _finished_run(folder, arm, seed)
            elif state == "failed":
                _write(folder / "status.json", {"status": "failed", "step": 3, "total_steps": 40, "reason": "boom"})
                _write(folder / ERROR_FILE, ERROR + "\n")
            else:
                _write(folder / "status.json", {"status": "stopped", "step": 20, "total_steps": 40, "time": 1.0})
    _write(tmp_path / "plan.json", {"study": "seed_ablation", "source": "/x/seed_ablation.toml",
                                    "baseline": "avsbench", "select": "best val miou", "seeds": SEEDS,
                                    "arms": ARMS, "common": COMMON, "runs": runs})
    return tmp_path


def _training_hparams(run_dir):
    """What every training leaves besides: tb/hparams, a session with its own experiment record."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(run_dir / "tb")) as writer:
        writer.add_hparams({"model.backbone": "resnet50", "optim.lr": 0.1}, {"final/miou": 0.5},
                           run_name="hparams", global_step=40)


@pytest.fixture
def study(tmp_path):
    return make_study(tmp_path)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(study folder, summary) after write_report, once for the tests that only read them."""
    folder = make_study(tmp_path_factory.mktemp("study"))
    for seed in (1, 2):
        _training_hparams(folder / f"runs/avsbench/seed{seed}")
    return folder, report.write_report(folder)


def _own_figures(study, arm):
    """seed -> {metric: value} read here from each finished run's own files."""
    out = {}
    for seed in SEEDS:
        if NOT_FINISHED[arm].get(seed):
            continue
        folder = study / f"runs/{arm}/seed{seed}"
        selected = json.loads((folder / "selected_test.json").read_text())
        final = json.loads((folder / "final_metrics.json").read_text())
        out[seed] = {**{k: selected[k] for k, _ in report.TEST_METRICS}, "best_val_miou": final["best_val_miou"]}
    return out


def test_report_figures_equal_those_recomputed_from_the_runs_files(written):
    study, summary = written
    arms = {a["name"]: a for a in summary["arms"]}
    for name in ("avsbench", "all_three", "crop_ce"):
        own = _own_figures(study, name)
        assert (arms[name]["finished"], arms[name]["planned"]) == (len(own), len(SEEDS))
        for key, _ in report.METRICS:
            values = np.array([own[s][key] for s in sorted(own)])
            got = arms[name]["metrics"][key]
            assert got["seeds"] == sorted(own) and got["n"] == len(values)
            assert got["mean"] == pytest.approx(values.mean(), abs=1e-12)
            assert got["std"] == pytest.approx(values.std(ddof=1), abs=1e-12)
            assert (got["min"], got["max"]) == (pytest.approx(values.min()), pytest.approx(values.max()))
    assert summary["finished"] == 11 and summary["planned"] == 15
    # the selected checkpoint's test figures, not final_metrics.json's last-model ones
    assert arms["avsbench"]["metrics"]["miou"]["mean"] != pytest.approx(0.11)
    saved = json.loads((study / "report.json").read_text())
    assert saved["arms"][1]["metrics"]["miou"]["mean"] == pytest.approx(arms["all_three"]["metrics"]["miou"]["mean"])
    md = (study / "report.md").read_text()
    assert report.SOURCE_WORDS in md and f"tensorboard --logdir {study.resolve()}" in md
    assert "| all_three | `s4_seed` `loss.crop_ce=true` `optim.lr=0.0002` | 4 / 5 |" in md


def test_paired_interval_and_p_value_are_scipys(written):
    study, summary = written
    base, arm = _own_figures(study, "avsbench"), _own_figures(study, "all_three")
    seeds = sorted(set(base) & set(arm))
    assert seeds == [1, 3, 4]
    for key, _ in report.METRICS:
        expected = stats.ttest_rel([arm[s][key] for s in seeds], [base[s][key] for s in seeds])
        ci = expected.confidence_interval(0.95)
        (c,) = [c for c in summary["comparisons"] if c["arm"] == "all_three" and c["metric"] == key]
        assert c["seeds"] == seeds and c["n"] == 3
        assert c["pvalue"] == pytest.approx(expected.pvalue, rel=1e-12)
        assert (c["ci_low"], c["ci_high"]) == (pytest.approx(ci.low, rel=1e-12), pytest.approx(ci.high, rel=1e-12))
        assert c["mean_diff"] == pytest.approx(np.mean([arm[s][key] - base[s][key] for s in seeds]))
        excludes = ci.low > 0 or ci.high < 0
        assert c["distinguishable"] is bool(excludes)
        words = ("distinguishable from seed noise at n=3" if excludes
                 else "not distinguishable from seed noise at n=3")
        assert c["words"].startswith(words) and ("excludes 0" if excludes else "includes 0") in c["words"]
    # crop_ce is the baseline + 0.01 at every seed: zero spread, said so, no NaN anywhere
    (flat,) = [c for c in summary["comparisons"] if c["arm"] == "crop_ce" and c["metric"] == "miou"]
    assert flat["n"] == 3 and flat["pvalue"] is None and flat["ci_low"] is None
    assert "no seed-to-seed spread" in flat["words"] and "+0.0100" in flat["words"]
    assert "NaN" not in (study / "report.json").read_text()


def test_paired_comparison_needs_two_pairs():
    c = report.paired_comparison({1: 0.5, 2: 0.6}, {1: 0.4, 3: 0.7})
    assert c["n"] == 1 and c["mean_diff"] is None and c["pvalue"] is None
    assert c["words"].startswith("needs 2+ paired seeds")
    c = report.paired_comparison({1: 0.5, 2: 0.6, 3: 0.55}, {1: 0.5, 2: 0.6, 3: 0.55})
    assert c["mean_diff"] == 0 and c["pvalue"] is None
    assert c["words"].startswith("the two arms give the same figure at every paired seed: no seed-to-seed spread")


def test_runs_that_did_not_finish_are_shown_with_why(written):
    study, summary = written
    md = (study / "report.md").read_text()
    assert f"failed at step 3 of 40: {ERROR}" in md
    assert "stopped at step 20 of 40; `avs-dist study run` resumes it" in md
    rows = list(csv.DictReader(io.StringIO((study / "runs.csv").read_text())))
    assert len(rows) == 15
    by_run = {(r["arm"], int(r["seed"])): r for r in rows}
    failed = by_run[("all_three", 2)]
    assert failed["state"] == "failed" and failed["error"] == ERROR and failed["miou"] == ""
    assert by_run[("avsbench", 5)]["state"] == "not started" and by_run[("crop_ce", 2)]["state"] == "stopped"
    finished = by_run[("all_three", 1)]
    own = _own_figures(study, "all_three")[1]
    assert float(finished["miou_avsbench"]) == pytest.approx(own["miou_avsbench"])
    assert finished["test_source"].startswith("best checkpoint (val miou")
    saved = {(r["arm"], r["seed"]): r for r in json.loads((study / "report.json").read_text())["runs"]}
    assert saved[("all_three", 2)]["state"] == "failed" and saved[("all_three", 2)]["error"] == ERROR
    arms = {a["name"]: a for a in summary["arms"]}
    assert arms["all_three"]["states"] == {"finished": 4, "failed": 1}
    assert arms["crop_ce"]["states"] == {"finished": 3, "stopped": 1, "not started": 1}
    assert any(ERROR in line for line in arms["all_three"]["not_finished"])
    text = report.format_text(summary)
    assert ERROR in text and "4 / 5 runs finished" in text and "tensorboard --logdir" in text


def test_val_curve_is_the_runs_val_lines_with_a_resumed_step_once(study):
    (rec,) = [r for r in report.collect(study) if (r["arm"], r["seed"]) == ("crop_ce", 3)]
    noise = np.random.default_rng(3).normal(0, [0.01, 0.005])[1]  # the val noise of seed 3 (_finished_run)
    expected = [[s, 0.3 + 0.1 * i + 0.03 + 0.01 + noise] for i, s in enumerate(EVAL_STEPS)]
    assert [s for s, _ in rec["val_curve"]] == list(EVAL_STEPS)
    assert np.allclose([v for _, v in rec["val_curve"]], [v for _, v in expected])


def test_not_a_study_folder_is_one_clear_error(tmp_path):
    with pytest.raises(MissingFileError, match=r"plan.json: no such file: .* is not a study folder"):
        report.write_report(tmp_path)


def test_plots_are_readable_pngs(written):
    study, summary = written
    for name in ("plots/test_metrics.png", "plots/val_miou.png"):
        path = study / name
        assert summary["files"][name] == str(path)
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] >= 900 and img.size[1] >= 500
            pixels = np.asarray(img.convert("L"))
        assert pixels.std() > 10  # something is drawn, not a blank canvas
    assert not list(study.rglob("*.tmp"))


def _hparam_sessions(study):
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    sessions = {}
    for folder in sorted(study.glob("runs/*/seed*/tb/study")):
        acc = ea.EventAccumulator(str(folder), size_guidance=ea.STORE_EVERYTHING_SIZE_GUIDANCE)
        acc.Reload()
        content = acc.PluginTagToContent("hparams")
        start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
        scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
        sessions[folder.relative_to(study).parent.parent.as_posix()] = (start.hparams, scalars)
    return sessions


def test_tensorboard_hparams_read_back_and_a_rewrite_adds_no_session(written):
    study, _ = written
    report.write_report(study)  # the same sessions again, not twice as many
    sessions = _hparam_sessions(study)
    assert len(sessions) == 11 and not (study / "runs/all_three/seed2/tb/study").exists()
    keys = {"arm", "seed", "preset", "loss.crop_ce", "loss.crop_pair", "optim.lr", "train.max_steps"}
    for run_dir, (hp, scalars) in sessions.items():
        arm, seed = run_dir.split("/")[1], int(run_dir.split("seed")[-1])
        assert set(hp) == keys  # every run the same keys; data.shards and train.seed are not hparams
        assert hp["arm"].string_value == arm and hp["seed"].number_value == seed
        assert hp["optim.lr"].number_value == pytest.approx(0.0002 if arm == "all_three" else 0.0001)
        assert hp["loss.crop_pair"].number_value == (arm == "all_three")  # torch writes bools as numbers
        own = _own_figures(study, arm)[seed]
        assert scalars["study/test_miou"] == [(40, pytest.approx(own["miou"]))]
        assert scalars["study/best_val_miou"] == [(40, pytest.approx(own["best_val_miou"]))]
        assert len(list((study / run_dir / "tb" / "study").glob("events.out.tfevents.*"))) <= 2
    assert len(list(study.glob(f"events.out.tfevents.*{EVENT_SUFFIX}"))) == 1


def test_hparams_tab_columns_are_the_studys(written):
    """TensorBoard's own HParams backend over `tensorboard --logdir STUDY_DIR`: the columns are
    the study's keys and figures, not those of a training's own tb/hparams session."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context

    study, summary = written
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(study))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(study))
    ctx = backend_context.Context(base_plugin.TBContext(logdir=str(study), multiplexer=mux, data_provider=provider))
    request = context.RequestContext()
    metadata = ctx.hparams_metadata(request, "")
    # TensorBoard takes the first experiment record of the runs in the order it found them: the
    # folder's top (".") first, then as the walk goes; here a training's tb/hparams before any tb/study
    metadata = {run: metadata[run] for run in sorted(metadata, key=lambda r: (r != ".", not r.endswith("tb/hparams")))}
    experiment = ctx.experiment_from_metadata(request, "", True, metadata, {})
    assert {h.name for h in experiment.hparam_infos} == set(summary["tensorboard"]["hparams"])
    assert {m.name.tag for m in experiment.metric_infos} == set(summary["tensorboard"]["metrics"])
    assert "study/test_miou_avsbench" in summary["tensorboard"]["metrics"]
    assert list(mux.Runs())[0] == "."  # the walk finds the folder's top first
    assert summary["tensorboard"]["command"] == f"tensorboard --logdir {study.resolve()}"


def test_a_study_with_no_finished_run_reports_it(study):
    report.write_report(study)  # plots and sessions of an earlier report: gone once untrue
    for folder in study.glob("runs/*/seed*"):
        (folder / "selected_test.json").unlink(missing_ok=True)  # trained, test evaluation missing
    (study / "runs/avsbench/seed1/status.json").unlink()  # checkpoints but no status: killed
    summary = report.write_report(study)
    assert summary["finished"] == 0 and not (study / "plots/test_metrics.png").exists()
    assert all(c["words"].startswith("needs 2+ paired seeds") for c in summary["comparisons"])
    md = (study / "report.md").read_text()
    assert "**Runs finished / planned:** 0 / 15" in md and "plots/" not in md
    assert "trained at step 40 of 40, but its selected checkpoint is not evaluated on test" in md
    assert "stopped (no status.json: still running, or killed)" in md
    assert not list(study.glob("runs/*/seed*/tb/study")) and not list(study.glob("events.out.tfevents.*"))


def test_a_plan_without_its_runs_is_one_clear_error(tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps({"baseline": "a", "arms": [], "runs": [{"arm": "a"}]}))
    with pytest.raises(BadFileError, match=r"plan.json: runs\[0\] has no 'seed', 'run_dir'"):
        report.collect(tmp_path)
