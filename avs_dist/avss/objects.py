"""The objects of an AVSS clip for the seed's crop branch: one box per class and labelled frame.

A semantic mask labels every pixel of a sounding object with its class, so the boxes are
derived from it: for each labelled frame and each class present in its mask (background
excluded), the tight box of that class's pixels (data/boxes.py's convention: float
(xmin, ymin, xmax, ymax), 0-based pixel corners, exclusive max; `frame[ymin:ymax, xmin:xmax]`
is the crop). Two objects of one class in a frame share one box, as the mask cannot tell
them apart.
"""
from __future__ import annotations

import numpy as np

from avs_dist.avss.classes import BACKGROUND
from avs_dist.data.boxes import box_from_mask


def objects_from_masks(masks: np.ndarray, mask_frames) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class-index masks uint8 [M, H, W] of frames `mask_frames` [M] -> (boxes float32 [K, 4],
    classes int64 [K], frames int64 [K]), ordered by mask, then class; K = 0 gives [0, 4], [0], [0]."""
    boxes, classes, frames = [], [], []
    for mask, frame in zip(np.asarray(masks), mask_frames):
        for c in np.unique(mask):
            if c == BACKGROUND:
                continue
            boxes.append(box_from_mask(mask == c))
            classes.append(int(c))
            frames.append(int(frame))
    return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64),
            np.asarray(frames, np.int64))
