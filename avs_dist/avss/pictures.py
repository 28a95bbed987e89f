"""A packed AVSS clip as a picture for `avs-dist inspect --save-png`: its colour masks.

Rows of plots.labelled_grid, one column per frame: the frames; the class-index masks in the
release's palette colours (avss/classes.py; a grey panel where a frame has no label); and
the frames with each object's box drawn in its class colour. Captions name the classes.

`prediction_strip`: the TensorBoard strip of an AVSS run (frame | ground truth | prediction,
each class tinted, outlined and named on the frame; train/sinks.py overlay_grid).
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


def class_overlay(frame: np.ndarray, index: np.ndarray, class_names, min_side: int = 0) -> np.ndarray:
    """uint8 [H',W',3]: `frame` (uint8 [H,W,3]) with each class of `index` (class indices [H,W],
    0 = background, not drawn) tinted and outlined in its palette colour (plots.overlay: a light
    tint, the colour's line, a black or white edge) and its name written on it. The panel is first
    enlarged (nearest neighbour, whole factor) to a side of at least `min_side`, so the names stay
    legible on small frames."""
    from avs_dist.plots import FONT_PX, _enlarge, font, overlay

    frame = _enlarge(np.ascontiguousarray(frame), min_side)
    factor = frame.shape[0] // index.shape[0]
    index = np.asarray(index).repeat(factor, 0).repeat(factor, 1)
    present = [int(c) for c in np.unique(index) if c]
    out = frame
    for c in present:
        out = overlay(out, index == c, colour=tuple(int(v) for v in index_to_colour(c)))
    img = Image.fromarray(out)
    draw = ImageDraw.Draw(img)
    f = font()
    for c in present:
        ys, xs = np.nonzero(index == c)
        k = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))  # the class's pixel nearest its centre
        x = int(np.clip(xs[k], 2 * FONT_PX, out.shape[1] - 2 * FONT_PX))
        y = int(np.clip(ys[k], FONT_PX, out.shape[0] - FONT_PX))
        draw.text((x, y), str(class_names[c]), fill=(255, 255, 255), font=f, anchor="mm",
                  stroke_width=2, stroke_fill=(0, 0, 0))
    return np.asarray(img)


def prediction_strip(frames: np.ndarray, gt: np.ndarray, pred: np.ndarray, captions: list[str],
                     class_names=None) -> np.ndarray:
    """uint8 [H,W,3]: one row per frame, frame | ground truth | prediction, the classes drawn by
    `class_overlay`; each row's caption gives the frame's mIoU (over the classes in either,
    background included), then names the classes of both. frames uint8 [N,H,W,3], gt / pred class
    indices [N,H,W]; class_names: 71 names (default avss/classes.py's). The TensorBoard strip of
    an AVSS run (train/sinks.py overlay_grid)."""
    from avs_dist.avss.classes import AVSS_CLASSES
    from avs_dist.plots import MIN_PANEL, labelled_grid

    names = list(class_names) if class_names is not None else list(AVSS_CLASSES)
    rows, titles = [], []
    for frame, g, p, caption in zip(frames, gt, pred, captions):
        rows.append([frame, class_overlay(frame, g, names, MIN_PANEL), class_overlay(frame, p, names, MIN_PANEL)])
        union = sorted(set(np.unique(g).tolist()) | set(np.unique(p).tolist()))
        ious = [np.logical_and(g == c, p == c).sum() / np.logical_or(g == c, p == c).sum() for c in union]

        def listed(m):
            return ", ".join(names[c] for c in np.unique(m).tolist() if c) or "background"
        # the score before the class lists: a long list runs past the strip's edge, the score stays
        titles.append(f"{caption}   mIoU {float(np.mean(ious)):.2f}   gt: {listed(g)}   pred: {listed(p)}")
    return labelled_grid(rows, ["frame", "ground truth", "prediction"], titles)
