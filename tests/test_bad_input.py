"""Bad input: every case is reported with its file and reason; nothing is dropped silently.

Default: one report listing every bad video, non-zero exit, no manifest, no shards.
--skip-bad: the rest is packed and each skipped video is recorded in the manifest.
"""
from __future__ import annotations

import pickle
import shutil

import pytest
import torch
from PIL import Image

from avs_dist.data.layout import read_subset
from avs_dist.data.pack import PackError, main, pack
from avs_dist.data.shards import iter_videos, read_manifest

QUIET = dict(progress=False, log=lambda *a, **k: None)


@pytest.fixture
def s4_root(synth_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth_root / "Single-source", root / "Single-source")
    shutil.copytree(synth_root / "boxes" / "Single-source", root / "boxes" / "Single-source")
    return root


def _xml(root, rec, frame):
    return root / "boxes" / "Single-source" / rec.name / f"{rec.name}_{frame}.xml"


def _missing_frame(root, rec):
    rec.frame_paths[2].unlink()
    return rec.name, str(rec.frame_paths[2]), "not found"


def _unreadable_png(root, rec):
    data = rec.frame_paths[1].read_bytes()
    rec.frame_paths[1].write_bytes(data[: len(data) // 2])  # truncated
    return rec.name, str(rec.frame_paths[1]), "unreadable image"


def _garbage_png(root, rec):
    rec.frame_paths[4].write_bytes(b"this is not a png")
    return rec.name, str(rec.frame_paths[4]), "unreadable image"


def _mask_wrong_size(root, rec):
    Image.new("L", (32, 48), 255).save(rec.mask_paths[0])
    return rec.name, str(rec.mask_paths[0]), "mask is 32x48"


def _audio_wrong_shape(root, rec):
    with open(rec.logmel_path, "wb") as f:
        pickle.dump(torch.zeros(4, 1, 96, 64), f)
    return rec.name, str(rec.logmel_path), "shape"


def _unreadable_pkl(root, rec):
    rec.logmel_path.write_bytes(b"\x80\x04not a pickle")
    return rec.name, str(rec.logmel_path), "pickle"


def _unparsable_xml(root, rec):
    _xml(root, rec, 3).write_text("<annotation><size><width>64</width>")
    return rec.name, str(_xml(root, rec, 3)), "unparsable"


def _box_outside(root, rec):
    path = _xml(root, rec, 2)
    text = path.read_text()
    start = text.index("<xmax>") + len("<xmax>")
    path.write_text(text[:start] + "500" + text[text.index("</xmax>"):])
    return rec.name, str(path), "outside"


def _row_files_missing(root, rec):
    csv = root / "Single-source" / "s4_meta_data.csv"
    csv.write_text(csv.read_text() + "-ghost_video,0,helicopter,train\n")
    return "-ghost_video", "visual_frames/train/helicopter/-ghost_video", "not found"


def _unknown_category(root, rec):
    # Move the video's files under the new category, so the category is the only problem.
    csv = root / "Single-source" / "s4_meta_data.csv"
    lines = csv.read_text().splitlines()
    lines[rec.row + 1] = lines[rec.row + 1].replace(f",{rec.category},", ",kazoo_playing,")
    csv.write_text("\n".join(lines) + "\n")
    for path in [rec.frame_paths[0].parent, rec.mask_paths[0].parent, rec.logmel_path, rec.wav_path]:
        dest = path.parents[1] / "kazoo_playing" / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), dest)
    return rec.name, "s4_meta_data.csv", "unknown category 'kazoo_playing'"


CASES = {
    "missing_frame": _missing_frame,
    "unreadable_png_truncated": _unreadable_png,
    "unreadable_png_garbage": _garbage_png,
    "mask_wrong_size": _mask_wrong_size,
    "audio_wrong_shape": _audio_wrong_shape,
    "unreadable_pkl": _unreadable_pkl,
    "unparsable_xml": _unparsable_xml,
    "box_outside_image": _box_outside,
    "csv_row_files_missing": _row_files_missing,
    "unknown_category": _unknown_category,
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_reported_then_skipped(case, s4_root, tmp_path):
    records = read_subset(s4_root, "s4")
    rec = records[1] if case != "unknown_category" else records[10]  # a train and a val video
    name, where, reason = CASES[case](s4_root, rec)
    out = tmp_path / "out"

    with pytest.raises(PackError) as err:
        pack(s4_root, "s4", out, crop_size=16, **QUIET)
    report = str(err.value)
    block = report[report.index(name):]
    assert where in block and reason in block, report
    assert "1 of" in report and "--skip-bad" in report
    assert [p["name"] for p in err.value.problems] == [name]
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar*")) if out.exists() else True

    manifest = pack(s4_root, "s4", out, crop_size=16, skip_bad=True, **QUIET)
    assert [s["name"] for s in manifest["skipped"]] == [name]
    assert any(where in p and reason in p for p in manifest["skipped"][0]["problems"])
    assert read_manifest(out)["skipped"] == manifest["skipped"]
    packed = [v["name"] for split in ("train", "val", "test") for v in iter_videos(out, split)]
    good = [r.name for r in read_subset(s4_root, "s4") if r.name != name]
    assert sorted(packed) == sorted(good)
    train = list(iter_videos(out, "train"))
    assert [v["index"] for v in train] == list(range(len(train)))  # dense positions after skipping


def test_one_report_lists_every_bad_video_cli(s4_root, tmp_path, capsys):
    records = read_subset(s4_root, "s4")
    bad = [CASES["missing_frame"](s4_root, records[0]), CASES["mask_wrong_size"](s4_root, records[3]),
           CASES["unparsable_xml"](s4_root, records[8])]
    out = tmp_path / "out"
    argv = ["--data-root", str(s4_root), "--subset", "s4", "--out", str(out), "--crop-size", "16", "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "3 of 12" in err
    for name, where, reason in bad:
        assert name in err and where in err
    assert not (out / "manifest.json").exists()

    assert main(argv + ["--skip-bad"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name, _, _ in bad)  # skipped videos are printed too
    assert sorted(s["name"] for s in read_manifest(out)["skipped"]) == sorted(n for n, _, _ in bad)


def test_ms3_missing_mask(synth_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth_root / "Multi-sources", root / "Multi-sources")
    rec = read_subset(root, "ms3")[0]
    rec.mask_paths[4].unlink()
    with pytest.raises(PackError) as err:
        pack(root, "ms3", tmp_path / "out", **QUIET)
    assert str(rec.mask_paths[4]) in str(err.value) and "mask not found" in str(err.value)
