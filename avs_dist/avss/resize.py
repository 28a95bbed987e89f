"""Frames and masks resized as the AVSS reference loader resizes them.

avs_scripts/avss/color_dataloader.py (`cfg.DATA.CROP_IMG_AND_MASK`, `CROP_SIZE` 224), with PIL:
- train: the short side to `size` (the long side ``int(long * size / short)``), then the
  centre `size` x `size` crop at ``x1 = int(round((w - size) / 2.))`` (Python's round: half to
  even), likewise y1;
- val / test: straight to `size` x `size` (the aspect ratio is not kept);
frames with ``Image.BILINEAR``, masks with ``Image.NEAREST`` (colour and index masks alike:
nearest picks the same source pixel in any mode, so decoding colours before or after the
resize gives the same classes). Neither step is random, so `pack` applies them once and
the shards hold the pixels the reference's model sees (before normalisation).
"""
from __future__ import annotations

from PIL import Image


def crop_box(w: int, h: int, size: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """The train rule for a w x h image: ((resized w, resized h), centre crop box (x0, y0, x1, y1))."""
    if w > h:
        oh = size
        ow = int(1.0 * w * oh / h)
    else:
        ow = size
        oh = int(1.0 * h * ow / w)
    x1 = int(round((ow - size) / 2.0))
    y1 = int(round((oh - size) / 2.0))
    return (ow, oh), (x1, y1, x1 + size, y1 + size)


def reference_resize(img: Image.Image, size: int, split: str, is_mask: bool) -> Image.Image:
    """`img` as the reference hands it to the model at `size`: train short side + centre crop,
    else a plain resize; BILINEAR for frames, NEAREST for masks (module docstring)."""
    resample = Image.NEAREST if is_mask else Image.BILINEAR
    if split != "train":
        return img.resize((size, size), resample)
    (ow, oh), box = crop_box(*img.size, size)
    return img.resize((ow, oh), resample).crop(box)
