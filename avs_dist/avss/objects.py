"""The objects of AVSBench-semantic clips, for a crop branch on AVSS: one box and class per
labelled object and frame, taken from the class-index masks, and the crops they cut from the
frames (on the device, from the batch the model already has: nothing to pack).

An object is a class other than background (0) present in a labelled frame; its box is the
tight box of that class's pixels there, in avs-dist's box convention (data/boxes.py:
(xmin, ymin, xmax, ymax), 0-based pixel corners, exclusive max), so `object_boxes` of a
one-object mask gives `data.boxes.box_from_mask`'s box. Two objects of one class in a frame
share one box, as the mask cannot tell them apart. `objects_from_masks` is the same boxes of one
clip as numpy arrays, for the shards (`pack --subset avss`) and `inspect`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from avs_dist.avss.classes import NUM_CLASSES


@dataclass(frozen=True)
class ObjectBoxes:
    """N objects of a batch, ordered by clip, frame, class.

    clip, frame, cls int64 [N] (cls in 1..K-1); boxes float32 [N, 4] (data/boxes.py convention)."""
    clip: torch.Tensor
    frame: torch.Tensor
    cls: torch.Tensor
    boxes: torch.Tensor

    def __len__(self) -> int:
        return self.cls.shape[0]


def object_boxes(masks: torch.Tensor, valid: torch.Tensor, classes: int) -> ObjectBoxes:
    """masks int64 [B, T, H, W] class indices 0..classes-1 (0 = background), valid bool [B, T]
    (the frame is labelled) -> one ObjectBoxes entry per (clip, labelled frame, class > 0 present).

    One pass over the pixels (scatter_reduce of their coordinates per (frame, class); a (frame,
    class) is present where its max x was set) and two host synchronisations: the class range
    check and the number of objects. ValueError for a class index out of range."""
    if masks.dim() != 4 or tuple(valid.shape) != tuple(masks.shape[:2]):
        raise ValueError(f"object_boxes: masks must be [B, T, H, W] and valid [B, T], got "
                         f"{tuple(masks.shape)} and {tuple(valid.shape)}")
    b, t, h, w = masks.shape
    flat = masks.reshape(b * t, h * w).long()
    if flat.numel() and bool((flat.min() < 0) | (flat.max() >= classes)):  # one sync; the message only on failure
        raise ValueError(f"object_boxes: class indices must be in 0..{classes - 1}, got "
                         f"{int(flat.min())}..{int(flat.max())}")
    dev = masks.device
    key = (torch.arange(b * t, device=dev)[:, None] * classes + flat).reshape(-1)
    ys = torch.arange(h, device=dev).repeat_interleave(w).expand(b * t, -1).reshape(-1)
    xs = torch.arange(w, device=dev).repeat(h).expand(b * t, -1).reshape(-1)
    n = b * t * classes

    def reduce(values: torch.Tensor, how: str, start: int) -> torch.Tensor:
        return torch.full((n,), start, dtype=torch.long, device=dev).scatter_reduce(0, key, values, how)

    x0, x1 = reduce(xs, "amin", w), reduce(xs, "amax", -1)
    y0, y1 = reduce(ys, "amin", h), reduce(ys, "amax", -1)
    present = (x1 >= 0).reshape(b * t, classes) & valid.reshape(-1, 1).to(dev)
    present[:, 0] = False  # background is no object
    idx = present.reshape(-1).nonzero().squeeze(1)  # (frame, class) order: clip, frame, class
    bt, cls = idx // classes, idx % classes
    boxes = torch.stack([x0[idx], y0[idx], x1[idx] + 1, y1[idx] + 1], dim=1).float()
    return ObjectBoxes(clip=bt // t, frame=bt % t, cls=cls, boxes=boxes)


def crops_from_boxes(frames: torch.Tensor, objects: ObjectBoxes, size: int) -> torch.Tensor:
    """frames [B, T, C, H, W], objects -> crops [N, C, size, size] in frames' dtype.

    Each crop is its box's pixels resized to size x size bilinearly, as
    F.interpolate(frame[:, ymin:ymax, xmin:xmax], (size, size), mode="bilinear",
    align_corners=False) computes it (the same sample points, clamped to the box, so no pixel
    outside the box contributes), for every box at once with one grid_sample."""
    b, t, c, h, w = frames.shape
    n = len(objects)
    if n == 0:
        return frames.new_zeros(0, c, size, size)
    dev, dt = frames.device, torch.float32 if frames.dtype in (torch.float16, torch.bfloat16) else frames.dtype
    boxes = objects.boxes.to(device=dev, dtype=dt)
    u = (torch.arange(size, device=dev, dtype=dt) + 0.5) / size  # output pixel centres, 0..1 of the box

    def coords(lo: torch.Tensor, hi: torch.Tensor, side: int) -> torch.Tensor:
        # pixel-index coordinates F.interpolate samples in the crop, clamped to its pixels
        src = lo[:, None] + (u[None] * (hi - lo)[:, None]) - 0.5
        src = torch.maximum(torch.minimum(src, hi[:, None] - 1), lo[:, None])
        return src * (2 / max(side - 1, 1)) - 1  # grid_sample's align_corners=True coordinates

    gx, gy = coords(boxes[:, 0], boxes[:, 2], w), coords(boxes[:, 1], boxes[:, 3], h)  # [N, size]
    grid = torch.stack([gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)], dim=-1)
    images = frames[objects.clip.to(dev), objects.frame.to(dev)]  # [N, C, H, W]
    return F.grid_sample(images.to(dt), grid, mode="bilinear", align_corners=True).to(frames.dtype)


def objects_from_masks(masks: np.ndarray, mask_frames, classes: int = NUM_CLASSES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One clip's class-index masks uint8 [M, H, W] of frames `mask_frames` [M] -> (boxes
    float32 [K, 4], classes int64 [K] in 1..classes-1, frames int64 [K]), ordered by mask, then
    class (`object_boxes` of the clip); K = 0 gives [0, 4], [0], [0]."""
    m = torch.from_numpy(np.ascontiguousarray(masks)).long()
    if m.shape[0] == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    objects = object_boxes(m[None], torch.ones(1, m.shape[0], dtype=torch.bool), classes)
    frames = np.asarray(mask_frames, np.int64)[objects.frame.numpy()]
    return objects.boxes.numpy().astype(np.float32), objects.cls.numpy().astype(np.int64), frames
