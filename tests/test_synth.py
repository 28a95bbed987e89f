"""The synthetic AVSBench generator (avs_dist.data.synth)."""
import hashlib
import wave

import numpy as np
import pytest
from PIL import Image

from avs_dist.data import layout, synth
from avs_dist.data.audio import load_logmel_pkl, logmel_from_wav
from avs_dist.data.boxes import box_from_mask, boxes_for_video
from avs_dist.data.classes import CLASS_INDEX

SIZE = 64
N = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = synth.generate(out, videos=N, size=SIZE, subset="both", seed=3)
    return out, summary, layout.read_s4(out), layout.read_ms3(out)


def tree_hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def rgb(path):
    return np.asarray(Image.open(path).convert("RGB"))


def all_records(data):
    return data[2] + data[3]


def test_layout_matches_readers(data):
    out, summary, s4, ms3 = data
    for subset, recs in (("s4", s4), ("ms3", ms3)):
        info = summary["subsets"][subset]
        assert [r.name for r in recs] == [v["name"] for v in info["videos"]]  # CSV order
        assert [r.split for r in recs] == [v["split"] for v in info["videos"]]
        assert all(info["splits"][s] >= 1 for s in layout.SPLITS) and len(recs) == N
        for r in recs:
            for p in r.frame_paths + r.mask_paths + [r.wav_path, r.logmel_path]:
                assert p.is_file(), p
    for r in s4:
        mask_dir = r.mask_paths[0].parent
        assert sorted(p.name for p in mask_dir.iterdir()) == sorted(p.name for p in r.mask_paths)
        assert len(r.mask_paths) == (1 if r.split == "train" else 5)
        assert Image.open(r.mask_paths[0]).mode == "L"
        assert Image.open(r.frame_paths[0]).size == (SIZE, SIZE)
    for r in ms3:
        assert r.frame_paths[0].name == f"{r.name}.mp4_1.png"
        assert Image.open(r.mask_paths[0]).mode == "P"
    names = [r.name for r in all_records(data)]
    assert any(n.startswith("-") and "_" in n for n in names)
    assert all(len(n) == 11 for n in names) and len(set(names)) == len(names)


def test_classes_used_appear_in_train(data):
    _, summary, s4, _ = data
    train = {r.category for r in s4 if r.split == "train"}
    assert {r.category for r in s4} <= train
    assert len(train) >= 2
    for v in summary["subsets"]["s4"]["videos"]:
        assert v["sounding"] == [v["category"]]
        assert 1 <= len(v["distractors"]) <= 2 and v["category"] not in v["distractors"]
        # distractors are classes that sound elsewhere: the picture alone does not say which one sounds
        assert set(v["distractors"]) <= train


def test_mask_is_exactly_the_sounding_objects(data):
    _, summary, s4, ms3 = data
    for subset, recs in (("s4", s4), ("ms3", ms3)):
        for r, v in zip(recs, summary["subsets"][subset]["videos"]):
            sounding = set().union(*(synth.class_colours(CLASS_INDEX[c]) for c in v["sounding"]))
            others = set().union(*(synth.class_colours(CLASS_INDEX[c]) for c in v["distractors"]))
            assert not sounding & others
            for k, path in zip(r.mask_frames, r.mask_paths):
                mask = np.asarray(Image.open(path)) > 0
                frame = rgb(r.frame_paths[k])
                packed = frame.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
                is_sounding = np.isin(packed, [a << 16 | b << 8 | c for a, b, c in sounding])
                is_other = np.isin(packed, [a << 16 | b << 8 | c for a, b, c in others])
                assert np.array_equal(mask, is_sounding), (r.name, k)
                assert is_other.any() and not (mask & is_other).any()
                side = np.sqrt(mask.sum() / len(v["sounding"]))
                assert 0.12 * SIZE < side < 0.3 * SIZE


def test_twins_show_the_same_scene_with_another_sounding_object(data):
    """Without the audio, the two videos of a scene are the same input with different masks."""
    _, summary, s4, ms3 = data
    for subset, recs in (("s4", s4), ("ms3", ms3)):
        scenes: dict[int, list] = {}
        for r, v in zip(recs, summary["subsets"][subset]["videos"]):
            scenes.setdefault(v["scene"], []).append((r, v))
        twins = [pair for pair in scenes.values() if len(pair) == 2]
        assert all(len(pair) <= 2 for pair in scenes.values())
        # every split of N=8 videos has at least one pair; only a split's last video may be alone
        assert len(twins) >= 3 and len(scenes) - len(twins) <= 3, subset
        for (ra, va), (rb, vb) in twins:
            assert ra.split == rb.split and ra.name != rb.name
            assert sorted(va["sounding"] + va["distractors"]) == sorted(vb["sounding"] + vb["distractors"])
            assert va["sounding"] != vb["sounding"]
            for fa, fb in zip(ra.frame_paths, rb.frame_paths):
                assert np.array_equal(rgb(fa), rgb(fb))
            ma = np.asarray(Image.open(ra.mask_paths[0])) > 0
            mb = np.asarray(Image.open(rb.mask_paths[0])) > 0
            assert ma.any() and mb.any() and not np.array_equal(ma, mb)
            assert not (ma & mb).all() and (subset == "ms3" or not (ma & mb).any())


