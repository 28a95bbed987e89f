"""`avs-dist predict` on a shard set and on a folder of frames + wav."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from avs_dist.predict import PredictInputError, iter_inputs, main, overlay
from helpers import write_random_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "step_00000000")


def _check_outputs(folder, name, size):
    for i in range(1, 6):
        mask = np.asarray(Image.open(folder / name / f"{name}_{i}_mask.png"))
        assert mask.shape == size and set(np.unique(mask)) <= {0, 255}
        over = Image.open(folder / name / f"{name}_{i}_overlay.png")
        assert over.mode == "RGB" and over.size == size[::-1]


def test_overlay_tints_mask_and_draws_contour():
    from avs_dist.plots import PALETTE, TINT_ALPHA

    frame = np.full((12, 12, 3), 100, np.uint8)
    frame[4:8, 4:8] = (255, 0, 0)  # a red object: the old red tint hid a prediction on it
    mask = np.zeros((12, 12), bool)
    mask[4:8, 4:8] = True
    out = overlay(frame, mask)
    assert (out[0, 0] == 100).all()  # background untouched
    line = tuple(out[3, 5])  # outline just outside
    assert line in PALETTE and line == tuple(out[8, 8]) and line[0] < 128  # not a red on red
    inside = out[5, 5].astype(int)
    assert inside.tolist() == [round((1 - TINT_ALPHA) * a + TINT_ALPHA * b) for a, b in zip((255, 0, 0), line)]


def test_predict_shard_set(s4_shards, checkpoint, tmp_path):
    from avs_dist.data.shards import iter_videos

    first = next(iter_videos(s4_shards, "test"))
    assert main(["--checkpoint", str(checkpoint), "--input", str(s4_shards), "--out", str(tmp_path),
                 "--split", "test", "--limit", "1", "--device", "cpu"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first["name"], "predictions.json"])
    _check_outputs(tmp_path, first["name"], first["frames"].shape[1:3])
    meta = json.loads((tmp_path / "predictions.json").read_text())  # which weights made these masks
    assert meta["source"] == {"kind": "step", "step": 0, "epoch": 0, "checkpoint": str(checkpoint / "model.pt")}
    assert list(meta["videos"]) == [first["name"]] and meta["split"] == "test"


def test_predict_folder_from_synth(synth_root, checkpoint, tmp_path):
    root = synth_root / "Single-source" / "s4_data"
    wav = sorted(root.glob("audio_wav/*/*/*.wav"))[0]
    name = wav.stem
    frames = sorted(root.glob(f"visual_frames/*/*/{name}/*.png"))
    assert len(frames) == 5
    video = tmp_path / "myclip"
    video.mkdir()
    for f in frames:  # larger than the model's 64 px: masks come back at the frames' size
        Image.open(f).convert("RGB").resize((80, 72)).save(video / f.name)
    shutil.copy(wav, video / "sound.wav")
    out = tmp_path / "pred"
    assert main(["--checkpoint", str(checkpoint), "--input", str(video), "--out", str(out), "--device", "cpu"]) == 0
    _check_outputs(out, "myclip", (72, 80))
    # a folder of video folders gives the same video
    (name2, frames2, audio2), = iter_inputs(tmp_path, "test")
    (_, frames1, audio1), = iter_inputs(video, "test")
    assert name2 == "myclip" and np.array_equal(frames1, frames2) and np.array_equal(audio1, audio2)
    assert frames1.shape == (5, 72, 80, 3) and audio1.shape == (5, 1, 96, 64)


def test_predict_bad_inputs(tmp_path):
    with pytest.raises(PredictInputError, match="does not exist"):
        list(iter_inputs(tmp_path / "nope", "test"))
    with pytest.raises(PredictInputError, match="not a shard set"):
        list(iter_inputs(tmp_path, "test"))
    (tmp_path / "a.wav").write_bytes(b"")
    Image.new("RGB", (4, 4)).save(tmp_path / "f1.png")
    with pytest.raises(PredictInputError, match="expected 5 image files, found 1"):
        list(iter_inputs(tmp_path, "test"))
