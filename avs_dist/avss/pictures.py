"""A packed AVSS clip as a picture for `avs-dist inspect --save-png`: its colour masks.

Rows of plots.labelled_grid, one column per frame: the frames; the class-index masks in the
release's palette colours (avss/classes.py; a grey panel where a frame has no label); and
the frames with each object's box drawn in its class colour. Captions name the classes.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from avs_dist.avss.classes import index_to_colour

NO_MASK_GREY = 64


def _boxes_drawn(frame: np.ndarray, boxes: np.ndarray, classes: np.ndarray) -> np.ndarray:
    img = Image.fromarray(frame)
    draw = ImageDraw.Draw(img)
    for (x0, y0, x1, y1), c in zip(boxes, classes):
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=tuple(int(v) for v in index_to_colour(int(c))))
    return np.asarray(img)


def clip_strip(video: dict, classes: list[str] | tuple[str, ...]) -> np.ndarray:
    """uint8 [H,W,3] of one clip as iter_videos yields it (frames [T,S,S,3], masks [M,S,S] class
    indices, mask_frames, object_boxes / classes / frames); `classes`: the manifest's 71 names."""
    from avs_dist.plots import labelled_grid

    frames = video["frames"]
    colour = np.full_like(frames, NO_MASK_GREY)
    for m, k in zip(video["masks"], video["mask_frames"]):
        colour[int(k)] = index_to_colour(m)
    boxed = []
    for t, frame in enumerate(frames):
        here = video["object_frames"] == t
        boxed.append(_boxes_drawn(frame, video["object_boxes"][here], video["object_classes"][here]))
    present = sorted({int(c) for m in video["masks"] for c in np.unique(m) if c})
    names = ", ".join(f"{classes[c]} ({c})" for c in present) or "background only"
    titles = [f"{video['name']}  ({video['set']}, {video['split']} #{video['index']}, {video['num_frames']} frames)",
              f"labels: {len(video['masks'])} mask(s) in palette colours, grey: no label; classes: {names}",
              f"object boxes ({len(video['object_boxes'])}) in their class colours"]
    return labelled_grid([list(frames), list(colour), boxed], [f"frame {i}" for i in range(len(frames))], titles)
