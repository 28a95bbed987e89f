"""Ground-truth mask targets exactly as the AVSBench reference loader produces them.

The reference reads a mask with PIL and turns it into the float target with torchvision's
``ToTensor`` (docs/avsbench-format §1):

* S4: ``Image.open(p).convert('1')``: PIL converts to grayscale, then to bilevel with
  Floyd-Steinberg dithering, so the target is 0./1., but near soft edges or faint halos the
  error diffusion decides pixel by pixel (no hand-written threshold reproduces it);
* MS3: ``Image.open(p).convert('P')``: the target is the palette index / 255 ('L' images
  keep their gray value as the index; RGB goes through PIL's web palette with dithering).

Only calling PIL reproduces these, so that is what ``read_mask`` does, for every mode PIL
opens (1, L, P, LA, PA, RGB, RGBA, I;16, I, F, ...). Shards store the target as uint8 ``v``
with target = v / 255 (S4: 0 / 255; MS3: the palette index); ``mask_targets`` computes v / 255
as ToTensor does, bit for bit.

A mask is *clean* when the reference's target is the plain black-and-white reading of the
file: every pixel of its grayscale (S4) or palette-index (MS3) reading is 0 or 255, and (S4)
the bilevel conversion is exactly "255 = foreground". Anything else (soft edges, halos, a
coloured or 0/1-valued mask, a 0/1-index palette in MS3) means the targets are not what the
reference was trained on; ``pack`` counts such masks and lists them in the manifest.
"""
from __future__ import annotations

import numpy as np

MASK_MODES = {"s4": "1", "ms3": "P"}  # the reference's PIL conversion per subset
MAX_VALUES_LISTED = 8


def mask_mode(subset: str) -> str:
    """The PIL mode the reference converts `subset`'s masks to."""
    if subset not in MASK_MODES:
        raise ValueError(f"unknown subset {subset!r} (s4 or ms3)")
    return MASK_MODES[subset]


def stored_mask(im, subset: str) -> tuple[np.ndarray, dict | None]:
    """An opened PIL image -> (uint8 [H,W] stored values v, target = v / 255; None when clean,
    else {"pixels": number of pixels that are not 0 / 255, "values": up to 8 of those values}).

    Raises what PIL raises for a mode it cannot convert (OSError / ValueError)."""
    mode = mask_mode(subset)
    converted = im.convert(mode)
    if mode == "1":
        stored = np.asarray(converted, dtype=np.uint8) * np.uint8(255)
        plain = np.asarray(im.convert("L"))
    else:
        stored = np.array(converted, dtype=np.uint8)
        plain = stored
    soft = (plain != 0) & (plain != 255)
    n_soft = int(soft.sum())
    if n_soft == 0 and np.array_equal(stored, plain):
        return stored, None
    values = np.unique(plain[soft])[:MAX_VALUES_LISTED].tolist() if n_soft else []
    return stored, {"pixels": n_soft or int((stored != plain).sum()), "values": values}


def target_lut(device=None):
    """float32 [256]: the target of stored value v, computed as torchvision's ToTensor does
    (uint8 -> float32, then ``div(255)``), so a lookup equals ToTensor bit for bit."""
    import torch

    lut = torch.arange(256, dtype=torch.uint8).to(torch.float32).div(255)
    return lut if device is None else lut.to(device)


def mask_targets(x):
    """Stored uint8 masks (tensor or array, any shape) -> float32 targets v / 255 (a torch
    tensor on x's device; a numpy array for a numpy input)."""
    import torch

    if isinstance(x, np.ndarray):
        return np.take(target_lut().numpy(), x)
    if x.dtype != torch.uint8:
        raise TypeError(f"stored masks are uint8, got {x.dtype}")
    if x.device.type != "cpu":
        # On the device, the same two operations as ToTensor (no table to copy there: a
        # host-to-device copy per batch would wait for the GPU's queue).
        return x.to(torch.float32).div_(255)
    # numpy: one thread; torch's intra-op threads cost more than they save on these arrays.
    y = torch.empty(x.shape, dtype=torch.float32)
    np.take(target_lut().numpy(), x.numpy(), out=y.numpy())
    return y
