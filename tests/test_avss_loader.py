"""AVSBench-semantic batches from the loader: 5- and 10-frame clips, bucketed by length or mixed
and padded (data.avss_batching), with the global batches a function of (seed, epoch, G) only."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from avs_dist.avss.batches import REFERENCE_FRAMES, collate_clips, reference_padding
from avs_dist.avss.metrics import SemanticEvaluator, batch_state, padding_state
from avs_dist.config import ConfigError, DataConfig
from avs_dist.data.loader import TrainOrder, TrainStream, collate, eval_loader, to_device, train_loader
from avs_dist.data.shards import ShardError, iter_videos, read_manifest
from helpers import uint8_frames

G = 6  # splits over 1, 2 and 3 ranks
MODES = ("bucket", "pad")


def _cfg(mode, **kw):
    base = dict(image_size=32, crop_size=32, global_batch_videos=G, eval_batch_videos=2, num_workers=0,
                prefetch_factor=2, avss_batching=mode)
    return DataConfig(**{**base, **kw})





def _lengths(shards, split="train"):
    return {v["name"]: v["num_frames"] for v in iter_videos(shards, split)}


def _global_batches(shards, mode, world, workers, steps, seed=4):
    """Per optimizer step: [(name, flip)] over the ranks in position order, and each micro-batch's T."""
    cfg = _cfg(mode, num_workers=workers)
    per_rank = [list(train_loader(shards, cfg, r, world, seed, steps=steps)) for r in range(world)]
    out = []
    for k in range(steps):
        parts = [per_rank[r][k] for r in range(world)]
        out.append(([(n, bool(f)) for b in parts for n, f in zip(b["name"], b["hflip"].tolist())],
                    [b["frames"].shape[1] for b in parts]))
    return out


def test_train_order_buckets_and_frames(avss_shards):
    lengths = _lengths(avss_shards)
    assert sorted(lengths.values()) == [5] * 14 + [10] * 7
    m = read_manifest(avss_shards)
    assert [n for e in m["shards"] if e["split"] == "train" for n in e["num_frames"]] == list(lengths.values())
    bucket = TrainOrder.from_shards(avss_shards, 4, G, bucket=True)
    pad = TrainOrder.from_shards(avss_shards, 4, G, bucket=False)
    assert bucket.steps_per_epoch == 3 + 2 and pad.steps_per_epoch == 4  # ceil(14/6) + ceil(7/6); ceil(21/6)
    frames = np.asarray(bucket.lengths)
    for e in range(3):
        videos, flips = bucket.epoch(e)
        assert len(videos) == len(flips) == 5 * G
        steps = videos.reshape(5, G)
        assert all(len(set(frames[s])) == 1 for s in steps)  # one length per global batch
        short = [s for s in steps if frames[s[0]] == 5]
        assert len(short) == 3 and set(np.concatenate(short)) == set(np.flatnonzero(frames == 5))
        # within a bucket: the epoch's order, wrapping to its first clips
        order = np.random.default_rng([4, e, 0]).permutation(len(frames))
        want = [i for i in order if frames[i] == 10]
        assert [int(i) for s in steps if frames[s[0]] == 10 for i in s] == want + want[:5]
        assert [bucket.step_frames(e * 5 + k) for k in range(5)] == [int(frames[s].sum()) for s in steps]
    assert [bucket.epoch(e)[0].tolist() for e in range(2)] != [bucket.epoch(e)[0].tolist() for e in (1, 0)]
    # pad: the plain rule; S4 counts 5 frames per video
    videos, _ = pad.epoch(1)
    order = np.random.default_rng([4, 1, 0]).permutation(21)
    assert videos.tolist() == order[np.arange(4 * G) % 21].tolist()
    assert pad.step_frames(4 + 2) == int(frames[videos[2 * G:3 * G]].sum())


