"""Issue 18: every figure says which checkpoint it is of (provenance.py), each run directory has
one short RESULTS.md (train/results.py), the run summary holds each thing once and only what is
true (train/summary.py, the terminal sink's config table and ETA), and a completed run is
reported, not redone. Unit tests on files written here; the trained runs are in test_train.py
(single process) and test_train_learning.py (the demo)."""
from __future__ import annotations

import json
import re
import time

from avs_dist.config import load_config, to_dict
from avs_dist.provenance import checkpoint_source, describe, final_source, short
from avs_dist.train.logger import RunLogger
from avs_dist.train.results import completed_run, results_text, write_results
from avs_dist.train.sinks import TerminalSink, config_rows
from avs_dist.train.summary import final_numbers, summary_rows

FIGURES = {"miou_avsbench": 0.7587, "f_avsbench": 0.8, "miou": 0.75, "f": 0.79, "audio_gap": 0.41,
           "miou_mismatched": 0.34, "videos": 6, "frames": 30, "empty_frames": 0, "batch_videos": 4}


def _run_dir(tmp_path, status="completed", step=300):
    """A run folder as a completed tiny run leaves it: config, status, final metrics, best/."""
    run = tmp_path / "run"
    (run / "checkpoints" / "best").mkdir(parents=True)
    cfg = to_dict(load_config("tiny", ["data.shards=\"/data/shards\""]))
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "status.json").write_text(json.dumps({"status": status, "step": step, "total_steps": 300,
                                                 "time": 1.8e9}))
    (run / "checkpoints" / "best" / "COMPLETE.json").write_text(json.dumps({"step": 250, "epoch": 62}))
    if status == "completed":
        final = {"status": "completed", "step": 300, "epoch": 74, "total_steps": 300, "world_size": 2,
                 "strategy": "ddp", "precision": "fp32", "global_batch_videos": 8, "best_val_miou": 0.8123,
                 "val": dict(FIGURES), "test": dict(FIGURES), "steps_per_epoch": 4, "best_val_step": 250,
                 "test_source": final_source(300, 74, run / "checkpoints" / "step_00000300")}
        (run / "final_metrics.json").write_text(json.dumps(final))
    return run, cfg


def test_checkpoint_sources_are_named(tmp_path):
    run, _ = _run_dir(tmp_path)
    obj = {"model": {}, "config": {}, "step": 250, "epoch": 62, "metrics": {"val": {"miou": 0.8086}}}
    best = checkpoint_source(run / "checkpoints" / "best" / "model.pt", obj)
    assert (best["kind"], best["step"], best["value"]) == ("best", 250, 0.8086)
    assert describe(best) == "best checkpoint (val miou 0.8086 at step 250)"
    assert short(best) == "best val miou, step 250"
    last = checkpoint_source(run / "checkpoints" / "step_00000300" / "model.pt", {**obj, "step": 300})
    assert last["kind"] == "last" and describe(last) == "last model (step 300, end of training)"
    mid = checkpoint_source(run / "checkpoints" / "step_00000150" / "model.pt", {**obj, "step": 150})
    assert mid["kind"] == "step" and describe(mid) == "checkpoint of step 150"
    ref = checkpoint_source(tmp_path / "S4_best.pth", {"encoder.weight": 0})
    assert ref["kind"] == "reference" and describe(ref) == "AVSBench reference checkpoint S4_best.pth"


def test_results_file_of_a_completed_run(tmp_path):
    run, _ = _run_dir(tmp_path)
    path = write_results(run)
    text = path.read_text()
    assert path == run / "RESULTS.md" and len(text.splitlines()) <= 12
    assert "config `tiny` (s4), resnet18 + crop branch, ddp on 2 rank(s), precision fp32, global batch 8" in text
    assert "completed at step 300 of 300 (75 epochs of 4 steps)" in text
    assert f"**Best val mIoU:** 0.8123 at step 250: `{run.resolve() / 'checkpoints' / 'best'}`" in text
    assert ("**Test**, last model (step 300, end of training): miou_avsbench 0.7587, f_avsbench 0.8000, "
            "miou 0.7500, f 0.7900, audio_gap +0.4100") in text
    assert f"tensorboard --logdir {run.resolve() / 'tb'}" in text
    assert "--shards /data/shards --split test" in text


def test_results_file_of_a_stopped_run(tmp_path):
    run, _ = _run_dir(tmp_path, status="stopped", step=120)
    text = results_text(run)
    assert "stopped at step 120 of 300" in text and "**Test:** not yet" in text
    assert "at step 250" in text  # best/ exists already


def test_completed_run_is_recognised_only_for_the_same_config(tmp_path):
    run, cfg = _run_dir(tmp_path)
    assert completed_run(run, cfg)["step"] == 300
    other = json.loads(json.dumps(cfg))
    other["train"]["max_steps"] = 600  # asked to go on: not this run
    assert completed_run(run, other) is None
    stopped, cfg2 = _run_dir(tmp_path / "b", status="stopped")
    assert completed_run(stopped, cfg2) is None


