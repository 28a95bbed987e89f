"""Mask targets and frames exactly as the AVSBench reference loader reads them.

The oracle is the reference's own pipeline, called here: ``Image.open(p).convert('1')``
(S4) or ``.convert('P')`` (MS3), then torchvision's ``ToTensor``; frames
``Image.open(p).convert('RGB')``. Every PIL mode a mask or frame may come in is compared
pixel for pixel (bit for bit for the float targets), through pack, the shards and the loader.
"""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import ToTensor

from avs_dist.config import DataConfig
from avs_dist.data import synth
from avs_dist.data.layout import read_subset
from avs_dist.data.loader import eval_loader
from avs_dist.data.masks import mask_targets, stored_mask, target_lut
from avs_dist.data.pack import finalize_chunks, pack, pack_chunk
from avs_dist.data.shards import ShardError, iter_videos, read_manifest

QUIET = dict(progress=False, log=lambda *a, **k: None)
REF_MODE = {"s4": "1", "ms3": "P"}
S = 64


def reference_target(path, subset) -> torch.Tensor:
    """What the AVSBench loader trains and evaluates on: float32 [H, W]."""
    with Image.open(path) as im:
        return ToTensor()(im.convert(REF_MODE[subset]))[0]


def _object(size=S) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[20:20 + 16, 14:14 + 16] = synth._shape_mask("circle", 16)  # 200 pixels
    m[6:12, 40:58] = True
    return m


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _tiff(im: Image.Image) -> bytes:  # PIL opens by content: a .png path may hold any format
    buf = io.BytesIO()
    im.save(buf, format="TIFF")
    return buf.getvalue()


def _palette(img: Image.Image, colours: dict[int, tuple]) -> Image.Image:
    pal = [0] * 768
    for i, c in colours.items():
        pal[3 * i:3 * i + 3] = c
    img.putpalette(pal)
    return img


def _mask_cases() -> dict:
    """name -> (file bytes, clean for S4, clean for MS3)."""
    m = _object()
    u8 = np.where(m, 255, 0).astype(np.uint8)
    halo = u8.copy()
    halo[synth.halo_ring(m, 3)] = 3
    soft = np.asarray(Image.fromarray(u8).filter(ImageFilter.GaussianBlur(1.5)))
    ramp = np.tile(np.arange(256, dtype=np.uint8)[::4], (S, 1))
    rgb_white = np.repeat(u8[..., None], 3, axis=-1)
    red = np.zeros((S, S, 3), np.uint8)
    red[m] = (255, 0, 0)
    rgba = np.dstack([rgb_white, np.where(m, 255, 128).astype(np.uint8)])
    return {
        "L_clean": (_png(Image.fromarray(u8, "L")), True, True),
        "L_halo": (_png(Image.fromarray(halo, "L")), False, False),
        "L_soft_edges": (_png(Image.fromarray(soft, "L")), False, False),
        "L_ramp": (_png(Image.fromarray(ramp, "L")), False, False),
        "1": (_png(Image.fromarray(m)), True, True),
        "P_gray_0_255": (_png(_palette(Image.fromarray(u8, "P"), {255: (255, 255, 255)})), True, True),
        # black/white palette at indices 0/1: right for convert('1'), a 1/255 target for convert('P')
        "P_bw_0_1": (_png(_palette(Image.fromarray(m.astype(np.uint8), "P"), {1: (255, 255, 255)})), True, False),
        "P_colour": (_png(_palette(Image.fromarray(m.astype(np.uint8) * 7, "P"), {7: (200, 30, 30)})), False, False),
        "RGB_white": (_png(Image.fromarray(rgb_white, "RGB")), True, False),  # MS3: web palette index 215
        "RGB_red": (_png(Image.fromarray(red, "RGB")), False, False),
        "RGBA": (_png(Image.fromarray(rgba, "RGBA")), True, False),
        "LA": (_png(Image.fromarray(np.dstack([u8, np.full_like(u8, 200)]), "LA")), True, True),
        "I;16_0_65535": (_png(Image.fromarray(m.astype(np.uint16) * 65535)), True, True),
        "I;16_0_1": (_png(Image.fromarray(m.astype(np.uint16))), False, False),  # the reference sees no object
        "I_32bit_tiff": (_tiff(Image.fromarray(m.astype(np.int32) * 255, "I")), True, True),
        "F_float_tiff": (_tiff(Image.fromarray(soft.astype(np.float32), "F")), False, False),
    }


MASK_CASES = _mask_cases()