@pytest.mark.parametrize("mode", MODES)
def test_global_batches_do_not_depend_on_ranks_or_workers(avss_shards, mode):
    """The same clips, flips and lengths per optimizer step for 1, 2 or 3 ranks and 0 or 2
    workers, across an epoch boundary; bucketed steps hold one length, padded ones run at
    the longest clip of each rank's micro-batch."""
    lengths = _lengths(avss_shards)
    steps = 7  # bucket: 5 per epoch; pad: 4
    want = _global_batches(avss_shards, mode, 1, 0, steps)
    for world, workers in ((2, 2), (3, 0), (3, 2)):
        got = _global_batches(avss_shards, mode, world, workers, steps)
        assert [g[0] for g in got] == [w[0] for w in want], (world, workers)
        for names, ts in got:
            micro = [names[r * G // world:(r + 1) * G // world] for r in range(world)]
            assert ts == [max(lengths[n] for n, _ in m) for m in micro]
    per_step = [{lengths[n] for n, _ in names} for names, _ in want]
    if mode == "bucket":
        assert all(len(s) == 1 for s in per_step) and {5} in per_step and {10} in per_step
    else:
        assert any(len(s) == 2 for s in per_step)  # mixed, padded
    first_epoch = {n for names, _ in want[:5 if mode == "bucket" else 4] for n, _ in names}
    assert first_epoch == set(lengths)


@pytest.mark.parametrize("mode", MODES)
def test_stream_resumes_on_another_world_size(avss_shards, mode):
    """An endless stream saved by 3 ranks continues on 2 with the global batches of the run
    that was not interrupted, and the batching is part of the position."""
    cfg = _cfg(mode)

    def run(world, state, steps):
        streams = [TrainStream(avss_shards, cfg, r, world, seed=9) for r in range(world)]
        for s in streams:
            if state is not None:
                s.load_state_dict(state)
        seen = []
        for _ in range(steps):
            parts = [s.next_step() for s in streams]
            seen.append((parts[0].epoch, [(n, bool(f)) for p in parts for b in p.micro
                                          for n, f in zip(b["name"], b["hflip"].tolist())]))
        return seen, streams[0].state_dict()

    full, _ = run(1, None, 7)
    head, state = run(3, None, 3)
    assert state["avss_batching"] == mode and state["global_batch_videos"] == G
    tail, _ = run(2, state, 4)
    assert head + tail == full
    other = TrainStream(avss_shards, _cfg("pad" if mode == "bucket" else "bucket"), 0, 1, seed=9)
    with pytest.raises(ConfigError, match=f"data.avss_batching='{mode}'"):
        other.load_state_dict(state)


def test_batches_hold_the_shard_values(avss_shards):
    """Frames, masks, audio and flags equal the shard's clip after its flip; padded frames are
    0.0 with frame_exists False, zero audio and class-0 masks; the uint8 path through
    to_device equals the float collate."""
    clips = {v["index"]: v for v in iter_videos(avss_shards, "train")}
    cfg = _cfg("pad", num_workers=2)
    seen_flip = seen_pad = 0
    for b in train_loader(avss_shards, cfg, 1, 2, seed=1, steps=4, device="cpu"):
        B, T = b["frame_exists"].shape
        assert b["frames"].dtype == torch.float32 and b["frames"].shape == (B, T, 3, 32, 32)
        assert b["masks"].dtype == torch.int64 and b["masks"].shape == (B, T, 32, 32)
        assert b["audio"].shape == (B, T, 1, 96, 64) and b["crops"] is None and (b["label"] == -1).all()
        assert b["mask_valid"].dtype == torch.bool and not (b["mask_valid"] & ~b["frame_exists"]).any()
        for i, idx in enumerate(b["index"].tolist()):
            v = clips[idx]
            n, flip = v["num_frames"], bool(b["hflip"][i])
            frames, masks = (v["frames"][:, :, ::-1], v["masks"][:, :, ::-1]) if flip else (v["frames"], v["masks"])
            seen_flip += flip
            assert b["name"][i] == v["name"] and b["num_frames"][i] == n and b["set"][i] == v["set"]
            assert b["frame_exists"][i].tolist() == [t < n for t in range(T)]
            assert b["mask_valid"][i].tolist() == [t in v["mask_frames"].tolist() for t in range(T)]
            np.testing.assert_array_equal(uint8_frames(b["frames"][i, :n]), frames)
            np.testing.assert_array_equal(b["masks"][i, v["mask_frames"]].numpy(), masks)
            assert not b["masks"][i, ~b["mask_valid"][i]].any()
            np.testing.assert_array_equal(b["audio"][i, :n, 0].numpy(), v["audio"])
            if n < T:
                seen_pad += 1
                assert (b["frames"][i, n:] == 0).all() and (b["audio"][i, n:] == 0).all()
    assert seen_flip and seen_pad
    # uint8 transport finished by to_device == the workers normalising
    some = [clips[i] for i in (0, 1, 2, 3)] + [v for v in clips.values() if v["num_frames"] == 10][:1]
    for k, v in enumerate(some):
        v["hflip"] = k % 2 == 0
    want = collate(some, 32, 32, normalize=True)
    raw = collate(some, 32, 32, normalize=False)
    assert raw["frames"].dtype == raw["masks"].dtype == torch.uint8 and raw["frames"].shape[1] == 10
    got = to_device(raw, "cpu")
    torch.testing.assert_close(got["frames"], want["frames"], atol=1e-6, rtol=0)
    for k in ("masks", "mask_valid", "frame_exists", "audio", "index", "hflip", "num_frames"):
        assert torch.equal(got[k], want[k]), k
    # resized on the way (frames bilinear, masks nearest), padded frames still 0.0
    small = collate_clips(some, 64)
    assert small["frames"].shape[-2:] == (64, 64) and (small["frames"][~small["frame_exists"]] == 0).all()
    assert set(small["masks"].unique().tolist()) <= set(torch.cat([want["masks"].unique()]).tolist())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2), (3, 0)])