def test_summary_says_each_thing_once(tmp_path):
    run, _ = _run_dir(tmp_path)
    result = json.loads((run / "final_metrics.json").read_text())
    perf = {"wall_s": 1234.0, "fps": 4.9, "wait": 0.01, "peak_mem": 2**31, "loss": {"total": 0.1, "bce": 0.05}}
    rows = summary_rows(result, perf, 300, 4, run)
    keys = [k for k, _ in rows]
    assert len(keys) == len(set(keys)) and len(rows) <= 10
    values = dict(rows)
    assert values["run"] == "completed: step 300 of 300, epoch 75 of 75 (4 steps each)"
    assert values["best val mIoU"] == "0.8123 at step 250 (checkpoints/best)"
    assert values["test (last, step 300)"].startswith("miou_avsbench 0.7587")
    assert values["eval sets"] == "val 6 videos (30 frames), test 6 videos (30 frames)"
    text = " ".join(v for _, v in rows)
    assert text.count("videos") == 2 and "empty_frames" not in text and "batch_videos" not in text
    numbers = final_numbers(result)
    assert numbers["test/miou"] == 0.75 and numbers["best_val_miou"] == 0.8123
    assert not {"step", "test/videos", "test_source/step", "best_val_step"} & set(numbers)


def test_config_table_shows_the_plan():
    cfg = to_dict(load_config("tiny"))
    rows = dict(config_rows(cfg, 300, 4))
    assert rows["train.epochs"] == "15 (not used: max_steps)"
    assert rows["train.max_steps"] == "300 (= 75 epochs of 4 steps)"
    cfg["train"]["max_steps"] = 0
    assert dict(config_rows(cfg, 60, 4))["train.epochs"] == "15 (= 60 steps of 4 per epoch)"


def test_eta_from_the_steps_own_times(tmp_path, capsys):
    """Steps reach the terminal in batches of log_every (one host sync): the ETA comes from
    when each step ended. Before: 'eta 00:00:01' at step 5 of a run of 10 s per step."""
    sink = TerminalSink(to_dict(load_config("tiny")), "config", total_steps=300, steps_per_epoch=4,
                        start_step=0, tty=False)
    now = time.time()
    for step in range(1, 6):  # steps of 10 s, handed over together at the end of step 5
        record = {"step": step, "epoch": 0, "total": 1.0, "lr": 1e-3, "grad_norm": 1.0, "frames_per_s": 4.0,
                  "data_wait_frac": 0.0, "peak_mem_bytes": 0, "time": now - 10 * (5 - step)}
        sink.step(record, show=step in (1, 5))
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step ")]
    assert "eta" not in lines[0]  # unknown after one step: omitted, not "?"
    eta = re.search(r"eta (\d\d):(\d\d):(\d\d)", lines[1])
    seconds = int(eta[1]) * 3600 + int(eta[2]) * 60 + int(eta[3])
    assert abs(seconds - 295 * 10) <= 5, lines[1]


def test_final_test_line_names_its_weights(tmp_path, capsys):
    logger = RunLogger(tmp_path, to_dict(load_config("tiny")), rank=0, total_steps=3, steps_per_epoch=3)
    logger.log_eval(3, dict(FIGURES), "val")
    logger.log_eval(3, dict(FIGURES), "test", source=final_source(3, 0))
    logger.close()
    evals = [x for x in capsys.readouterr().out.splitlines() if x.startswith("eval ")]
    assert evals[0].startswith("eval val step 3: miou_avsbench 0.7587") and "videos" not in " ".join(evals)
    out = "\n".join(evals)
    assert "eval test of the last model (step 3, end of training): miou_avsbench 0.7587" in out
    test_line = json.loads((tmp_path / "eval.jsonl").read_text().splitlines()[1])
    assert test_line["source"] == {"kind": "last", "step": 3, "epoch": 0, "checkpoint": None}


def test_train_reports_a_completed_run_unless_asked_to_redo_it(tmp_path, capsys):
    from argparse import Namespace

    from avs_dist.config import config_from_dict
    from avs_dist.launch.local import report_completed

    run, cfg = _run_dir(tmp_path)
    args = Namespace(run_dir=str(run), resume="auto", reevaluate=False)
    assert report_completed(args, config_from_dict(cfg))
    out = capsys.readouterr().out
    assert f"already completed at step 300 of 300; results in {run / 'RESULTS.md'}" in out
    assert (run / "RESULTS.md").is_file()  # a run from before RESULTS.md gets one
    assert not report_completed(Namespace(run_dir=str(run), resume="auto", reevaluate=True), config_from_dict(cfg))
    assert not report_completed(Namespace(run_dir=str(run), resume="never", reevaluate=False),
                                config_from_dict(cfg))