@pytest.mark.parametrize("subset", ["s4", "ms3"])
@pytest.mark.parametrize("case", list(MASK_CASES))
def test_stored_target_equals_reference_bit_for_bit(case, subset, tmp_path):
    data, clean_s4, clean_ms3 = MASK_CASES[case]
    path = tmp_path / "mask.png"
    path.write_bytes(data)
    with Image.open(path) as im:
        stored, soft = stored_mask(im, subset)
    want = reference_target(path, subset)
    got = mask_targets(torch.from_numpy(stored))
    assert got.dtype == torch.float32 and torch.equal(got, want), case
    assert (soft is None) == (clean_s4 if subset == "s4" else clean_ms3), (case, soft)
    if soft is not None:
        assert soft["pixels"] > 0 and len(soft["values"]) <= 8


def test_soft_cases_differ_from_nonzero_and_from_a_plain_threshold():
    """The cases above are hard: 'non-zero' and '>= 128' both get some of them wrong."""
    wrong_nonzero = wrong_threshold = 0
    for case, (data, _, _) in MASK_CASES.items():
        with Image.open(io.BytesIO(data)) as im:
            gray = np.asarray(im.convert("L"))
            ref = np.asarray(im.convert("1"))
        wrong_nonzero += not np.array_equal(gray != 0, ref)
        wrong_threshold += not np.array_equal(gray >= 128, ref)
    assert wrong_nonzero >= 5 and wrong_threshold >= 2


def test_target_lut_is_to_tensor_for_every_value():
    idx = np.tile(np.arange(256, dtype=np.uint8), (224, 1))  # a full 224 x 256 image
    im = Image.fromarray(idx, "P")
    want = ToTensor()(im.convert("P"))[0]
    x = torch.from_numpy(np.array(im))
    assert torch.equal(mask_targets(x), want)
    assert np.array_equal(mask_targets(idx), want.numpy())
    assert torch.equal(target_lut()[x.long()], want)
    assert torch.equal(x.to(torch.float32).div_(255), want)  # what the GPU path computes on the device
    with pytest.raises(TypeError, match="uint8"):
        mask_targets(x.float())


