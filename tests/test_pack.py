"""`avs-dist pack`: manifest contents, CSV order, atomic publishing, reruns, formats, workers."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from avs_dist.data import pack as pack_mod
from avs_dist.data.classes import S4_CLASSES
from avs_dist.data.layout import read_subset
from avs_dist.data.pack import PackError, main, pack
from avs_dist.data.shards import ShardError, iter_videos, read_manifest, verify_shards

QUIET = dict(progress=False, log=lambda *a, **k: None)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest(s4_shards, synth_root):
    m = read_manifest(s4_shards)
    assert m["schema_version"] == 2 and m["subset"] == "s4"
    assert m["classes"] == list(S4_CLASSES)
    assert m["options"]["crop_size"] == 32 and m["options"]["shard_videos"] == 4
    assert m["options"]["image_format"] == "npy" and m["options"]["boxes"].endswith("Single-source")
    assert m["skipped"] == []
    records = read_subset(synth_root, "s4")
    n_masks = sum(len(r.mask_paths) for r in records)
    assert m["masks_not_clean"] == {"count": 0, "of": n_masks, "files": []}  # synth masks are clean 0/255
    assert all(set(e) == {"file", "split", "videos", "keys", "sha256", "bytes"} for e in m["shards"])
    for split in ("train", "val", "test"):
        n = sum(r.split == split for r in records)
        entries = [e for e in m["shards"] if e["split"] == split]
        assert m["splits"][split] == {"videos": n, "shards": -(-n // 4)}
        assert [e["file"] for e in entries] == [f"{split}-{k:05d}.tar" for k in range(len(entries))]
        assert sum(e["videos"] for e in entries) == n
        for e in entries:
            assert e["sha256"] == _sha(s4_shards / e["file"]) and len(e["keys"]) == e["videos"]
    assert not list(s4_shards.glob("*.tmp"))


def test_complete_set_refused_then_overwritten_identically(synth_root, tmp_path):
    out = tmp_path / "s4"
    pack(synth_root, "s4", out, crop_size=16, shard_videos=4, **QUIET)
    before = {p.name: _sha(p) for p in out.glob("*.tar")}
    with pytest.raises(PackError, match="--overwrite"):
        pack(synth_root, "s4", out, crop_size=16, shard_videos=4, **QUIET)
    assert main(["--data-root", str(synth_root), "--subset", "s4", "--out", str(out), "--no-progress"]) == 1
    pack(synth_root, "s4", out, crop_size=16, shard_videos=4, overwrite=True, **QUIET)
    assert {p.name: _sha(p) for p in out.glob("*.tar")} == before  # same input -> same bytes


def test_interrupted_pack_never_looks_complete_and_rerun_finishes(synth_root, tmp_path, monkeypatch):
    out = tmp_path / "s4"
    out.mkdir()
    (out / "notes.txt").write_text("not ours")
    (out / "test-00007.tar").write_bytes(b"stale shard of an older run")
    (out / "manifest.json.tmp").write_text("{}")

    real = pack_mod._write_shard
    calls = []

    def crash_after_two(*args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        calls.append(args[1])
        return real(*args, **kw)

    monkeypatch.setattr(pack_mod, "_write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        pack(synth_root, "s4", out, crop_size=16, shard_videos=2, **QUIET)
    assert not (out / "manifest.json").exists()
    with pytest.raises(ShardError, match="incomplete"):
        read_manifest(out)

    monkeypatch.setattr(pack_mod, "_write_shard", real)
    m = pack(synth_root, "s4", out, crop_size=16, shard_videos=2, **QUIET)
    assert verify_shards(out)["ok"]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([e["file"] for e in m["shards"]] + ["manifest.json", "notes.txt"])
    assert len(list(iter_videos(out, "train"))) == m["splits"]["train"]["videos"] == 8


def test_workers_and_formats(synth_root, s4_shards, tmp_path):
    # Two worker processes write the same bytes as one process.
    out = tmp_path / "w2"
    assert main(["--data-root", str(synth_root), "--subset", "s4", "--out", str(out), "--crop-size", "32",
                 "--shard-videos", "4", "--workers", "2", "--no-progress"]) == 0
    assert {p.name: _sha(p) for p in out.glob("*.tar")} == {p.name: _sha(p) for p in s4_shards.glob("*.tar")}

    ref = {v["name"]: v for v in iter_videos(s4_shards, "val")}
    png = tmp_path / "png"
    pack(synth_root, "s4", png, crop_size=32, shard_videos=4, image_format="png", **QUIET)
    jpg = tmp_path / "jpg"
    pack(synth_root, "s4", jpg, crop_size=32, shard_videos=4, image_format="jpeg", jpeg_quality=90, **QUIET)
    for v in iter_videos(png, "val"):  # PNG is lossless
        np.testing.assert_array_equal(v["frames"], ref[v["name"]]["frames"])
        np.testing.assert_array_equal(v["crops"], ref[v["name"]]["crops"])
    for v in iter_videos(jpg, "val"):  # JPEG is close, not equal
        diff = np.abs(v["frames"].astype(int) - ref[v["name"]]["frames"])
        assert diff.mean() < 6 and diff.max() > 0
        np.testing.assert_array_equal(v["masks"], ref[v["name"]]["masks"])
    assert json.loads((jpg / "manifest.json").read_text())["options"]["jpeg_quality"] == 90


def test_bad_options(synth_root, tmp_path):
    with pytest.raises(PackError, match="image-format"):
        pack(synth_root, "s4", tmp_path / "x", image_format="webp", **QUIET)
    with pytest.raises(PackError, match="boxes"):
        pack(synth_root, "s4", tmp_path / "x", boxes=tmp_path / "nope", **QUIET)
    assert not (tmp_path / "x").exists()


def test_boxes_from_masks_without_xml(synth_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synth_root / "Single-source", root / "Single-source")
    out = tmp_path / "out"
    m = pack(root, "s4", out, crop_size=16, shard_videos=8, **QUIET)
    assert m["options"]["boxes"] is None
    train = next(iter_videos(out, "train"))
    assert train["box_source"] == ["mask"] + ["nearest_mask"] * 4  # S4 train: frame-1 mask only
    val = next(iter_videos(out, "val"))
    assert set(val["box_source"]) <= {"mask", "full_frame"}
