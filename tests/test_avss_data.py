"""AVSBench-semantic data: `synth --subset avss` -> `pack --subset avss` -> iter_videos, exactly.

The oracles marked "reference" are transcriptions of OpenNLPLab/AVSBench
avs_scripts/avss/color_dataloader.py (get_v2_pallete, crop_resize_img, resize_img,
color_mask_to_label, load_image_in_PIL_to_Tensor / load_color_mask_in_PIL_to_Tensor without the
ToTensor) and avs_scripts/avss/torchvggish/vggish.py (_preprocess: zero padding to 10).
"""
from __future__ import annotations

import csv
import hashlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from avs_dist.avss import classes as avss_classes
from avs_dist.avss import layout as avss_layout
from avs_dist.avss.clips import AvssPackOptions, load_clip
from avs_dist.avss.resize import reference_resize
from avs_dist.data import synth
from avs_dist.data.audio import log_mel_examples, read_wav
from avs_dist.data.boxes import box_from_mask
from avs_dist.data.layout import LayoutError
from avs_dist.data.pack import PackError, finalize_chunks, pack, pack_chunk
from avs_dist.data.shards import iter_videos, read_manifest

CLIPS = 18  # 6 per set: 4 train / 1 val / 1 test
SIZE = 40  # frames 40 high, 50 wide
PACKED = 32  # packed side: train crops, val / test squash
QUIET = dict(progress=False, log=lambda *a, **k: None)


# ------------------------------------------------------------------ reference oracles (see module docstring)


def ref_palette(num_cls=71):
    pallete = [0] * (num_cls * 3)
    for j in range(0, num_cls):
        lab = j
        i = 0
        while lab > 0:
            pallete[j * 3 + 0] |= (((lab >> 0) & 1) << (7 - i))
            pallete[j * 3 + 1] |= (((lab >> 1) & 1) << (7 - i))
            pallete[j * 3 + 2] |= (((lab >> 2) & 1) << (7 - i))
            i = i + 1
            lab >>= 3
    return np.array(pallete).reshape(-1, 3)


def ref_crop_resize_img(crop_size, img, img_is_mask=False):
    outsize = crop_size
    short_size = outsize
    w, h = img.size
    if w > h:
        oh = short_size
        ow = int(1.0 * w * oh / h)
    else:
        ow = short_size
        oh = int(1.0 * h * ow / w)
    img = img.resize((ow, oh), Image.NEAREST if img_is_mask else Image.BILINEAR)
    w, h = img.size
    x1 = int(round((w - outsize) / 2.))
    y1 = int(round((h - outsize) / 2.))
    return img.crop((x1, y1, x1 + outsize, y1 + outsize))


def ref_resize_img(crop_size, img, img_is_mask=False):
    return img.resize((crop_size, crop_size), Image.NEAREST if img_is_mask else Image.BILINEAR)


def ref_color_mask_to_label(mask, v_pallete):
    mask_array = np.array(mask).astype('int32')
    semantic_map = []
    for colour in v_pallete:
        equality = np.equal(mask_array, colour)
        class_map = np.all(equality, axis=-1)
        semantic_map.append(class_map)
    semantic_map = np.stack(semantic_map, axis=-1).astype(np.float32)
    return np.argmax(semantic_map, axis=-1)


def ref_image(path, split, size, is_mask):
    img = Image.open(path).convert("RGB")
    return ref_crop_resize_img(size, img, is_mask) if split == "train" else ref_resize_img(size, img, is_mask)


def ref_audio(wav_path):
    """The reference's examples of a wav, zero-padded to 10 (vggish.py _preprocess)."""
    samples, rate = read_wav(wav_path)
    x = log_mel_examples(samples, rate)[:, 0]
    out = np.zeros((10, 96, 64), np.float32)
    out[: len(x)] = x
    return out, len(x)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def synth_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("avss_synth")
    summary = synth.generate(out, videos=CLIPS, size=SIZE, subset="avss", seed=1)
    return out, summary["subsets"]["avss"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, synth_out):
    out = tmp_path_factory.mktemp("avss_shards")
    pack(synth_out[0], "avss", out, image_size=PACKED, shard_videos=4, **QUIET)
    return out