def test_issue_halo_case(roots, tmp_path, capsys):
    """Issue 11, case 2: an S4 test mask rewritten as a 0/255 object (200 pixels) with a
    3-pixel ring of value 3. Before: 428 foreground pixels (every non-zero pixel); the
    reference loader (and now pack) sees 200."""
    rec = next(r for r in read_subset(roots, "s4") if r.split == "test")
    m = np.zeros((S, S), bool)
    m[24:40, 24:40] = synth._shape_mask("circle", 16)
    values = np.where(m, 255, 0).astype(np.uint8)
    values[synth.halo_ring(m, 3)] = 3
    Image.fromarray(values, "L").save(rec.mask_paths[0])
    assert (values != 0).sum() == 428 and m.sum() == 200
    assert reference_target(rec.mask_paths[0], "s4").sum().item() == 200.0

    out = tmp_path / "out"
    logs = []
    manifest = pack(roots, "s4", out, crop_size=16, progress=False, log=logs.append)
    video = next(v for v in iter_videos(out, "test") if v["name"] == rec.name)
    target = mask_targets(video["masks"][0])
    assert target.sum() == 200 and np.array_equal(target, reference_target(rec.mask_paths[0], "s4").numpy())
    assert manifest["masks_not_clean"]["count"] == 1
    assert manifest["masks_not_clean"]["files"] == [{"file": str(rec.mask_paths[0]), "pixels": 228, "values": [3]}]
    assert any("1 of" in line and "not clean" in line and str(rec.mask_paths[0]) in line for line in logs)
    from avs_dist.data.inspect import main as inspect_main

    assert inspect_main([str(out)]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert f"1 of {manifest['masks_not_clean']['of']} masks are not clean" in shown and rec.name in shown


def _plant(roots, subset, names):
    """Overwrite one test mask per case with that case's file; returns {path: case}."""
    recs = [r for r in read_subset(roots, subset) if r.split != "train"]
    planted = {}
    for i, case in enumerate(names):
        rec = recs[i % len(recs)]
        path = rec.mask_paths[1 + i // len(recs)]
        path.write_bytes(MASK_CASES[case][0])
        planted[str(path)] = case
    return planted


@pytest.mark.parametrize("subset", ["s4", "ms3"])
def test_pack_and_loader_give_the_reference_targets(subset, roots, tmp_path):
    planted = _plant(roots, subset, list(MASK_CASES))
    out = tmp_path / "out"
    manifest = pack(roots, subset, out, crop_size=16, **QUIET)
    col = 1 if subset == "s4" else 2
    want_unclean = sorted(p for p, case in planted.items() if not MASK_CASES[case][col])
    assert sorted(f["file"] for f in manifest["masks_not_clean"]["files"]) == want_unclean
    assert manifest["masks_not_clean"]["count"] == len(want_unclean) >= 6

    cfg = DataConfig(image_size=S, crop_size=16, eval_batch_videos=2, num_workers=0)
    for split in ("val", "test"):
        recs = [r for r in read_subset(roots, subset) if r.split == split]
        for transport in ("uint8", "float"):
            for b in eval_loader(out, split, cfg, transport=transport):
                for i, index in enumerate(b["index"].tolist()):
                    for k, path in enumerate(recs[index].mask_paths):
                        assert torch.equal(b["masks"][i, k], reference_target(path, subset)), (path, transport)


def test_chunked_pack_records_the_same_not_clean_masks(roots, tmp_path):
    _plant(roots, "s4", ["L_halo", "L_soft_edges", "L_clean", "RGB_red"])
    one = pack(roots, "s4", tmp_path / "one", crop_size=16, shard_videos=2, **QUIET)
    out = tmp_path / "chunks"
    for i in range(3):
        pack_chunk(roots, "s4", out, i, 3, crop_size=16, shard_videos=2, **QUIET)
    final = finalize_chunks(roots, "s4", out, 3, shard_videos=2, log=lambda *a: None)
    assert final["masks_not_clean"] == one["masks_not_clean"] and one["masks_not_clean"]["count"] == 3
    assert final["shards"] == one["shards"]


def test_synth_halo_masks(tmp_path):
    root = tmp_path / "halo"
    summary = synth.generate(root, videos=6, size=48, seed=1, halo=3)
    for subset in ("s4", "ms3"):
        recs = read_subset(root, subset)
        haloed = [r for r, v in zip(recs, summary["subsets"][subset]["videos"]) if v["halo"]]
        assert 0 < len(haloed) < len(recs)
        m = pack(root, subset, tmp_path / f"out-{subset}", crop_size=16, **QUIET)["masks_not_clean"]
        assert m["count"] == sum(len(r.mask_paths) for r in haloed)
        assert all(f["values"] == [synth.HALO_VALUE] for f in m["files"])
        for r in haloed:
            t = reference_target(r.mask_paths[0], subset)
            if subset == "ms3":  # the ring is a 3/255 target there
                assert torch.isclose(t, torch.tensor(3 / 255)).any()
            else:
                assert set(t.unique().tolist()) == {0.0, 1.0}
    # the default output is clean
    plain = synth.generate(tmp_path / "plain", videos=3, size=32, seed=1, subset="ms3")
    assert all(v["halo"] == 0 for v in plain["subsets"]["ms3"]["videos"])
    rec = read_subset(tmp_path / "plain", "ms3")[0]
    assert set(reference_target(rec.mask_paths[0], "ms3").unique().tolist()) <= {0.0, 1.0}


def _frame_cases(frame: np.ndarray) -> dict:
    img = Image.fromarray(frame, "RGB")
    jpeg = io.BytesIO()
    img.convert("CMYK").save(jpeg, format="JPEG", quality=95)
    return {
        "P": _png(img.convert("P")),
        "L": _png(img.convert("L")),
        "LA": _png(img.convert("LA")),
        "RGBA": _png(img.convert("RGBA")),
        "1": _png(img.convert("1")),
        "I;16": _png(Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 200)),
        "CMYK_jpeg": jpeg.getvalue(),
    }


def test_frames_of_any_mode_read_as_convert_rgb(roots, tmp_path):
    recs = [r for r in read_subset(roots, "s4") if r.split == "val"]
    with Image.open(recs[0].frame_paths[0]) as im:
        cases = _frame_cases(np.asarray(im.convert("RGB")))
    planted = {}
    for i, (case, data) in enumerate(cases.items()):
        path = recs[i // 5 % len(recs)].frame_paths[i % 5]
        path.write_bytes(data)
        planted[path] = case
    out = tmp_path / "out"
    pack(roots, "s4", out, crop_size=16, **QUIET)
    videos = {v["name"]: v for v in iter_videos(out, "val")}
    for path, case in planted.items():
        rec = next(r for r in recs if path in r.frame_paths)
        with Image.open(path) as im:
            want = np.asarray(im.convert("RGB"))
        assert np.array_equal(videos[rec.name]["frames"][rec.frame_paths.index(path)], want), case


def test_schema_1_shards_are_refused_with_a_repack_hint(s4_shards, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(s4_shards, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["schema_version"] = 1
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="schema 1.*non-zero.*re-pack"):
        read_manifest(copy)
