"""AVSS objects for a crop branch: boxes and classes from class-index masks, crops cut from frames."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avs_dist.avss.objects import crops_from_boxes, object_boxes
from avs_dist.data.boxes import box_from_mask


def _masks(seed=0, b=2, t=4, h=24, w=20, classes=9):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(b, t, h, w, dtype=torch.long)
    for bi in range(b):
        for ti in range(t):
            for _ in range(3):  # up to three rectangles of random classes, overlapping at times
                k = int(torch.randint(1, classes, (1,), generator=g))
                y0, x0 = (int(v) for v in torch.randint(0, 16, (2,), generator=g))
                hh, ww = (int(v) for v in torch.randint(1, 9, (2,), generator=g))
                masks[bi, ti, y0:y0 + hh, x0:x0 + ww] = k
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, 1:] = False  # a v1s-like clip: frame 0 labelled only
    return masks, valid, classes


def test_one_box_per_labelled_object_and_frame_as_box_from_mask():
    masks, valid, classes = _masks()
    ob = object_boxes(masks, valid, classes)
    expected = []
    for bi in range(masks.shape[0]):
        for ti in range(masks.shape[1]):
            if not valid[bi, ti]:
                continue
            for k in range(1, classes):
                box = box_from_mask((masks[bi, ti] == k).numpy())
                if box is not None:
                    expected.append((bi, ti, k, box))
    got = [(int(c), int(f), int(k), tuple(float(v) for v in bx))
           for c, f, k, bx in zip(ob.clip, ob.frame, ob.cls, ob.boxes)]
    assert got == expected and len(got) > 10
    assert ob.boxes.dtype == torch.float32 and 0 not in ob.cls.tolist()


def test_no_objects_and_bad_classes():
    masks = torch.zeros(1, 2, 8, 8, dtype=torch.long)
    ob = object_boxes(masks, torch.ones(1, 2, dtype=torch.bool), 71)
    assert len(ob) == 0 and crops_from_boxes(torch.randn(1, 2, 3, 8, 8), ob, 4).shape == (0, 3, 4, 4)
    masks[0, 0, 0, 0] = 71
    with pytest.raises(ValueError, match="0..70"):
        object_boxes(masks, torch.ones(1, 2, dtype=torch.bool), 71)


@pytest.mark.parametrize("size", [7, 16, 32])
def test_crops_equal_cut_then_interpolate(size):
    """Down- and up-sampling: each crop is F.interpolate of the box's pixels (float64: to rounding)."""
    masks, valid, classes = _masks(seed=1)
    frames = torch.randn(*masks.shape[:2], 3, *masks.shape[2:], dtype=torch.float64)
    ob = object_boxes(masks, valid, classes)
    crops = crops_from_boxes(frames, ob, size)
    assert crops.shape == (len(ob), 3, size, size) and crops.dtype == torch.float64
    worst = 0.0
    for i in range(len(ob)):
        x0, y0, x1, y1 = (int(v) for v in ob.boxes[i])
        cut = frames[ob.clip[i], ob.frame[i], :, y0:y1, x0:x1][None]
        ref = F.interpolate(cut, size=(size, size), mode="bilinear", align_corners=False)[0]
        worst = max(worst, (crops[i] - ref).abs().max().item())
    assert worst < 1e-12, worst