def _tree(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ synth


def test_synth_writes_the_release_layout(synth_out, tmp_path):
    out, info = synth_out
    root = out / avss_layout.AVSS_DIR
    with open(root / "metadata.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["vid", "uid", "s_min", "s_sec", "a_obj", "split", "label"] and len(rows) == CLIPS + 1
    table = json.loads((root / "label2idx.json").read_text())
    assert list(table) == list(avss_classes.AVSS_CLASSES) and list(table.values()) == list(range(1, 72))
    assert list(table)[:2] == ["background", "accordion"] and table["woman"] == 71
    assert {s: sum(info["splits"][s].values()) for s in avss_layout.SETS} == {"v1s": 6, "v1m": 6, "v2": 6}
    pal = avss_classes.palette()
    for v in info["videos"]:
        d = root / v["set"] / v["name"]
        n = 10 if v["set"] == "v2" else 5
        assert v["num_frames"] == n
        assert sorted(p.name for p in (d / "frames").iterdir()) == sorted(f"{i}.jpg" for i in range(n))
        labelled = [0] if (v["set"], v["split"]) == ("v1s", "train") else list(range(n))
        for folder in ("labels_rgb", "labels_semantic"):
            assert sorted(p.name for p in (d / folder).iterdir()) == sorted(f"{i}.png" for i in labelled)
        assert Image.open(d / "frames" / "0.jpg").size == (SIZE * 5 // 4, SIZE)
        sounding = {avss_classes.AVSS_CLASSES.index(c) for c in v["sounding"]}
        seen = set()
        for i in labelled:
            sem = Image.open(d / "labels_semantic" / f"{i}.png")
            assert sem.mode == "P"
            index = np.asarray(sem)
            rgb = np.asarray(Image.open(d / "labels_rgb" / f"{i}.png"))
            assert np.array_equal(pal[index], rgb)  # the two mask files say the same
            seen |= set(np.unique(index).tolist()) - {0}
        assert seen == sounding  # only the sounding objects, each with its class
        assert len(read_wav(d / "audio.wav")[0]) == round(v["seconds"] * 16000)
    assert any(len(v["sounding"]) == 2 for v in info["videos"] if v["set"] == "v2")
    assert all(len(v["sounding"]) == 2 for v in info["videos"] if v["set"] == "v1m")
    assert all(len(v["sounding"]) == 1 for v in info["videos"] if v["set"] == "v1s")
    # twins: the same frames, another object sounding -> another mask: only the audio tells them apart
    by_scene = {}
    for v in info["videos"]:
        by_scene.setdefault((v["set"], v["scene"]), []).append(v)
    twins = [p for p in by_scene.values() if len(p) == 2]
    assert len(twins) >= 6
    for a, b in twins:
        assert a["sounding"] != b["sounding"]
        fa, fb = (root / v["set"] / v["name"] / "frames" / "0.jpg" for v in (a, b))
        assert fa.read_bytes() == fb.read_bytes()
        assert read_wav(root / a["set"] / a["name"] / "audio.wav")[0].tolist() != \
            read_wav(root / b["set"] / b["name"] / "audio.wav")[0].tolist()
    # deterministic by seed
    synth.generate(tmp_path / "again", videos=CLIPS, size=SIZE, subset="avss", seed=1)
    assert _tree(tmp_path / "again" / avss_layout.AVSS_DIR) == _tree(root)


# ------------------------------------------------------------------ pack -> iter_videos


def test_pack_round_trip_equals_the_reference_loader(synth_out, shards):
    out, info = synth_out
    root = out / avss_layout.AVSS_DIR
    m = read_manifest(shards)
    assert m["subset"] == "avss" and m["sets"] == ["v1s", "v1m", "v2"]
    assert m["classes"] == list(avss_classes.AVSS_CLASSES)
    assert m["options"]["image_size"] == PACKED and m["masks_not_clean"]["count"] == 0
    pal = ref_palette()
    for split in ("train", "val", "test"):
        expected = [v for v in info["videos"] if v["split"] == split]  # CSV order
        videos = list(iter_videos(shards, split))
        assert [v["name"] for v in videos] == [v["name"] for v in expected]
        assert m["splits"][split]["videos"] == len(expected)
        for i, (video, v) in enumerate(zip(videos, expected)):
            d = root / v["set"] / v["name"]
            n = v["num_frames"]
            assert video["index"] == i and video["set"] == v["set"] and video["split"] == split
            assert video["num_frames"] == n and video["vid"] == v["vid"]
            assert video["frames"].shape == (n, PACKED, PACKED, 3) and video["frames"].dtype == np.uint8
            for t in range(n):
                assert np.array_equal(video["frames"][t], np.asarray(ref_image(d / "frames" / f"{t}.jpg", split,
                                                                                PACKED, False)))
            labelled = [0] if (v["set"], split) == ("v1s", "train") else list(range(n))
            assert video["mask_frames"].dtype == np.int64 and video["mask_frames"].tolist() == labelled
            assert video["masks"].shape == (len(labelled), PACKED, PACKED) and video["masks"].dtype == np.uint8
            assert video["mask_source"] == "semantic"
            for mask, t in zip(video["masks"], labelled):
                # the reference's colour path ...
                colour = ref_color_mask_to_label(ref_image(d / "labels_rgb" / f"{t}.png", split, PACKED, True), pal)
                assert np.array_equal(mask, colour)
                # ... and the index masks, resized alike
                sem = reference_resize(Image.open(d / "labels_semantic" / f"{t}.png"), PACKED, split, True)
                assert np.array_equal(mask, np.asarray(sem))
            audio, n_examples = ref_audio(d / "audio.wav")
            assert video["audio"].dtype == np.float32 and video["audio"].shape == (n, 96, 64)
            assert np.array_equal(video["audio"], audio[:n]) and not audio[n:].any()
            assert video["audio_examples"] == n_examples
            boxes, cls, frames = [], [], []
            for mask, t in zip(video["masks"], labelled):
                for c in sorted(set(np.unique(mask).tolist()) - {0}):
                    boxes.append(box_from_mask(mask == c))
                    cls.append(c)
                    frames.append(t)
            assert video["object_boxes"].dtype == np.float32 and video["object_boxes"].shape == (len(boxes), 4)
            assert video["object_boxes"].tolist() == [list(b) for b in boxes]
            assert video["object_classes"].tolist() == cls and video["object_frames"].tolist() == frames
            assert video["object_classes"].dtype == np.int64 and video["object_frames"].dtype == np.int64
    # short clips: the examples the wav gives, then the reference's zeros
    short = [v for s in ("train", "val", "test") for v in iter_videos(shards, s)
             if v["audio_examples"] < v["num_frames"]]
    assert short and all(not v["audio"][v["audio_examples"]:].any() for v in short)


def test_colour_and_index_masks_agree(synth_out):
    """The labels_rgb path (the reference's) and the labels_semantic path give the same classes."""
    records = avss_layout.read_avss(synth_out[0])
    for rec in records:
        a, pa = load_clip(rec, AvssPackOptions(image_size=PACKED, masks="semantic"))
        b, pb = load_clip(rec, AvssPackOptions(image_size=PACKED, masks="rgb"))
        assert pa == pb == [] and a["mask_source"] == "semantic" and b["mask_source"] == "rgb"
        assert np.array_equal(a["masks"], b["masks"]) and np.array_equal(a["object_boxes"], b["object_boxes"])


def test_palette_colours_and_resize_against_the_reference():
    pal = avss_classes.palette()
    assert np.array_equal(pal, ref_palette()) and pal.dtype == np.uint8
    assert pal[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert len({tuple(c) for c in pal.tolist()}) == 71
    rng = np.random.default_rng(0)
    img = pal[rng.integers(0, 71, size=(23, 31))]
    img[rng.random((23, 31)) < 0.1] = [1, 2, 3]  # a colour of no class
    index, unknown = avss_classes.colour_to_index(img)
    assert np.array_equal(index, ref_color_mask_to_label(img, ref_palette()))
    assert unknown == int((img == [1, 2, 3]).all(-1).sum()) > 0
    assert np.array_equal(avss_classes.index_to_colour(index)[index > 0], img[index > 0])
    for w, h in ((50, 40), (40, 50), (45, 45), (301, 200), (33, 97), (57, 40), (40, 59)):  # last two: x.5 offsets
        src = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        for split in ("train", "val"):
            for is_mask in (False, True):
                ours = reference_resize(src, 32, split, is_mask)
                ref = ref_crop_resize_img(32, src, is_mask) if split == "train" else ref_resize_img(32, src, is_mask)
                assert ours.size == (32, 32) and np.array_equal(np.asarray(ours), np.asarray(ref))


# ------------------------------------------------------------------ sets, chunks, CLI


def test_sets_selection_cli_and_chunks(synth_out, tmp_path):
    from avs_dist.cli import main as cli

    out = synth_out[0]
    one = tmp_path / "one"
    assert cli(["pack", "--data-root", str(out), "--subset", "avss", "--sets", "v2,v1s", "--out", str(one),
                "--image-size", str(PACKED), "--shard-videos", "3", "--workers", "1", "--no-progress"]) == 0
    m = read_manifest(one)
    assert m["sets"] == ["v1s", "v2"] and m["options"]["sets"] == ["v1s", "v2"]
    videos = [v for s in ("train", "val", "test") for v in iter_videos(one, s)]
    assert {v["set"] for v in videos} == {"v1s", "v2"} and len(videos) == 12
    assert [v["index"] for v in iter_videos(one, "train")] == list(range(8))
    # two chunks + finalize: the same shards as one process
    chunked = tmp_path / "chunked"
    for k in range(2):
        pack_chunk(out, "avss", chunked, k, 2, image_size=PACKED, shard_videos=3, sets="v1s,v2", **QUIET)
    finalize_chunks(out, "avss", chunked, 2, shard_videos=3, log=lambda *a: None)
    mc = read_manifest(chunked)
    assert [(e["file"], e["sha256"]) for e in mc["shards"]] == [(e["file"], e["sha256"]) for e in m["shards"]]
    assert mc["sets"] == ["v1s", "v2"] and mc["classes"] == m["classes"]
    # PNG frames decode to the same pixels, 10 of them for a v2 clip
    png = tmp_path / "png"
    pack(out, "avss", png, image_size=PACKED, sets="v2", image_format="png", **QUIET)
    from_png, from_npy = list(iter_videos(png, "train")), [v for v in iter_videos(one, "train") if v["set"] == "v2"]
    assert len(from_png) == len(from_npy) == 4
    for a, b in zip(from_png, from_npy):
        assert a["frames"].shape[0] == 10 and np.array_equal(a["frames"], b["frames"])
    with pytest.raises(LayoutError, match="--sets v3"):
        pack(out, "avss", tmp_path / "x", sets="v3", **QUIET)
    with pytest.raises(PackError, match="--sets is for --subset avss"):
        pack(out, "s4", tmp_path / "x", sets="v1s", **QUIET)
    with pytest.raises(PackError, match="--boxes"):
        pack(out, "avss", tmp_path / "x", boxes=out, **QUIET)


# ------------------------------------------------------------------ bad input


def _copy(synth_out, tmp_path):
    root = tmp_path / "data" / avss_layout.AVSS_DIR
    shutil.copytree(synth_out[0] / avss_layout.AVSS_DIR, root)
    return root


def test_bad_clips_are_reported_with_their_files(synth_out, tmp_path):
    root = _copy(synth_out, tmp_path)
    vids = synth_out[1]["videos"]
    no_wav, no_frame, stray, no_sem = vids[0], vids[1], vids[2], vids[3]
    (root / no_wav["set"] / no_wav["name"] / "audio.wav").unlink()
    (root / no_frame["set"] / no_frame["name"] / "frames" / "3.jpg").unlink()
    # a colour of no class in a colour mask, read because the clip has no index masks -> class 0
    shutil.rmtree(root / stray["set"] / stray["name"] / "labels_semantic")
    rgb_path = root / stray["set"] / stray["name"] / "labels_rgb" / "0.png"
    rgb = np.array(Image.open(rgb_path))
    rgb[:3, :4] = [7, 7, 7]
    Image.fromarray(rgb).save(rgb_path)
    # neither mask file of a labelled frame
    (root / no_sem["set"] / no_sem["name"] / "labels_semantic" / "0.png").unlink()
    (root / no_sem["set"] / no_sem["name"] / "labels_rgb" / "0.png").unlink()
    with pytest.raises(PackError) as e:
        pack(root, "avss", tmp_path / "s", image_size=PACKED, **QUIET)
    msg = str(e.value)
    assert "3 of 18 avss videos are bad" in msg
    assert f"{root / no_wav['set'] / no_wav['name'] / 'audio.wav'}: audio not found" in msg
    assert f"{root / no_frame['set'] / no_frame['name'] / 'frames' / '3.jpg'}: frame not found" in msg
    assert f"{root / no_sem['set'] / no_sem['name'] / 'labels_rgb' / '0.png'}: mask not found" in msg
    assert not (tmp_path / "s").exists()
    m = pack(root, "avss", tmp_path / "s", image_size=PACKED, skip_bad=True, **QUIET)
    assert sorted(b["name"] for b in m["skipped"]) == sorted(v["name"] for v in (no_wav, no_frame, no_sem))
    assert m["masks_not_clean"]["count"] == 1
    entry = m["masks_not_clean"]["files"][0]
    assert entry["file"] == str(rgb_path) and entry["pixels"] == 12 and entry["values"] == [[7, 7, 7]]
    packed = next(v for s in ("train", "val", "test") for v in iter_videos(tmp_path / "s", s)
                  if v["name"] == stray["name"])
    assert packed["mask_source"] == "rgb"
    expected = ref_color_mask_to_label(ref_image(rgb_path, stray["split"], PACKED, True), ref_palette())
    assert np.array_equal(packed["masks"][0], expected)


def test_layout_errors_name_the_file(synth_out, tmp_path):
    root = _copy(synth_out, tmp_path)
    (root / "label2idx.json").unlink()
    with pytest.raises(LayoutError, match=r"label2idx\.json: not found"):
        pack(root, "avss", tmp_path / "s", **QUIET)
    table = {n: i + 1 for i, n in enumerate(avss_classes.AVSS_CLASSES[:70])}
    (root / "label2idx.json").write_text(json.dumps(table))
    with pytest.raises(LayoutError, match=r"70 classes .* expected each of 1\.\.71 once \(missing \[71\]\)"):
        pack(root, "avss", tmp_path / "s", **QUIET)
    with pytest.raises(LayoutError, match="no metadata.csv in"):
        pack(tmp_path / "nowhere", "avss", tmp_path / "s", **QUIET)
    # a row of another set; an empty a_obj is fine (the reference does not read it)
    (root / "label2idx.json").write_text(json.dumps({n: i + 1 for i, n in enumerate(avss_classes.AVSS_CLASSES)}))
    lines = (root / "metadata.csv").read_text().splitlines()
    first = lines[1].split(",")
    first[4] = ""
    lines[1] = ",".join(first)
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    assert len(avss_layout.read_avss(root)) == CLIPS
    lines[2] = lines[2].rsplit(",", 1)[0] + ",v3"
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(LayoutError, match=r"metadata\.csv: row 3: label 'v3' is not one of the sets"):
        avss_layout.read_avss(root)


# ------------------------------------------------------------------ config check, inspect


def test_config_and_shards_of_other_subsets_are_refused_with_the_pack_command(synth_out, shards, tmp_path):
    import shlex

    from avs_dist.config import ConfigError, load_config
    from avs_dist.launch.args import check_shards_fit

    cfg = load_config("tiny", [])
    with pytest.raises(ConfigError) as e:
        check_shards_fit(cfg, read_manifest(shards), None)
    msg = str(e.value)
    assert "holds avss videos but the config trains subset=s4" in msg and "--subset s4" in msg.split("`")[1]
    # an AVSS config on S4 shards gets the avss command, which packs the synthetic release
    cfg.subset = "avss"
    s4_manifest = {"subset": "s4", "options": {"data_root": str(synth_out[0])}}
    with pytest.raises(ConfigError) as e:
        check_shards_fit(cfg, s4_manifest, None)
    command = str(e.value).split("`")[1]
    assert "--subset avss" in command and "--sets v1s,v1m,v2" in command
    argv = shlex.split(command)[2:]
    argv[argv.index("--out") + 1] = str(tmp_path / "fits")
    from avs_dist.data.pack import main as pack_main

    assert pack_main([*argv, "--image-size", str(PACKED), "--workers", "1", "--no-progress"]) == 0
    check_shards_fit(cfg, read_manifest(tmp_path / "fits"), None)


def test_inspect_shows_the_colour_masks(shards, tmp_path, capsys):
    from avs_dist.cli import main as cli

    png = tmp_path / "clip.png"
    assert cli(["inspect", str(shards), "--split", "val", "--index", "0", "--save-png", str(png)]) == 0
    text = capsys.readouterr().out
    assert "sets=v1s,v1m,v2" in text and "sha256 OK" in text and "objects" in text
    video = next(iter_videos(shards, "val"))
    names = {avss_classes.AVSS_CLASSES[c] for c in np.unique(video["masks"]) if c}
    assert all(n in text for n in names)
    picture = np.asarray(Image.open(png).convert("RGB"))
    colours = {tuple(avss_classes.palette()[avss_classes.AVSS_CLASSES.index(n)].tolist()) for n in names}
    found = {tuple(p) for p in picture.reshape(-1, 3).tolist()}
    assert colours <= found  # the masks are drawn in their palette colours
