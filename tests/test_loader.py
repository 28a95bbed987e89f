"""Train / eval loaders with 2 ranks x 2 workers (rank and world size passed in, no process group)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from avs_dist.config import DataConfig
from avs_dist.config import ConfigError
from avs_dist.data.masks import mask_targets
from avs_dist.data.loader import TrainOrder, TrainStream, eval_loader, train_loader
from avs_dist.data.shards import iter_videos, read_manifest
from helpers import uint8_frames

WORLD = 2


def _cfg(**kw):
    base = dict(image_size=64, crop_size=32, batch_videos=3, eval_batch_videos=3, num_workers=2,
                prefetch_factor=2)
    return DataConfig(**{**base, **kw})





def _epoch(shards, cfg, seed=0, epoch=0, start_batch=0):
    return [list(train_loader(shards, cfg, r, WORLD, seed, epoch, start_batch)) for r in range(WORLD)]


@pytest.mark.parametrize("split", ["train", "val"])
def test_eval_every_video_exactly_once(s4_shards, split):
    cfg = _cfg(eval_batch_videos=2)
    n = read_manifest(s4_shards)["splits"][split]["videos"]
    seen = []
    for rank in range(WORLD):
        loader = eval_loader(s4_shards, split, cfg, rank, WORLD)
        batches = list(loader)
        assert len(batches) == len(loader)
        for b in batches:
            assert 1 <= len(b["index"]) <= 2 and b["frames"].shape[1:] == (5, 3, 64, 64)
            assert not b["hflip"].any()
            seen += b["index"].tolist()
    assert sorted(seen) == list(range(n))

    ref = {v["index"]: v for v in iter_videos(s4_shards, split)}
    b = next(iter(eval_loader(s4_shards, split, cfg, 1, WORLD)))
    for i, idx in enumerate(b["index"].tolist()):
        np.testing.assert_array_equal(uint8_frames(b["frames"][i]), ref[idx]["frames"])
        np.testing.assert_array_equal(uint8_frames(b["crops"][i]), ref[idx]["crops"])
        assert b["name"][i] == ref[idx]["name"] and b["label"][i] == ref[idx]["label"]
        np.testing.assert_array_equal(b["audio"][i, :, 0].numpy(), ref[idx]["audio"])


def test_train_epoch_covers_all_with_equal_counts(s4_shards):
    cfg = _cfg()
    manifest = read_manifest(s4_shards)
    n = manifest["splits"]["train"]["videos"]
    steps = TrainOrder.from_shards(s4_shards, 0, WORLD * cfg.batch_videos).steps_per_epoch
    assert steps == math.ceil(n / (WORLD * cfg.batch_videos)) == 2
    per_rank = _epoch(s4_shards, cfg)
    assert [len(b) for b in per_rank] == [steps] * WORLD
    assert all(len(train_loader(s4_shards, cfg, r, WORLD, 0, 0)) == steps for r in range(WORLD))
    seen = [i for batches in per_rank for b in batches for i in b["index"].tolist()]
    assert len(seen) == steps * WORLD * cfg.batch_videos
    assert set(seen) == set(range(n))  # every video at least once; the rest wraps around
    b = per_rank[0][0]
    assert b["frames"].shape == (3, 5, 3, 64, 64) and b["frames"].dtype == torch.float32
    assert b["masks"].shape == (3, 5, 64, 64) and b["crops"].shape == (3, 5, 3, 32, 32)
    assert b["audio"].shape == (3, 5, 1, 96, 64) and b["label"].dtype == torch.int64
    # S4 train has a mask for frame 1 only
    assert b["mask_valid"].tolist() == [[True, False, False, False, False]] * 3
    assert b["masks"][:, 1:].abs().sum() == 0 and b["masks"][:, 0].sum() > 0


def _signature(per_rank):
    return [[(b["index"].tolist(), b["hflip"].tolist()) for b in batches] for batches in per_rank]


def test_train_deterministic_and_shuffled(s4_shards):
    cfg = _cfg(batch_videos=2)
    a, b = _epoch(s4_shards, cfg, seed=5, epoch=1), _epoch(s4_shards, cfg, seed=5, epoch=1)
    assert _signature(a) == _signature(b)
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x["frames"], y["frames"]) and torch.equal(x["masks"], y["masks"])
    orders = {str(_signature(_epoch(s4_shards, cfg, seed=5, epoch=e))) for e in range(4)}
    assert len(orders) > 1  # epochs differ
    flat = [i for batches in a for bt in batches for i in bt["index"].tolist()]
    assert flat != sorted(flat)


@pytest.mark.parametrize("start", [1, 2, 3])
def test_start_batch_resumes_exactly(s4_shards, start):
    cfg = _cfg(batch_videos=1)  # 4 batches per rank over 2 workers: resumes at both worker phases
    full = _epoch(s4_shards, cfg, seed=3, epoch=2)
    resumed = _epoch(s4_shards, cfg, seed=3, epoch=2, start_batch=start)
    assert _signature(resumed) == [s[start:] for s in _signature(full)]
    for r in range(WORLD):
        assert len(train_loader(s4_shards, cfg, r, WORLD, 3, 2, start)) == len(full[r]) - start
        for x, y in zip(resumed[r], full[r][start:]):
            assert torch.equal(x["frames"], y["frames"]) and torch.equal(x["crops"], y["crops"])


def test_flip_is_consistent(s4_shards):
    cfg = _cfg(batch_videos=2)
    ref = {v["index"]: v for v in iter_videos(s4_shards, "train")}
    flipped = unflipped = 0
    for batches in _epoch(s4_shards, cfg, seed=1, epoch=0) + _epoch(s4_shards, cfg, seed=1, epoch=1):
        for b in batches:
            for i, idx in enumerate(b["index"].tolist()):
                v = ref[idx]
                frames, crops, mask = v["frames"], v["crops"], v["masks"][0]
                if b["hflip"][i]:
                    frames, crops, mask = frames[:, :, ::-1], crops[:, :, ::-1], mask[:, ::-1]
                    flipped += 1
                else:
                    unflipped += 1
                np.testing.assert_array_equal(uint8_frames(b["frames"][i]), frames)
                np.testing.assert_array_equal(uint8_frames(b["crops"][i]), crops)
                np.testing.assert_array_equal(b["masks"][i, 0].numpy(), mask_targets(mask))
    assert flipped and unflipped
    cfg.hflip = False
    assert not any(b["hflip"].any() for batches in _epoch(s4_shards, cfg) for b in batches)


def test_resize_and_ms3_masks(ms3_shards):
    cfg = _cfg(image_size=48, crop_size=24, num_workers=0)
    b = next(iter(eval_loader(ms3_shards, "val", cfg)))
    assert b["frames"].shape[-2:] == (48, 48) and b["crops"].shape[-2:] == (24, 24)
    assert b["masks"].shape[-2:] == (48, 48) and set(b["masks"].unique().tolist()) <= {0.0, 1.0}
    assert b["mask_valid"].all() and (b["label"] == -1).all()
    t = next(iter(train_loader(ms3_shards, cfg, 0, 1, 0, 0)))
    assert t["mask_valid"].all() and t["frames"].shape == (3, 5, 3, 48, 48)


def test_uint8_transport_matches_contract(s4_shards):
    cfg = _cfg(batch_videos=2, image_size=48, crop_size=24)
    ref = _epoch(s4_shards, cfg, seed=2, epoch=0)[1]
    dev = list(train_loader(s4_shards, cfg, 1, WORLD, 2, 0, device="cpu"))
    assert len(dev) == len(ref)
    for x, y in zip(dev, ref):
        assert x["index"].tolist() == y["index"].tolist() and x["hflip"].tolist() == y["hflip"].tolist()
        for k in ("frames", "crops", "masks"):
            assert x[k].dtype == torch.float32 and x[k].shape == y[k].shape
        torch.testing.assert_close(x["frames"], y["frames"], atol=0.05, rtol=0)  # uint8 rounding after resize
        torch.testing.assert_close(x["masks"], y["masks"])
    same = next(iter(eval_loader(s4_shards, "val", _cfg(), device="cpu")))
    want = next(iter(eval_loader(s4_shards, "val", _cfg())))
    torch.testing.assert_close(same["frames"], want["frames"], atol=1e-5, rtol=0)
    torch.testing.assert_close(same["crops"], want["crops"], atol=1e-5, rtol=0)


def test_bench_data_smoke(s4_shards, synth_root, tmp_path):
    import json

    from avs_dist.data.bench import LOADERS, main as bench_main

    out = tmp_path / "bench.json"
    assert bench_main(["--data-root", str(synth_root), "--shards", str(s4_shards), "--videos", "4",
                       "--workers", "0", "--rounds", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["videos"] == 4 and result["machine"]["torch"] == torch.__version__
    for k in LOADERS:
        assert result[k]["videos"] == 4 and result[k]["videos_per_cpu_s"] > 0
    assert set(result["ratio_vs_per_file"]) == set(LOADERS) - {"per_file"}
    assert result["ratio_vs_per_file"]["reference_like"]["per_core"] > 0


def _same_batches(xs, ys, keys=("frames", "masks", "mask_valid", "audio", "label", "index", "hflip")):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x["name"] == y["name"]
        for k in keys:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("num_workers", [2, 3])
def test_endless_stream_equals_epoch_loaders(s4_shards, num_workers):
    """One loader (one set of workers) across epochs gives exactly the batches of separate
    one-epoch loaders, also when it starts mid-epoch."""
    import itertools

    cfg = _cfg(batch_videos=1, num_workers=num_workers)  # 4 batches per rank and epoch
    seed, rank, start = 7, 1, 2
    want = []
    for e, first in ((4, start), (5, 0), (6, 0)):
        want += list(train_loader(s4_shards, cfg, rank, WORLD, seed, e, first))
    got = list(train_loader(s4_shards, cfg, rank, WORLD, seed, 4, start, steps=10))
    assert len(train_loader(s4_shards, cfg, rank, WORLD, seed, 4, start, steps=10)) == 10
    _same_batches(got, want)
    endless = train_loader(s4_shards, cfg, rank, WORLD, seed, 4, start, endless=True)
    with pytest.raises(TypeError):
        len(endless)
    it = iter(endless)
    _same_batches(list(itertools.islice(it, 10)), want)
    del it
    with pytest.raises(ValueError, match="step 4 is not in"):
        train_loader(s4_shards, cfg, rank, WORLD, seed, 4, 4)
    with pytest.raises(ValueError, match="steps >= 1 or endless"):
        train_loader(s4_shards, cfg, rank, WORLD, seed, 4, steps=3, endless=True)


def _global_batches(shards, cfg, world, grad_accum, steps, seed=11, epoch=0, step=0):
    """Per optimizer step: the names of the videos every rank trains on, micro-steps in order."""
    per_rank = [list(train_loader(shards, cfg, r, world, seed, epoch, step, grad_accum=grad_accum, global_batch=4,
                                  steps=steps)) for r in range(world)]
    out = []
    for k in range(steps):
        micro = [per_rank[r][k * grad_accum + m] for m in range(grad_accum) for r in range(world)]
        out.append([(n, bool(f)) for b in micro for n, f in zip(b["name"], b["hflip"].tolist())])
    return out


def test_global_batches_do_not_depend_on_ranks_or_workers(s4_shards):
    """Elastic determinism: a fixed global batch (4 videos) is the same sequence of videos and
    flips for 1, 2 or 4 ranks, grad_accum 1 or 2, and 0, 1 or 3 loader workers."""
    steps = 5  # crosses the epoch boundary (8 videos: 2 steps per epoch)
    want = _global_batches(s4_shards, _cfg(num_workers=0), 1, 1, steps)
    names = [n for step in want[:2] for n, _ in step]
    assert sorted(names) == sorted(v["name"] for v in iter_videos(s4_shards, "train", crops=False))
    assert want[2] != want[0]  # the next epoch is drawn anew
    for world, accum, workers in [(2, 1, 1), (4, 1, 0), (2, 2, 3), (1, 4, 2), (4, 1, 3)]:
        got = _global_batches(s4_shards, _cfg(num_workers=workers), world, accum, steps)
        assert got == want, (world, accum, workers)
    with pytest.raises(ConfigError, match="does not split into 3 ranks"):
        train_loader(s4_shards, _cfg(), 0, 3, 0, global_batch=4)


def test_train_stream_resumes_on_another_world_size(s4_shards):
    """A position saved by 4 ranks continues on 2 (and 2 -> 4) with the same global batches."""
    cfg = _cfg(num_workers=1, global_batch_videos=4)

    def run(world, state, steps):
        streams = [TrainStream(s4_shards, cfg, r, world, seed=3) for r in range(world)]
        if state is not None:
            for s in streams:
                s.load_state_dict(state)
        seen = []
        for _ in range(steps):
            parts = [s.next_step() for s in streams]
            assert len({(p.epoch, p.epoch_end) for p in parts}) == 1
            seen.append((parts[0].epoch, sorted(n for p in parts for b in p.micro for n in b["name"])))
        states = [s.state_dict() for s in streams]
        assert all(st == states[0] for st in states)
        return seen, states[0]

    full, _ = run(4, None, 5)
    for first, second in ((4, 2), (2, 4)):
        head, state = run(first, None, 3)
        assert state == {"epoch": 1, "step_in_epoch": 1, "last_epoch": 1, "seed": 3, "global_batch_videos": 4,
                         "train_videos": 8}
        tail, _ = run(second, state, 2)
        assert head + tail == full
    stream = TrainStream(s4_shards, _cfg(num_workers=0, global_batch_videos=8), 0, 2, seed=3)
    with pytest.raises(ValueError, match="set data.global_batch_videos=4"):
        stream.load_state_dict(state)


def test_crops_false_reads_no_crops(s4_shards):
    from avs_dist.data.shards import iter_raw, split_shards

    paths = [e["path"] for e in split_shards(s4_shards, "train")]
    raw = next(iter(iter_raw(paths, crops=False)))
    assert "frames.npy" in raw and not any(k.startswith("crop") for k in raw)
    v = next(iter_videos(s4_shards, "train", crops=False))
    assert "crops" not in v and v["frames"].shape == (5, 64, 64, 3)

    cfg = _cfg(batch_videos=2)
    with_crops = list(train_loader(s4_shards, cfg, 0, WORLD, 1, 0))
    without = list(train_loader(s4_shards, cfg, 0, WORLD, 1, 0, crops=False))
    assert all(b["crops"] is None for b in without)
    _same_batches(without, with_crops)  # same order, flips and values: crops change nothing else
    ev = list(eval_loader(s4_shards, "val", cfg, crops=False, device="cpu"))
    assert ev and all(b["crops"] is None and b["frames"].dtype == torch.float32 for b in ev)


def test_uint8_then_to_device_equals_float_collate(s4_shards):
    """The uint8 batch (what workers send) normalised by to_device equals the batch the
    workers would normalise themselves, flips included."""
    from avs_dist.data.loader import collate, to_device

    videos = list(iter_videos(s4_shards, "train"))[:4]
    for i, v in enumerate(videos):
        v["hflip"] = i % 2 == 0
    want = collate(videos, 64, 32, normalize=True)
    raw = collate(videos, 64, 32, normalize=False)
    assert raw["frames"].dtype == raw["crops"].dtype == raw["masks"].dtype == torch.uint8
    got = to_device(raw, "cpu")
    for k in ("frames", "crops", "masks"):
        assert got[k].dtype == torch.float32 and got[k].is_contiguous()
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)
    for k in ("mask_valid", "audio", "label", "index", "hflip"):
        assert torch.equal(got[k], want[k])
    # the loader's CPU batches (uint8 from the workers) equal workers normalising in float
    cfg = _cfg()
    a = list(eval_loader(s4_shards, "val", cfg))
    b = list(eval_loader(s4_shards, "val", cfg, transport="float"))
    for x, y in zip(a, b):
        for k in ("frames", "crops", "masks"):
            torch.testing.assert_close(x[k], y[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("world, workers", [(1, 0), (3, 2), (5, 1), (8, 0), (12, 2)])
def test_eval_every_video_once_on_any_world_size(s4_shards, world, workers):
    """Any number of ranks (nodes x tasks), more ranks than videos included: every video of the
    split exactly once, and a rank with nothing to do yields no batch."""
    cfg = _cfg(eval_batch_videos=2, num_workers=workers)
    n = read_manifest(s4_shards)["splits"]["train"]["videos"]
    seen = []
    for rank in range(world):
        loader = eval_loader(s4_shards, "train", cfg, rank, world)
        batches = list(loader)
        assert len(batches) == len(loader)
        seen += [i for b in batches for i in b["index"].tolist()]
    assert sorted(seen) == list(range(n))
