"""The pictures: masks visible on any content, labels present, curves and bar charts written."""
import json

import numpy as np
import pytest
from PIL import Image

from avs_dist import plots


def _scene(colour):
    frame = np.full((32, 32, 3), 128, np.uint8)
    frame[8:24, 8:24] = colour  # the object
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    return frame, mask


@pytest.mark.parametrize("colour", [(255, 0, 0), (0, 255, 0), (0, 255, 255), (255, 255, 0), (255, 0, 255)])
def test_overlay_outline_stands_out_on_any_object(colour):
    # the old strip tinted predictions red: on a red object they could not be seen
    frame, mask = _scene(colour)
    out = plots.overlay(frame, mask)
    ring = out[7, 8:24].astype(int)  # the line just outside the mask
    line = tuple(ring[4])
    assert line in plots.PALETTE and np.linalg.norm(np.array(line) - colour) > 200
    assert (ring == ring[4]).all()
    edge = tuple(out[6, 12])
    assert edge in ((0, 0, 0), (255, 255, 255))
    inside = out[16, 16].astype(int)
    assert np.abs(inside - np.array(colour)).max() <= 0.3 * 255 + 1  # a light tint: the object shows
    assert (out[0, 0] == 128).all() and (plots.overlay(frame, np.zeros_like(mask)) == frame).all()


def test_prediction_grid_is_labelled():
    frame, mask = _scene((255, 0, 0))
    grid = plots.prediction_grid(frame[None], mask[None], np.zeros_like(mask)[None], ["vid1  frame 1  sounds: dog"])
    h, w, _ = grid.shape
    assert w >= 3 * plots.MIN_PANEL and h >= plots.MIN_PANEL
    band = grid[: plots.FONT_PX + 8]  # the column titles: text pixels on the dark band
    assert (band == plots.TEXT).all(-1).sum() > 50 or (band.max(-1) > 200).sum() > 50
    with pytest.raises(ValueError, match="column titles"):
        plots.labelled_grid([[frame, frame]], ["a"], ["r"])
    assert plots.frame_iou(mask, mask) == 1.0 and plots.frame_iou(mask, ~mask) == 0.0
    assert plots.frame_iou(~np.ones_like(mask), ~np.ones_like(mask)) == 1.0  # both empty


def test_plot_run_and_audio_gap(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(1, 21):
            f.write(json.dumps({"step": s, "epoch": 0, "total": 2 / s, "bce": 1 / s, "crop_ce": 0.5, "lr": 1e-3,
                                "grad_norm": 1.0, "frames_per_s": 10.0, "data_wait_frac": 0.0,
                                "peak_mem_bytes": 0, "time": 0.0}) + "\n")
        f.write('{"step": 21, "tot')  # a line cut by a crash
    with open(run / "eval.jsonl", "w") as f:
        for s in (10, 20):
            f.write(json.dumps({"step": s, "split": "val", "miou": s / 40, "f": s / 30, "miou_avsbench": s / 41}) + "\n")
        f.write(json.dumps({"step": 20, "split": "test", "miou": 0.45, "f": 0.6}) + "\n")
    paths = plots.plot_run(run)
    assert [p.name for p in paths] == ["loss.png", "eval.png"]
    for p in paths:
        with Image.open(p) as im:
            assert im.size == (700, 400)
    bar = plots.plot_audio_gap({"dog": 0.31, "helicopter": -0.02, "baby_laughter": None}, tmp_path / "gap.png")
    with Image.open(bar) as im:
        assert im.size[0] == 700
    from avs_dist.errors import UserError

    with pytest.raises(UserError, match="no metrics.jsonl"):
        plots.plot_run(tmp_path / "empty")


def test_plot_command(tmp_path, capsys):
    from avs_dist.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.jsonl").write_text(json.dumps({"step": 5, "split": "val", "miou": 0.5, "f": 0.6}) + "\n")
    assert main(["plot", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / 'plots' / 'eval.png'}"
    assert main(["plot", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == (f"avs-dist plot: error: {tmp_path / 'nope'}: no metrics.jsonl or "
                                               "eval.jsonl to plot (not a run folder, or no step yet)")