def test_audio_peak_is_the_class_band_and_pkl_matches_wav(data):
    _, summary, s4, ms3 = data
    for subset, recs in (("s4", s4), ("ms3", ms3)):
        for r, v in zip(recs, summary["subsets"][subset]["videos"]):
            with wave.open(str(r.wav_path)) as w:
                assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
                assert w.getnframes() == int(round(v["seconds"] * 16000))
            x = load_logmel_pkl(r.logmel_path)
            assert np.array_equal(x, logmel_from_wav(r.wav_path))
            spectrum = x[:, 0].mean(axis=(0, 1))
            mains = [synth.class_bands(CLASS_INDEX[c])[0] for c in v["sounding"]]
            top = np.argsort(spectrum)[::-1][: len(mains)]
            assert sorted(top.tolist()) == sorted(mains), (r.name, v["sounding"])
            if v["seconds"] < 4.8:  # 4 real examples, the fifth repeats the fourth
                assert np.array_equal(x[4], x[3])
    assert any(v["seconds"] < 5 for v in summary["subsets"]["s4"]["videos"])


def test_box_xml_matches_masks(data):
    out, summary, s4, ms3 = data
    for subset, recs in (("s4", s4), ("ms3", ms3)):
        xml_dir = out / "boxes" / layout.SUBSET_DIRS[subset]
        assert summary["subsets"][subset]["boxes"] == str(xml_dir)
        for r in recs:
            masks = {k: np.asarray(Image.open(p)) for k, p in zip(r.mask_frames, r.mask_paths)}
            boxes, src = boxes_for_video(r, (SIZE, SIZE), masks, xml_dir)
            assert src == ["xml"] * 5
            # the folder holding both subsets works too (pack's default: {root}/boxes)
            both, src = boxes_for_video(r, (SIZE, SIZE), masks, out / "boxes")
            assert src == ["xml"] * 5 and np.array_equal(both, boxes)
            for k, m in masks.items():
                assert tuple(boxes[k].tolist()) == box_from_mask(m)


def test_class_styles_are_distinct():
    looks = {(synth.class_style(c)["shape"], synth.class_style(c)["pattern"]) for c in range(23)}
    assert len(looks) == 23
    colours = [synth.class_colours(c) for c in range(23)]
    assert all(not (colours[a] & colours[b]) for a in range(23) for b in range(a))
    mains = [synth.class_bands(c)[0] for c in range(23)]
    seconds = [synth.class_bands(c)[1] for c in range(23)]
    assert len(set(mains)) == 23 and not set(mains) & set(seconds) and max(seconds) < 64


def test_deterministic_for_a_seed(data, tmp_path):
    out, *_ = data
    synth.generate(tmp_path / "again", videos=N, size=SIZE, subset="both", seed=3)
    first, second = tree_hashes(out), tree_hashes(tmp_path / "again")
    assert len(first) > 100 and first == second
    synth.generate(tmp_path / "other", videos=N, size=SIZE, subset="s4", seed=4)
    other = tree_hashes(tmp_path / "other")
    assert not set(other.items()) & set(first.items())


def test_cli_and_refuses_to_overwrite(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--videos", "3", "--size", "32", "--subset", "ms3", "--no-xml"]
    assert synth.main(argv) == 0
    recs = layout.read_ms3(tmp_path)
    assert [r.split for r in recs].count("train") == 1 and len(recs) == 3
    assert not (tmp_path / "boxes").exists() and not (tmp_path / "Single-source").exists()
    assert synth.main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert synth.main(argv + ["--force"]) == 0
    assert synth.main(["--out", str(tmp_path / "x"), "--videos", "2"]) == 2


def test_split_sizes_and_pool():
    assert synth.split_sizes(3) == {"train": 1, "val": 1, "test": 1}
    assert synth.split_sizes(100) == {"train": 70, "val": 15, "test": 15}
    assert len(synth.class_pool(1)) == 1 and len(synth.class_pool(21)) == 7
    assert synth.class_pool(1000) == list(range(23))
