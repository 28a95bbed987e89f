"""The shard sample of one AVSS clip: what `pack --subset avss` writes and `iter_videos` reads.

One WebDataset sample per clip, key ``{index:06d}`` (its position in the split, metadata.csv
order), members:

- frames: ``frames.npy`` uint8 [T,S,S,3] (``--image-format npy``), or ``frame0.png`` ..
  ``frame{T-1}.png`` / ``.jpg``; T = 5 (v1s, v1m) or 10 (v2): the clip's own frames, not
  padded (padding to 10 is the loader's);
- ``masks.npy`` uint8 [M,S,S]: class indices 0..70 of the labelled frames;
- ``audio.npy`` float32 [T,96,64]: VGGish log-mel, one example per frame second, zeros where
  the wav gave fewer than T examples (avss/clips.py);
- ``meta.json``: subset "avss", name (uid), vid, set, split, index, row, num_frames,
  mask_frames, mask_source, audio_examples, frame_size [S, S], source_size [h, w],
  object_boxes [[x0, y0, x1, y1], ...], object_classes, object_frames.

`decode_clip` turns such a sample back into the dict `iter_videos` yields (data/shards.py).
"""
from __future__ import annotations

import io

import numpy as np

from avs_dist.data.shards import encode_members, stack_members

SUBSET = "avss"


def clip_meta(rec, clip: dict, split: str, index: int) -> dict:
    """meta.json of a clip (module docstring) from its record (avss/layout.py) and arrays (avss/clips.py)."""
    return {
        "subset": SUBSET, "name": rec.name, "vid": rec.extra["vid"], "set": rec.extra["set"], "split": split,
        "index": index, "row": rec.row, "num_frames": len(clip["frames"]), "mask_frames": clip["mask_frames"],
        "mask_source": clip["mask_source"], "audio_examples": clip["audio_examples"],
        "frame_size": list(clip["frames"].shape[1:3]), "source_size": clip["source_size"],
        "object_boxes": clip["object_boxes"].tolist(), "object_classes": clip["object_classes"].tolist(),
        "object_frames": clip["object_frames"].tolist(),
    }


def encode_clip(clip: dict, meta: dict, image_format: str = "npy", jpeg_quality: int = 95) -> dict:
    """Arrays + meta -> {"__key__", member: bytes} for one WebDataset sample (data/shards.py:encode_members)."""
    return encode_members(meta["index"], {"frame": clip["frames"]}, clip["masks"], clip["audio"], meta,
                          image_format, jpeg_quality)


def decode_clip(raw: dict, meta: dict) -> dict:
    """One raw sample (member -> bytes) and its parsed meta.json -> the clip dict:

    frames uint8 [T,S,S,3], masks uint8 [M,S,S] (class indices 0..70), mask_frames int64 [M],
    audio float32 [T,96,64], object_boxes float32 [K,4], object_classes int64 [K],
    object_frames int64 [K], num_frames T, and name, vid, set, split, index, row, subset,
    mask_source, audio_examples. Raises KeyError for a missing member or key."""
    n = int(meta["num_frames"])
    video = {
        "frames": stack_members(raw, "frame", n),
        "masks": np.load(io.BytesIO(raw["masks.npy"]), allow_pickle=False),
        "mask_frames": np.asarray(meta["mask_frames"], dtype=np.int64),
        "audio": np.load(io.BytesIO(raw["audio.npy"]), allow_pickle=False),
        "object_boxes": np.asarray(meta["object_boxes"], dtype=np.float32).reshape(-1, 4),
        "object_classes": np.asarray(meta["object_classes"], dtype=np.int64),
        "object_frames": np.asarray(meta["object_frames"], dtype=np.int64),
    }
    for k in ("subset", "name", "vid", "set", "split", "index", "row", "num_frames", "mask_source", "audio_examples"):
        video[k] = meta[k]
    return video
