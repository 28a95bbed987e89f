"""`avs-dist predict --video`: masks, overlays, an overlay video and a JSON for a person's own
videos; bad videos stop with one line naming the file."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("imageio_ffmpeg")

from avs_dist.cli import main  # noqa: E402
from videos import make_clip  # noqa: E402
from helpers import write_random_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "step_00000000")


def _run(checkpoint, out, *videos_and_flags):
    return main(["predict", "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu",
                 "--video", *map(str, videos_and_flags)])


def test_predict_video_outputs(tmp_path, checkpoint):
    """A 6.3 s phone video (rotated, 29.97 fps, 8 kHz mono): 7 seconds, 2 windows, masks per
    second, an overlay video at the source rate with sound, and each frame's area in the JSON."""
    from avs_dist.video.ffmpeg import VideoRun, probe

    video = make_clip(tmp_path / "-my clip.mp4", seconds=6.3, size=(64, 48), rotate=90, audio_rate=8000, channels=1)
    assert _run(checkpoint, tmp_path / "out", video) == 0
    d = tmp_path / "out" / "-my clip"
    meta = json.loads((d / "-my clip.json").read_text())
    assert meta["seconds"] == 7 and meta["windows"] == 2 and meta["audio"] == "yes"
    assert meta["frame_rate"] == "30000/1001" and meta["size"] == [48, 64]  # rotation applied
    masks = sorted((d / "masks").iterdir())
    assert len(masks) == 7 and len(list((d / "overlays").iterdir())) == 7
    m = Image.open(masks[0])
    assert m.mode == "P" and set(np.unique(np.asarray(m))) <= {0, 255}
    over = Image.open(d / "overlays" / "-my clip_1.png")  # enlarged x8 to 384 x 512, a text band above
    assert over.size[0] == 48 * 8 and over.size[1] > 64 * 8
    rows = meta["frames_detail"]
    assert [r["frame"] for r in rows] == list(range(meta["frames"]))
    assert all(0 <= r["area_frac"] <= 1 for r in rows)
    # the overlay video: source rate and size, every frame, the source's audio
    assert "Audio: aac" in probe(d / "-my clip_overlay.mp4")
    with VideoRun(d / "-my clip_overlay.mp4", audio=False) as run:
        n = sum(1 for _ in run.frames())
        run.finish()
        assert run.meta.size == over.size and n == meta["frames"]
    assert not list((tmp_path / "out").glob(".*partial"))


def test_predict_video_fps_and_silence(tmp_path, checkpoint, capsys):
    mute = make_clip(tmp_path / "mute.mp4", seconds=2.2, fps="10", size=(32, 32), audio=False)
    assert _run(checkpoint, tmp_path / "o1", mute) == 2
    err = capsys.readouterr().err
    assert err.startswith("avs-dist predict: error: ") and "mute.mp4: has no audio stream" in err
    assert "--allow-silence" in err and not (tmp_path / "o1" / "mute").exists()

    assert _run(checkpoint, tmp_path / "o2", mute, "--allow-silence", "--fps", "2") == 0
    meta = json.loads((tmp_path / "o2" / "mute" / "mute.json").read_text())
    assert meta["audio"].startswith("no audio stream: the model was fed silence")
    assert len(meta["samples"]) == 3 * 2  # 2.2 s: 3 seconds, 2 masks each
    frames = [r["frame"] for r in meta["samples"]]
    assert frames == [4, 9, 14, 19, 21, 21]  # floor((s + (j + 15/16)/2) * 10), clamped to the last
    # every output frame takes the nearest sampled frame's mask (earlier on a tie)
    assert [r["mask_from_frame"] for r in meta["frames_detail"][:8]] == [4, 4, 4, 4, 4, 4, 4, 9]


@pytest.mark.parametrize("kind", ["corrupt", "short"])
def test_predict_video_bad_input(tmp_path, checkpoint, capsys, kind):
    if kind == "corrupt":
        good = make_clip(tmp_path / "g.mp4", seconds=2, size=(32, 32))
        video = tmp_path / "bad.mp4"
        video.write_bytes(good.read_bytes()[:2000])
        expect = "bad.mp4: "
    else:
        video = make_clip(tmp_path / "short.mp4", seconds=0.5, size=(32, 32))
        expect = "short.mp4: 15 frames at 29.97 fps (0.50 s); predict --video needs at least one second"
    assert _run(checkpoint, tmp_path / "out", video) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("avs-dist predict: error: ") and expect in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / video.stem).exists() and not list((tmp_path / "out").glob(".*partial"))


def test_predict_video_vfr_and_surround(tmp_path, checkpoint):
    """A variable-frame-rate video with 48 kHz 5.1 sound: every frame of ffmpeg's constant-rate
    stream gets a mask (the gap is filled as ffmpeg plays it)."""
    video = make_clip(tmp_path / "vfr.mp4", seconds=5.5, size=(32, 32), vfr=True, audio_rate=48000, channels=6)
    assert _run(checkpoint, tmp_path / "out", video) == 0
    meta = json.loads((tmp_path / "out" / "vfr" / "vfr.json").read_text())
    assert meta["frame_rate"] == "30000/1001" and meta["frames"] == 165 and meta["seconds"] == 6
    assert len(meta["frames_detail"]) == 165 and meta["windows"] == 2