def test_eval_every_clip_once(avss_shards, mode, world, workers):
    cfg = _cfg(mode, num_workers=workers)
    for split in ("val", "test"):
        lengths = {v["index"]: v["num_frames"] for v in iter_videos(avss_shards, split)}
        seen = []
        for rank in range(world):
            loader = eval_loader(avss_shards, split, cfg, rank, world)
            batches = list(loader)
            assert len(batches) == len(loader)
            for b in batches:
                assert 1 <= len(b["index"]) <= 2 and not b["hflip"].any()
                ts = {lengths[i] for i in b["index"].tolist()}
                assert b["frames"].shape[1] == max(ts)
                if mode == "bucket":
                    assert len(ts) == 1
            seen += [i for b in batches for i in b["index"].tolist()]
            if mode == "pad":  # CSV order within the rank
                mine = [i for b in batches for i in b["index"].tolist()]
                assert mine == sorted(mine)
        assert sorted(seen) == sorted(lengths)
    # max_videos keeps the split's first clips (CSV order), each once
    got = sorted(i for b in eval_loader(avss_shards, "test", cfg, max_videos=3) for i in b["index"].tolist())
    assert got == [0, 1, 2], (mode, got)


def test_padding_left_out_is_counted_as_the_reference_pads(avss_shards):
    """Bucketed eval batches (T = 5 for 5-frame clips) plus reference_padding give the AVSS
    metric state of the same clips each padded to 10, as the reference runs them."""
    cfg = _cfg("bucket", eval_batch_videos=3)
    g = torch.Generator().manual_seed(0)
    bucketed, padded = SemanticEvaluator(), SemanticEvaluator()
    for b in eval_loader(avss_shards, "test", cfg):
        B, T = b["frame_exists"].shape
        pred = torch.randint(0, 3, b["masks"].shape, generator=g) * b["masks"].clamp(max=1) + b["masks"]
        pred = pred.clamp(max=70)
        bucketed.update(pred.flatten(0, 1), b["masks"].flatten(0, 1), b["frame_exists"].flatten(), b["mask_valid"].flatten())
        bucketed.add_padding(reference_padding(b))
        assert reference_padding(b) == B * (REFERENCE_FRAMES - T)
        pad = REFERENCE_FRAMES - T
        big = lambda x: torch.cat([x, torch.zeros(B, pad, *x.shape[2:], dtype=x.dtype)], 1)  # noqa: E731
        junk = torch.randint(0, 71, (B, pad, *pred.shape[2:]), generator=g)  # whatever the model says there
        padded.update(torch.cat([pred, junk], 1).flatten(0, 1), big(b["masks"]).flatten(0, 1),
                      big(b["frame_exists"]).flatten(), big(b["mask_valid"]).flatten())
    a, b = bucketed.state_dict(), padded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    n5 = sum(1 for v in iter_videos(avss_shards, "test") if v["num_frames"] == 5)
    assert int(a["frames"][1]) == 5 * n5 > 0  # every 5-frame clip's 5 padded frames
    # padding_state is batch_state of padded frames
    h = torch.zeros(4, 8, 8, dtype=torch.int64)
    real = batch_state(torch.randint(0, 71, (4, 8, 8)), h, torch.zeros(4, dtype=torch.bool),
                       torch.zeros(4, dtype=torch.bool))
    assert all(torch.equal(real[k], padding_state(4)[k]) for k in real)


def test_manifest_without_frame_counts_and_bad_setting(avss_shards, tmp_path):
    m = json.loads((avss_shards / "manifest.json").read_text())
    for e in m["shards"]:
        e.pop("num_frames")
    shutil.copytree(avss_shards, tmp_path / "old")
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="re-pack the AVSS set"):
        TrainOrder.from_shards(tmp_path / "old", 0, G)
    with pytest.raises(ShardError, match="no frame count per clip"):
        eval_loader(tmp_path / "old", "val", _cfg("pad"))
    from avs_dist.config import load_config

    with pytest.raises(ConfigError, match="data.avss_batching='mixed' is not one of"):
        load_config("tiny_avss", ["data.avss_batching=mixed"])
    assert load_config("avss_avsbench", []).data.avss_batching == "pad"
    assert load_config("tiny_avss", []).data.avss_batching == "bucket"
