"""Round trip synth -> pack -> iter_videos, manifest reading, sha256 verification, inspect."""
from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from avs_dist.data.classes import class_index
from avs_dist.data.layout import read_subset
from avs_dist.data.masks import mask_targets
from avs_dist.data.shards import ShardError, check_shards, iter_videos, read_manifest, verify_shards


def _png_rgb(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _reference_target(path, subset):
    """The AVSBench loader's mask target: PIL convert('1') (S4) / convert('P') (MS3), then ToTensor."""
    from torchvision.transforms import ToTensor

    with Image.open(path) as im:
        return ToTensor()(im.convert("1" if subset == "s4" else "P"))[0].numpy()


def _pkl(path):
    with open(path, "rb") as f:  # the AVSBench reference reads its .pkl exactly like this
        return np.asarray(pickle.load(f), dtype=np.float32)


@pytest.mark.parametrize("subset", ["s4", "ms3"])
def test_round_trip_bit_identical(subset, synth_root, request):
    shards = request.getfixturevalue(f"{subset}_shards")
    records = read_subset(synth_root, subset)
    for split in ("train", "val", "test"):
        expected = [r for r in records if r.split == split]
        videos = list(iter_videos(shards, split))
        assert [v["name"] for v in videos] == [r.name for r in expected]  # CSV order
        for i, (v, r) in enumerate(zip(videos, expected)):
            assert v["index"] == i and v["split"] == split and v["row"] == r.row
            assert v["category"] == r.category and v["label"] == class_index(r.category)
            assert v["frames"].dtype == np.uint8 and v["frames"].shape == (5, 64, 64, 3)
            np.testing.assert_array_equal(v["frames"], np.stack([_png_rgb(p) for p in r.frame_paths]))
            assert v["masks"].dtype == np.uint8 and set(np.unique(v["masks"])) <= {0, 255}  # synth: clean
            np.testing.assert_array_equal(mask_targets(v["masks"]),
                                          np.stack([_reference_target(p, subset) for p in r.mask_paths]))
            assert v["mask_frames"].tolist() == r.mask_frames
            assert v["mask_frames"].dtype == np.int64
            assert v["audio"].dtype == np.float32 and v["audio"].shape == (5, 96, 64)
            np.testing.assert_array_equal(v["audio"], _pkl(r.logmel_path)[:, 0])
            assert v["audio_source"] == "pkl"
            assert v["boxes"].dtype == np.float32 and v["boxes"].shape == (5, 4)
            assert v["box_source"] == ["xml"] * 5
            assert v["crops"].dtype == np.uint8 and v["crops"].shape == (5, 32, 32, 3)
    assert [v["label"] for v in iter_videos(shards, "train")][0] == (-1 if subset == "ms3" else
                                                                      class_index(records[0].category))


def test_crops_follow_boxes(s4_shards):
    v = next(iter_videos(s4_shards, "val"))
    for frame, box, crop in zip(v["frames"], v["boxes"], v["crops"]):
        x0, y0, x1, y1 = (float(b) for b in box)
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        want = np.asarray(Image.fromarray(frame).resize((32, 32), Image.BILINEAR, box=(x0, y0, x1, y1)))
        np.testing.assert_array_equal(crop, want)
        # the crop is the box region, not the whole frame
        whole = np.asarray(Image.fromarray(frame).resize((32, 32), Image.BILINEAR))
        assert not np.array_equal(crop, whole)


def test_verify_and_corruption(s4_shards, tmp_path):
    assert verify_shards(s4_shards)["ok"]
    copy = tmp_path / "copy"
    shutil.copytree(s4_shards, copy)
    target = copy / "train-00001.tar"
    data = bytearray(target.read_bytes())
    data[2000] ^= 0xFF
    target.write_bytes(bytes(data))
    report = verify_shards(copy)
    assert not report["ok"] and len(report["problems"]) == 1
    assert "train-00001.tar" in report["problems"][0] and "sha256" in report["problems"][0]
    (copy / "val-00000.tar").unlink()
    report = verify_shards(copy)
    assert any("val-00000.tar" in p and "missing" in p for p in report["problems"])

    from avs_dist.data.inspect import main as inspect_main
    assert inspect_main([str(copy)]) == 1


def test_missing_manifest_is_incomplete(s4_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(s4_shards, copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ShardError, match="incomplete"):
        read_manifest(copy)
    with pytest.raises(ShardError):
        list(iter_videos(copy, "train"))


def test_inspect_ok_and_png(s4_shards, tmp_path, capsys):
    from avs_dist.data.inspect import main as inspect_main

    out = tmp_path / "strip.png"
    assert inspect_main([str(s4_shards), "--split", "val", "--save-png", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sha256 OK" in text and "train" in text
    with Image.open(out) as im:  # 5 frames x 3 rows of 64 px panels, enlarged, titled and captioned
        w, h = im.size
        assert w >= 5 * 160 and h >= 3 * 160 + 4 * 13
        band = np.asarray(im.convert("L"))[:20]  # the column titles ("frame 1".."frame 5") on a dark band
        assert (band > 200).sum() > 100 and (band < 40).mean() > 0.5


def test_check_shards_names_every_bad_file(s4_shards, tmp_path):
    """What train / eval / submit run before starting: presence and size (one stat per shard),
    sha256 on request."""
    copy = tmp_path / "copy"
    shutil.copytree(s4_shards, copy)
    n = len(read_manifest(copy)["shards"])
    assert check_shards(copy) == n and check_shards(copy, sha256=True) == n
    assert check_shards(copy, splits="val") == read_manifest(copy)["splits"]["val"]["shards"]

    flipped = copy / "train-00001.tar"  # same size: only the checksum sees it
    data = bytearray(flipped.read_bytes())
    data[2000] ^= 0xFF
    flipped.write_bytes(bytes(data))
    assert check_shards(copy) == n
    truncated = copy / "train-00000.tar"
    size = truncated.stat().st_size
    truncated.write_bytes(truncated.read_bytes()[: size // 2])
    grown = copy / "val-00000.tar"
    grown_size = grown.stat().st_size
    grown.write_bytes(grown.read_bytes() + b"\0" * 512)
    (copy / "test-00000.tar").unlink()

    with pytest.raises(ShardError) as err:
        check_shards(copy)
    msg = str(err.value)
    assert "3 of the" in msg and "presence and size" in msg
    assert f"{truncated}: truncated: {size // 2} bytes, manifest says {size}" in msg
    assert f"{grown}: {grown_size + 512} bytes, manifest says {grown_size}" in msg
    assert f"{copy / 'test-00000.tar'}: missing" in msg and "train-00001.tar" not in msg
    with pytest.raises(ShardError) as err:
        check_shards(copy, sha256=True)
    assert "4 of the" in str(err.value) and f"{flipped}: sha256" in str(err.value)
    with pytest.raises(ShardError) as err:  # only the splits the run reads
        check_shards(copy, splits=("train",))
    assert "train-00000.tar" in str(err.value) and "val-00000" not in str(err.value)
    with pytest.raises(ShardError, match="unknown split 'dev'"):
        check_shards(copy, splits=("dev",))
    (copy / "manifest.json").unlink()
    with pytest.raises(ShardError, match="incomplete"):
        check_shards(copy)
