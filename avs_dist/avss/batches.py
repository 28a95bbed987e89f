"""Batches of AVSBench-semantic clips: decoded clips (avss/samples.py) -> the training / eval
batch (docs/architecture.md "Training / eval batch"), and its finishing on the device.

A batch of B clips has T = the longest clip's frame count (10 when it holds a v2 clip, 5 when
all its clips are 5-frame: the loader's `data.avss_batching`, data/loader.py, decides which
clips share a batch). Shorter clips are padded after their last frame, as the reference pads
every clip to 10 (avs_scripts/avss/color_dataloader.py): zero frames (0.0 after normalisation,
the reference's torch.zeros, not normalised black), class-0 masks, zero log-mel seconds, and
`frame_exists` False. Keys and shapes:

  frames float32 [B,T,3,H,W] ImageNet-normalised; masks int64 [B,T,H,W] class indices 0..70,
  0 where the frame has no label or does not exist; mask_valid bool [B,T] (the frame has a
  label: v1s train frame 0, else every frame of the clip); frame_exists bool [B,T]
  (t < num_frames); audio float32 [B,T,1,96,64]; crops None (AVSS packs no crops: a crop
  branch cuts them from the frames, avss/objects.py); label int64 [B] all -1 (no clip class);
  index int64 [B] (position in the split); hflip bool [B]; name list[str] (uid);
  num_frames int64 [B] (the clip's own frames, 5 or 10); set list[str] ("v1s" | "v1m" | "v2").

With normalize=False (what loader workers send) frames and masks stay uint8 and the padded
frames are uint8 zeros; `finish` (called by data/loader.py:to_device) makes them the contract
above on the device. Frames are resized bilinearly and masks with nearest when the packed size
differs from `image_size` (data/transforms.py), as for S4.
"""
from __future__ import annotations

import numpy as np
import torch

from avs_dist.data.transforms import alloc_shared, normalize_uint8, resize, stack_images

# The reference pads every clip to this many frames and scores its padded frames
# (avss/metrics.py); a batch of shorter T lacks B x (REFERENCE_FRAMES - T) of them.
REFERENCE_FRAMES = 10


def _padded(arr: np.ndarray, frames: int) -> np.ndarray:
    """[n, ...] -> [frames, ...] with zeros after the n given (n <= frames)."""
    if len(arr) == frames:
        return arr
    out = np.zeros((frames, *arr.shape[1:]), dtype=arr.dtype)
    out[: len(arr)] = arr
    return out


def _zero_missing(frames: torch.Tensor, exists: torch.Tensor) -> torch.Tensor:
    """Normalised frames [B,T,3,H,W] with the padded ones (exists [B,T] False) set to 0.0, as the
    reference's torch.zeros padding, in place."""
    b, t = exists.shape
    return frames.mul_(exists.view(b, t, 1, 1, 1).to(frames.dtype))


def collate_clips(clips: list[dict], image_size: int, normalize: bool = True) -> dict:
    """Decoded AVSS clips, each with "hflip" -> one batch (module docstring).

    A flipped clip has its frames and masks mirrored together (last axis of the image).
    ValueError for an empty list."""
    if not clips:
        raise ValueError("collate_clips: no clips")
    B = len(clips)
    T = max(int(c["num_frames"]) for c in clips)
    flips = [bool(c["hflip"]) for c in clips]
    frames = [_padded(c["frames"][:, :, ::-1] if f else c["frames"], T) for c, f in zip(clips, flips)]
    h, w = clips[0]["frames"].shape[1:3]
    if any(c["frames"].shape[1:3] != (h, w) for c in clips):
        raise ValueError(f"collate_clips: clips of different frame sizes in one batch "
                         f"({sorted({tuple(c['frames'].shape[1:3]) for c in clips})})")
    masks = np.zeros((B, T, h, w), dtype=np.uint8)
    valid = np.zeros((B, T), dtype=bool)
    exists = np.zeros((B, T), dtype=bool)
    for b, (c, f) in enumerate(zip(clips, flips)):
        mf = np.asarray(c["mask_frames"], dtype=np.int64)
        masks[b, mf] = c["masks"][:, :, ::-1] if f else c["masks"]
        valid[b, mf] = True
        exists[b, : int(c["num_frames"])] = True
    masks_t = torch.from_numpy(masks)
    if (h, w) != (image_size, image_size):
        masks_t = resize(masks_t[:, :, None].float(), image_size, "nearest")[:, :, 0].to(torch.uint8)
    mask_out = alloc_shared(masks_t.shape, torch.int64 if normalize else torch.uint8)
    mask_out.copy_(masks_t)
    audio = alloc_shared((B, T, 96, 64), torch.float32)
    np.stack([_padded(c["audio"], T) for c in clips], out=audio.numpy())
    exists_t = torch.from_numpy(exists)
    images = stack_images(frames, image_size, normalize)
    if normalize:
        _zero_missing(images, exists_t)
    return {
        "frames": images,
        "masks": mask_out,
        "mask_valid": torch.from_numpy(valid),
        "frame_exists": exists_t,
        "crops": None,
        "audio": audio[:, :, None],
        "label": torch.full((B,), -1, dtype=torch.int64),
        "index": torch.tensor([c["index"] for c in clips], dtype=torch.int64),
        "hflip": torch.tensor(flips),
        "name": [c["name"] for c in clips],
        "num_frames": torch.tensor([int(c["num_frames"]) for c in clips], dtype=torch.int64),
        "set": [c["set"] for c in clips],
    }


def finish(batch: dict) -> dict:
    """A batch already on its device (tensors; frames / masks possibly uint8 from the workers)
    -> the contract: frames normalised with the padded frames 0.0, masks int64. In place."""
    exists = batch["frame_exists"]
    if batch["frames"].dtype == torch.uint8:
        batch["frames"] = _zero_missing(normalize_uint8(batch["frames"]), exists)
    if batch["masks"].dtype != torch.int64:
        batch["masks"] = batch["masks"].long()
    return batch


def reference_padding(batch: dict) -> int:
    """Padded frames the reference scores for this batch's clips (each padded to
    REFERENCE_FRAMES) that the batch does not hold because its T is shorter: B x (10 - T).
    Evaluation adds them to the AVSS metric state (avss/metrics.py) so that `*_avsbench`
    counts every clip as the reference does whatever the batching."""
    b, t = batch["mask_valid"].shape
    return b * max(0, REFERENCE_FRAMES - t)
