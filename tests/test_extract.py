"""`avs-dist extract` against the reference recipe itself (imageio reader + cv2.resize + moviepy,
avs_dist/video/reference.py) on the hard cases, and its layout driver: report, resume, atomicity."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("imageio_ffmpeg")
pytest.importorskip("moviepy")

from avs_dist.video.audio import read_wav_int16  # noqa: E402
from avs_dist.video.extract import extract_clip  # noqa: E402
from avs_dist.video.reference import reference_frames, reference_wav  # noqa: E402
from videos import make_clip  # noqa: E402

HARD_CASES = {
    # 29.97 fps, a size that is not 224, 44.1 kHz stereo AAC
    "ntsc_rate_odd_size_stereo": dict(fps="30000/1001", size=(96, 64), audio_rate=44100, channels=2),
    "8khz_mono": dict(fps="25", size=(80, 48), audio_rate=8000, channels=1),
    "5.1_48khz": dict(fps="24000/1001", size=(64, 64), audio_rate=48000, channels=6),
    # the reference indexes with the average fps (24.5 -> 25) into ffmpeg's constant-rate stream
    "variable_frame_rate": dict(vfr=True),
    "phone_rotation_90": dict(rotate=90),
    "longer_than_buffer_10s": dict(seconds=10.3, fps="15", size=(48, 32)),
}


@pytest.mark.parametrize("case", sorted(HARD_CASES))
def test_extract_clip_equals_reference(tmp_path, case):
    video = make_clip(tmp_path / "clip.mp4", **HARD_CASES[case])
    ref = reference_frames(video, 5, size=40)
    reference_wav(video, tmp_path / "ref.wav")
    want_wav, rate = read_wav_int16(tmp_path / "ref.wav")

    clip = extract_clip(video, 5, size=40)
    assert len(clip.frames) == len(ref) == 5
    for a, b in zip(clip.frames, ref):
        assert a.dtype == b.dtype == np.uint8 and np.array_equal(a, b)
    assert rate == 16000 and want_wav.shape[1] == 2  # moviepy 1.0.3 writes stereo whatever the source
    assert clip.wav.shape == want_wav.shape and np.array_equal(clip.wav, want_wav)
    # a constant-rate source needs one decode; the variable one, whose gap ffmpeg fills with
    # repeated frames, a second (the reference's frame numbers are not the decoded ones there)
    assert clip.runs == (2 if case == "variable_frame_rate" else 1)


def _s4_layout(root, rows):
    """An S4 meta CSV with `rows` [(name, start, category, split)]; returns the subset root."""
    s4 = root / "Single-source"
    s4.mkdir(parents=True)
    lines = ["name,start,category,split"] + [",".join(map(str, r)) for r in rows]
    (s4 / "s4_meta_data.csv").write_text("\n".join(lines) + "\n")
    return s4


def _raw(s4, name, split="test", category="dog_barking"):
    return s4 / "s4_data" / "raw_videos" / split / category / f"{name}.mp4"


def test_extract_layout_report_resume(tmp_path):
    import cv2

    from avs_dist.data.audio import load_logmel_pkl, logmel_from_wav
    from avs_dist.data.layout import read_s4
    from avs_dist.video.extract import REPORT, ExtractError, extract

    good, mute, corrupt, short, missing = "-a name with spaces", "mute", "corrupt", "short", "missing"
    s4 = _s4_layout(tmp_path, [(n, 0, "dog_barking", "test") for n in (good, mute, corrupt, short, missing)])
    make_clip(_raw(s4, good), seconds=5.2, fps="30000/1001", size=(72, 40), audio_rate=22050, channels=1)
    make_clip(_raw(s4, mute), seconds=5.2, audio=False)
    make_clip(_raw(s4, short), seconds=0.6)
    _raw(s4, corrupt).write_bytes(_raw(s4, good).read_bytes()[:3000])  # a cut download

    with pytest.raises(ExtractError) as e:
        extract(tmp_path, "s4", workers=2, size=32, progress=False, log=lambda *a: None)
    problems = {b["name"]: b["problem"] for b in e.value.bad}
    assert set(problems) == {mute, corrupt, short, missing}
    assert "has no audio stream" in problems[mute] and str(_raw(s4, mute)) in problems[mute]
    assert "not a video ffmpeg can read" in problems[corrupt] or "ffmpeg failed" in problems[corrupt]
    assert "the clip needs 5 s" in problems[short]
    assert "raw video not found" in problems[missing]
    report = json.loads((s4 / REPORT).read_text())
    assert report["done"] == 1 and len(report["bad"]) == 4

    recs = {r.name: r for r in read_s4(tmp_path)}
    # the bad ones left nothing; the good one is the reference's, pixel for pixel and sample for sample
    for name in (mute, corrupt, short, missing):
        assert not recs[name].frame_paths[0].parent.exists() and not recs[name].wav_path.exists()
    rec = recs[good]
    assert not list(s4.rglob("*.tmp")) and not list(s4.rglob(".*extract-tmp"))
    ref = reference_frames(_raw(s4, good), 5, size=32)
    for p, want in zip(rec.frame_paths, ref):
        assert np.array_equal(cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB), want)
    reference_wav(_raw(s4, good), tmp_path / "ref.wav")
    assert np.array_equal(read_wav_int16(rec.wav_path)[0], read_wav_int16(tmp_path / "ref.wav")[0])
    assert np.array_equal(load_logmel_pkl(rec.logmel_path), logmel_from_wav(tmp_path / "ref.wav"))

    # resume: complete videos are skipped; an incomplete one (its .pkl lost) is redone whole
    for name in (mute, corrupt, short, missing):
        _s4_remove_row(s4, name)
    rec.logmel_path.unlink()
    stamp = rec.frame_paths[0].stat().st_mtime_ns
    summary = extract(tmp_path, "s4", size=32, progress=False, log=lambda *a: None)
    assert summary["done"] == 1 and summary["bad"] == []
    assert rec.logmel_path.is_file() and rec.frame_paths[0].stat().st_mtime_ns >= stamp
    summary = extract(tmp_path, "s4", size=32, progress=False, log=lambda *a: None)
    assert summary["done"] == 0 and summary["skipped"] == 1


def _s4_remove_row(s4, name):
    csv = s4 / "s4_meta_data.csv"
    csv.write_text("\n".join(ln for ln in csv.read_text().splitlines() if not ln.startswith(name + ",")) + "\n")


def test_extract_cli_one_line_error(tmp_path, capsys):
    from avs_dist.cli import main

    s4 = _s4_layout(tmp_path, [("mute", 0, "dog_barking", "val")])
    make_clip(_raw(s4, "mute", "val"), seconds=5.2, audio=False)
    assert main(["extract", "--data-root", str(tmp_path), "--subset", "s4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("avs-dist extract: error: 1 of 1 s4 videos could not be extracted")
    assert "mute.mp4: has no audio stream" in err


@pytest.mark.slow
def test_synth_raw_videos_extract_pack(tmp_path):
    """synth --raw-videos -> (frames, wav, pkl removed) -> extract -> pack: the shards hold every video."""
    import shutil

    from avs_dist.data.pack import pack
    from avs_dist.data.shards import read_manifest
    from avs_dist.data.synth import generate
    from avs_dist.video.extract import extract

    generate(tmp_path / "data", videos=4, size=32, subset="s4", raw_fps="10")
    d = tmp_path / "data" / "Single-source" / "s4_data"
    assert len(list((d / "raw_videos").rglob("*.mp4"))) == 4
    for sub in ("visual_frames", "audio_wav", "audio_log_mel"):
        shutil.rmtree(d / sub)
    extract(tmp_path / "data", "s4", workers=2, size=32, progress=False, log=lambda *a: None)
    manifest = pack(tmp_path / "data", "s4", tmp_path / "shards", progress=False, log=lambda *a: None)
    assert sum(s["videos"] for s in manifest["splits"].values()) == 4
    assert read_manifest(tmp_path / "shards")["subset"] == "s4"


def test_bench_extract_json(tmp_path):
    """`avs-dist bench extract` runs both recipes on the same clips and says whether the outputs are identical."""
    from avs_dist.cli import main

    out = tmp_path / "b.json"
    assert main(["bench", "extract", "--videos", "1", "--clip-size", "64x48", "--clip-seconds", "5.1",
                 "--rounds", "1", "--size", "32", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["same_output"] == {"frames_equal": 5, "frames": 5, "wavs_equal": 1, "wavs": 1, "identical": True}
    assert set(r["methods"]) == {"reference", "extract"} and r["ratio"]["per_core"] > 0


def test_extract_ms3_layout(tmp_path):
    """MS3: raw_videos/{id}.mp4 (no split folder) -> visual_frames/{id}/{id}.mp4_{i}.png and the split's wav / pkl."""
    from avs_dist.data.layout import read_ms3
    from avs_dist.video.extract import extract

    ms3 = tmp_path / "Multi-sources"
    ms3.mkdir()
    (ms3 / "ms3_meta_data.csv").write_text("video_id,split\n-x_y,train\n")
    make_clip(ms3 / "ms3_data" / "raw_videos" / "-x_y.mp4", seconds=5.1, size=(48, 32))
    assert extract(tmp_path, "ms3", size=24, progress=False, log=lambda *a: None)["done"] == 1
    rec = read_ms3(tmp_path)[0]
    assert [p.name for p in rec.frame_paths] == [f"-x_y.mp4_{i}.png" for i in range(1, 6)]
    assert all(p.is_file() for p in rec.frame_paths) and rec.wav_path.is_file() and rec.logmel_path.is_file()
