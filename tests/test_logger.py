"""RunLogger: JSONL files, TensorBoard events read back with TensorBoard's own reader,
resume without duplicate steps, and terminal output on / off a TTY and per rank."""
import io
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from avs_dist.config import load_config, to_dict
from avs_dist.train.logger import RunLogger
from avs_dist.train.sinks import overlay_grid, truncate_jsonl

ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _cfg(log_every=2):
    cfg = to_dict(load_config("tiny"))
    cfg["train"]["log_every_steps"] = log_every
    return cfg


def _terms(step, offset=0.0):
    return {"total": 1.0 / step + offset, "bce": 0.5 / step + offset, "crop_ce": 0.25 + offset}


def _log(logger, step, offset=0.0, epoch=0, **kw):
    logger.log_step(step, epoch, _terms(step, offset), lr=1e-3 * step, grad_norm=torch.tensor(2.0 + step),
                    frames_per_s=100.0 + step + offset, data_wait_frac=0.01 * step,
                    peak_mem_bytes=step * 2**28, **kw)


def _accumulator(path):
    acc = ea.EventAccumulator(str(path), size_guidance=ea.STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    return acc


def _scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_and_tensorboard_roundtrip(tmp_path):
    cfg = _cfg()
    logger = RunLogger(tmp_path, cfg, rank=0, total_steps=4, steps_per_epoch=2)
    for step in range(1, 4):
        _log(logger, step, epoch=(step - 1) // 2)
    _log(logger, 4, epoch=1, wall_time=1.8e9)  # a trainer that flushes late passes the step's own time
    logger.log_eval(2, {"miou": 0.25, "f": 0.5, "miou_avsbench": torch.tensor(0.3)})
    logger.log_eval(4, {"miou": 0.5, "f": 0.625, "miou_avsbench": 0.55})

    # 3 samples of 16x20: grey frames, ground truth on the left half, prediction on the right.
    n, h, w = 3, 16, 20
    grey = torch.full((n, 3, h, w), 0.5)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    masks = torch.zeros(n, h, w)
    masks[:, :, : w // 2] = 1
    logits = torch.full((n, 1, h, w), -5.0)
    logits[..., w // 2:] = 5.0
    logger.log_images(4, (grey - mean) / std, masks, logits, captions=["a", "b", "c"])
    logger.finish({"miou": 0.5, "f": 0.625, "status": "completed"}, cfg)
    logger.close()

    lines = _read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert lines[2]["epoch"] == 1
    for key in ("total", "bce", "crop_ce", "lr", "grad_norm", "frames_per_s", "data_wait_frac",
                "peak_mem_bytes", "time"):
        assert key in lines[0], key
    assert lines[2]["bce"] == pytest.approx(0.5 / 3) and lines[2]["grad_norm"] == 5.0
    assert lines[3]["time"] == 1.8e9 and abs(lines[2]["time"] - time.time()) < 600
    evals = _read_jsonl(tmp_path / "eval.jsonl")
    assert [(e["step"], e["split"], e["miou_avsbench"]) for e in evals] == [(2, "val", pytest.approx(0.3)),
                                                                            (4, "val", 0.55)]

    acc = _accumulator(tmp_path / "tb")
    tags = set(acc.Tags()["scalars"])
    assert {"loss/total", "loss/bce", "loss/crop_ce", "train/lr", "train/grad_norm", "perf/frames_per_s",
            "perf/data_wait_frac", "perf/peak_mem_gib", "val/miou", "val/f", "val/miou_avsbench"} <= tags
    assert _scalars(acc, "loss/bce") == [(s, pytest.approx(0.5 / s)) for s in range(1, 5)]
    assert _scalars(acc, "train/lr") == [(s, pytest.approx(1e-3 * s)) for s in range(1, 5)]
    assert _scalars(acc, "perf/peak_mem_gib") == [(s, pytest.approx(s / 4)) for s in range(1, 5)]
    assert _scalars(acc, "perf/data_wait_frac")[-1] == (4, pytest.approx(0.04))
    assert _scalars(acc, "val/miou") == [(2, 0.25), (4, 0.5)]
    assert acc.Scalars("loss/total")[-1].wall_time == 1.8e9

    (image,) = acc.Images("images/frame_gt_pred")
    assert image.step == 4
    pixels = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    # the same picture plots.prediction_grid draws (its layout is tested in test_plots.py):
    # 3 labelled rows of frame | ground truth | prediction, each panel enlarged to >= 160 px
    expected = overlay_grid((grey - mean) / std, masks, logits, captions=["a", "b", "c"])
    assert pixels.shape == tuple(expected.permute(1, 2, 0).shape) and pixels.shape[1] >= 3 * 160
    assert pixels.shape[0] >= 3 * 160

    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    hp_acc = _accumulator(tmp_path / "tb" / "hparams")
    content = hp_acc.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["model.backbone"].string_value == "resnet18"
    assert start.hparams["optim.schedule"].string_value == "constant"
    assert start.hparams["model.crop_branch"].number_value == 1  # torch writes bools as numbers
    assert json.loads(start.hparams["model.tpavi_stages"].string_value) == [0, 1, 2, 3]
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"final/miou", "final/f"}
    assert _scalars(hp_acc, "final/miou") == [(4, 0.5)]


def test_resume_drops_later_steps(tmp_path):
    cfg = _cfg()
    first = RunLogger(tmp_path, cfg, rank=0, total_steps=6, steps_per_epoch=3)
    for step in range(1, 6):
        _log(first, step)
    first.log_eval(2, {"miou": 0.1})
    first.log_eval(5, {"miou": 0.2})
    first.close()  # as if it crashed after step 5, with its last checkpoint at step 3
    # TensorBoard orders event files by name, which starts with the creation second.
    time.sleep(1.05 - time.time() % 1)

    second = RunLogger(tmp_path, cfg, rank=0, total_steps=6, steps_per_epoch=3, start_step=3)
    for step in range(4, 7):
        _log(second, step, offset=100.0, epoch=1)
    second.log_eval(6, {"miou": 0.3})
    second.close()

    lines = _read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert [r["total"] > 100 for r in lines] == [False] * 3 + [True] * 3
    assert [(e["step"], e["miou"]) for e in _read_jsonl(tmp_path / "eval.jsonl")] == [(2, 0.1), (6, 0.3)]

    acc = _accumulator(tmp_path / "tb")
    for tag in ("loss/total", "train/lr", "perf/frames_per_s"):
        assert [s for s, _ in _scalars(acc, tag)] == [1, 2, 3, 4, 5, 6], tag
    assert _scalars(acc, "loss/total") == [(s, pytest.approx(1.0 / s + (100 if s > 3 else 0)))
                                           for s in range(1, 7)]
    assert _scalars(acc, "val/miou") == [(2, pytest.approx(0.1)), (6, pytest.approx(0.3))]


def test_truncate_drops_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    assert truncate_jsonl(path, 2) == (2, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_plain_output_without_tty(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # must not bring escape codes into a log file
    logger = RunLogger(tmp_path, _cfg(log_every=2), rank=0, total_steps=5, steps_per_epoch=5)
    for step in range(1, 6):
        _log(logger, step)
    logger.log_eval(5, {"miou": 0.5, "f": 0.25})
    logger.warn("disk almost full")
    logger.finish({"miou": 0.5}, {})
    logger.close()
    out, err = capsys.readouterr()
    assert "\x1b" not in out and "\x1b" not in err
    assert "model.backbone" in out and "run summary" in out
    steps = [line.split()[1] for line in out.splitlines() if line.startswith("step ")]
    assert steps == ["1/5", "2/5", "4/5", "5/5"]  # first, every 2nd, last
    assert "step 2/5 epoch 0 loss 0.5000 bce 0.2500 crop_ce 0.2500 lr 2.0e-03 gnorm 4 fps 102.0" in out
    assert "eval val step 5: miou 0.5000 f 0.2500" in out
    assert "WARNING: disk almost full" in err and "[rank" not in err


def test_progress_bars_on_tty(tmp_path, capsys):
    logger = RunLogger(tmp_path, _cfg(), rank=0, total_steps=4, steps_per_epoch=2, tty=True)
    for step in range(1, 5):
        _log(logger, step, epoch=(step - 1) // 2)
    logger.finish({"miou": 0.5}, {})
    logger.close()
    out = capsys.readouterr().out
    assert "\x1b[" in out and "4/4" in out and "epoch 1" in out and "fr/s" in out
    assert "step 2/4" not in out  # no plain lines under the bars


def test_other_ranks_are_quiet(tmp_path, capsys):
    run_dir = tmp_path / "run"
    logger = RunLogger(run_dir, _cfg(log_every=1), rank=1, total_steps=3, steps_per_epoch=3)
    for step in range(1, 4):
        _log(logger, step)
    logger.log_eval(3, {"miou": 0.5})
    logger.log_images(3, torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4), torch.zeros(1, 1, 4, 4))
    logger.info("hello")
    logger.finish({"miou": 0.5}, {})
    logger.warn("loss is nan")
    logger.close()
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == "[rank 1] WARNING: loss is nan"
    assert not run_dir.exists()


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="masks must be"):
        overlay_grid(torch.zeros(2, 3, 8, 8), torch.zeros(2, 4, 4), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="logits must be"):
        overlay_grid(torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8), torch.zeros(2, 8, 8))
    logger = RunLogger(tmp_path, _cfg(), rank=1, total_steps=3, steps_per_epoch=3)
    with pytest.raises(ValueError, match="clash"):
        logger.log_step(1, 0, {"lr": 1.0}, 1e-3, 1.0, 1.0, 0.0, 0)


def test_frames_per_second_counts_each_batch_frames(tmp_path):
    """frames/s is the global batch's videos times the frames of rank 0's micro-batches (AVSS:
    batches of 10 and of 5 frames in one step), over the step's seconds."""
    from types import SimpleNamespace

    logger = RunLogger(tmp_path, _cfg(log_every=1), rank=0, total_steps=2, steps_per_epoch=2, tty=False,
                       videos_per_step=8)
    for step, lengths in ((1, (5,)), (2, (10, 5))):
        micro = [{"frames": torch.zeros(2, t, 3, 4, 4), "name": ["a", "b"]} for t in lengths]
        out = SimpleNamespace(losses=torch.tensor([1.0]), names=["total"], grad_norm=torch.tensor(1.0), lr=1e-3,
                              skipped=None)
        logger.record_step(step, SimpleNamespace(micro=micro, epoch=0, wait_s=0.0), out, seconds=2.0)
    logger.close()
    assert [r["frames_per_s"] for r in _read_jsonl(tmp_path / "metrics.jsonl")] == [8 * 5 / 2, 8 * 7.5 / 2]
