"""Image tensors between uint8 pixels and the model's input: resize, ImageNet normalisation.

Shared by the loaders (data/loader.py), `avs-dist predict` and the TensorBoard overlays, so
that every path feeds the model exactly the same values:

- `stack_images`: uint8 [T,h,w,3] per video -> [B,T,3,size,size], resized bilinearly
  (antialiased when shrinking, rounded back to uint8) when the stored size differs, either
  normalised float32 or left uint8 for `normalize_uint8` to finish on the device;
- `normalize_uint8`: uint8 [...,3,H,W] -> float32 (x / 255 - mean) / std;
- `denormalize`: the inverse, clamped to [0, 1], for display.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """[..., C, H, W] float -> [..., C, size, size]; mode "nearest" (masks) or "bilinear"
    (align_corners=False, antialiased when shrinking)."""
    if x.shape[-2:] == (size, size):
        return x
    lead = x.shape[:-3]
    y = x.reshape(-1, *x.shape[-3:])
    if mode == "nearest":
        y = F.interpolate(y, size=(size, size), mode="nearest")
    else:
        shrink = y.shape[-1] > size or y.shape[-2] > size
        y = F.interpolate(y, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return y.reshape(*lead, *y.shape[-3:])


def mean_inv_std() -> tuple[torch.Tensor, torch.Tensor]:
    """(mean * 255 / std, 1 / (255 * std)) per channel: normalised = x * inv_std - shift."""
    inv_std = 1.0 / (torch.tensor(IMAGENET_STD) * 255.0)
    return torch.tensor(IMAGENET_MEAN) * 255.0 * inv_std, inv_std


def alloc_shared(shape, dtype) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker it is born in shared memory, so
    handing the batch to the main process does not copy it again (share_memory_() on a
    new tensor would: it copies the old storage into a new shared one)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes)).view(shape)


def stack_images(stacks: list[np.ndarray], size: int, normalize: bool) -> torch.Tensor:
    """uint8 [T,h,w,3] per video (already flipped) -> [B,T,3,size,size]: float normalised,
    or uint8 when `normalize` is False (normalisation then happens on the device)."""
    if any(s.shape != stacks[0].shape for s in stacks):
        return torch.cat([stack_images([s], size, normalize) for s in stacks])
    B, (T, h, w, C) = len(stacks), stacks[0].shape
    if (h, w) == (size, size) and not normalize:
        buf = alloc_shared((B, T, h, w, C), torch.uint8)
        np.stack(stacks, out=buf.numpy())
        return buf.permute(0, 1, 4, 2, 3)  # channels-last view; to_device makes it contiguous on the GPU
    x = torch.from_numpy(np.stack(stacks)).permute(0, 1, 4, 2, 3)  # a view: no copy yet
    if (h, w) != (size, size):
        x = resize(x.float(), size, "bilinear")
        if not normalize:
            return x.round_().clamp_(0, 255).to(torch.uint8)
    else:
        # One pass from uint8 to contiguous float, then one fused scale-and-shift.
        x = alloc_shared(x.shape, torch.float32).copy_(x)
    shift, scale = mean_inv_std()
    return x.mul_(scale.view(3, 1, 1)).sub_(shift.view(3, 1, 1))


@functools.lru_cache(maxsize=8)
def _device_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Built and copied once per device, not per batch. Callers must not modify them.
    return tuple(t.view(3, 1, 1).to(device) for t in mean_inv_std())


def normalize_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 [...,3,H,W] (any strides) -> contiguous float32, ImageNet-normalised, on x's device."""
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if x.device.type == "cpu":
        shift, scale = (t.view(3, 1, 1) for t in mean_inv_std())
        # numpy: one thread, cast + transpose + scale in one pass; torch's intra-op threads
        # cost several times the CPU here when other processes load the cores.
        out = y.numpy()
        np.multiply(x.numpy(), scale.numpy(), out=out)
        np.subtract(out, shift.numpy(), out=out)
        return y
    shift, scale = _device_constants(x.device)
    return y.copy_(x).mul_(scale).sub_(shift)  # copy_: cast + transpose in one kernel


def denormalize(frames: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised [N,3,H,W] -> float32 RGB in [0, 1] (for display)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (frames.float() * std + mean).clamp(0, 1)
