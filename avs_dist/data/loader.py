"""WebDataset loaders for training and evaluation, with exact, resumable data order.

Training (`train_loader`). Per epoch the train split (N videos) is laid out as one
sequence: the shards in an order drawn from (seed, epoch), each shard's videos in CSV order.
The sequence is extended by wrapping around to S * W * B videos, S = `steps_per_epoch` =
ceil(N / (W * B)) for W ranks and B videos per batch, so every rank yields exactly S batches
(DDP needs equal counts) and every video is seen at least once per epoch. Rank r takes the
r-th contiguous block of S * B videos; within a rank, worker role w takes a contiguous
run of whole batches (the first S % nw roles one batch more). A role streams its shard
segments interleaved at random (seeded), passes raw samples through a seeded shuffle buffer
(`cfg.shuffle_buffer` videos), then decodes, flips and collates. The torch DataLoader takes
batches from its workers round-robin, so the rank's batch sequence is a pure function of
(seed, epoch, rank, world_size, num_workers): batch j of an epoch is role j % nw's.
`start_batch=k` resumes at the rank's k-th batch: each role drops the raw (undecoded)
samples of the batches before k, and the workers' roles are rotated so the round-robin
continues where it stopped. `epochs=None` keeps one set of worker processes for the whole
run, walking epoch after epoch (no start-up or pipeline drain at epoch boundaries); the
roles rotate at each boundary the same way, so the batches are exactly those of separate
one-epoch loaders, and a resume with (epoch, start_batch) continues the same sequence.

Augmentation: with `cfg.hflip`, each video is mirrored horizontally with probability 1/2;
its frames, masks and crops are flipped together (the batch's `hflip` says which). Nothing
else by default.

Evaluation (`eval_loader`): the split in CSV order, cut into contiguous blocks per rank
(sizes differ by at most one video) and per worker; every video exactly once, no padding,
batches of `cfg.eval_batch_videos` (a worker's last batch may be smaller), no augmentation.
Batches carry `index` (position in the split) to restore CSV order.

Transport: workers send frames, crops and masks as uint8 (a quarter of the bytes through
shared memory) and `to_device` normalises them in the consumer: on the GPU with
`device="cuda:N"` (pinned memory, non-blocking copies), else on the CPU in the main
process (`avs-dist bench data` measured both splits of the work: this one costs less CPU).

A batch is a dict (B videos; H = W = cfg.image_size, c = cfg.crop_size):
  frames float32 [B,5,3,H,W] ImageNet-normalised; masks float32 [B,5,H,W] the reference's
  targets (stored v / 255, data/masks.py: S4 0/1, MS3 palette index / 255; zeros where there
  is no mask); mask_valid bool [B,5]; crops float32 [B,5,3,c,c] normalised (None
  with crops=False: nothing of the crops is read); audio float32 [B,5,1,96,64];
  label int64 [B] (-1 for MS3); index int64 [B]; hflip bool [B]; name list[str].
Frames and crops are resized (bilinear, antialiased when shrinking, rounded to uint8)
when the stored size differs from the configured one; masks with nearest.
"""
from __future__ import annotations

import functools
import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from avs_dist.data.layout import FRAMES_PER_VIDEO
from avs_dist.data.masks import mask_targets
from avs_dist.data.shards import ShardError, decode_sample, iter_raw, read_manifest, split_shards

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def steps_per_epoch(manifest, world_size: int, batch_videos: int) -> int:
    """Batches every rank yields per training epoch: ceil(N_train / (world_size * batch_videos)).

    `manifest`: the dict from read_manifest, or a shard folder."""
    if not isinstance(manifest, dict):
        manifest = read_manifest(manifest)
    return _steps(manifest["splits"]["train"]["videos"], world_size, batch_videos)


def _steps(n_train: int, world_size: int, batch_videos: int) -> int:
    # Every rank must yield exactly this many batches (DDP), from the manifest or from the plan.
    if n_train == 0:
        raise ShardError("the shard set has no train videos")
    return math.ceil(n_train / (world_size * batch_videos))


# ----------------------------------------------------------------------------- planning


def _sequence(entries: list[dict], order) -> list[tuple[str, int, str]]:
    return [(entries[i]["path"], pos, key) for i in order for pos, key in enumerate(entries[i]["keys"])]


def _segments(items: list[tuple[str, int, str]]) -> list[tuple[str, list[str]]]:
    """Cut (path, position, key) runs into per-shard segments read in one forward pass."""
    segs: list[tuple[str, list[str]]] = []
    last = None
    for path, pos, key in items:
        if last is None or path != last[0] or pos <= last[1]:
            segs.append((path, []))
        segs[-1][1].append(key)
        last = (path, pos)
    return segs


def _split_batches(n_batches: int, parts: int) -> list[tuple[int, int]]:
    """(first batch, count) per part; the first n_batches % parts parts get one more."""
    out, start = [], 0
    for w in range(parts):
        n = n_batches // parts + (w < n_batches % parts)
        out.append((start, n))
        start += n
    return out


def train_plan(entries: list[dict], seed: int, epoch: int, rank: int, world_size: int,
               batch_videos: int, num_workers: int) -> list[list[tuple[str, list[str]]]]:
    """Per worker role: the shard segments [(path, [keys])] it reads this epoch (see module doc)."""
    rng = np.random.default_rng([seed, epoch, 0])
    seq = _sequence(entries, rng.permutation(len(entries)))
    n = len(seq)
    steps = _steps(n, world_size, batch_videos)
    per_rank = steps * batch_videos
    mine = [seq[i % n] for i in range(rank * per_rank, (rank + 1) * per_rank)]
    return [_segments(mine[first * batch_videos:(first + count) * batch_videos])
            for first, count in _split_batches(steps, max(1, num_workers))]


def eval_plan(entries: list[dict], rank: int, world_size: int, batch_videos: int,
              num_workers: int) -> list[list[tuple[str, list[str]]]]:
    seq = _sequence(entries, range(len(entries)))
    n = len(seq)
    mine = seq[rank * n // world_size:(rank + 1) * n // world_size]
    n_batches = math.ceil(len(mine) / batch_videos)
    return [_segments(mine[first * batch_videos:(first + count) * batch_videos])
            for first, count in _split_batches(n_batches, max(1, num_workers))]


# ----------------------------------------------------------------------------- streaming


def _read_segment(path: str, keys: list[str], crops: bool):
    wanted = set(keys)
    stream = iter_raw([path], select=wanted.__contains__, crops=crops)
    done = 0
    for key, raw in zip(keys, stream):
        if raw["__key__"] != key:
            raise ShardError(f"{path}: found sample {raw['__key__']}, the manifest lists {key} next")
        done += 1
        yield raw
    if done < len(keys):
        raise ShardError(f"{path}: ends before sample {keys[done]} listed in the manifest")


def _interleave(segments, rng: np.random.Generator, crops: bool):
    """Draw from all segments at once, each step from one chosen in proportion to what it has left."""
    streams = [_read_segment(p, k, crops) for p, k in segments]
    left = np.array([len(k) for _, k in segments], dtype=np.float64)
    while left.sum() > 0:
        i = rng.choice(len(streams), p=left / left.sum())
        left[i] -= 1
        yield next(streams[i])


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


def _count(n: int, role: int, nw: int) -> int:
    """How many of the rank's batches 0 .. n-1 belong to `role` (batch j is role j % nw's)."""
    return max(0, -(-(n - role) // nw))


def _epoch_samples(segments, seed, epoch, rank, role, skip, take, shuffle_buffer, hflip, crops):
    """Raw samples `skip` .. `skip + take - 1` of a role's stream for one epoch."""
    import webdataset as wds

    if take == 0:
        return
    n = sum(len(k) for _, k in segments)
    stream = _interleave(segments, np.random.default_rng([seed, epoch, rank, role, 1]), crops)
    if shuffle_buffer > 1:
        shuffle_seed = int(np.random.SeedSequence([seed, epoch, rank, role, 2]).generate_state(1)[0])
        stream = wds.shuffle(bufsize=shuffle_buffer, initial=shuffle_buffer,
                             rng=random.Random(shuffle_seed))(stream)
    # Flips are drawn per stream position up front, so skipping does not shift them.
    flips = np.random.default_rng([seed, epoch, rank, role, 3]).random(n) < 0.5 if hflip else np.zeros(n, bool)
    for pos, raw in enumerate(stream):
        if pos >= skip + take:
            break
        if pos < skip:
            continue  # raw bytes only: nothing decoded
        raw["__hflip__"] = bool(flips[pos])
        yield raw


def _train_source(entries, seed, epoch, epochs, rank, world_size, batch_videos, num_workers, start_batch,
                  used, shuffle_buffer, hflip, crops):
    """This worker's raw samples, epoch after epoch (`epochs` of them; None: without end).

    The DataLoader hands out batches round-robin: the rank's g-th batch (counted from the
    first one this loader yields, across epochs) comes from worker g % nw. Epoch e yields
    its batches first .. used - 1 (first = start_batch in the first epoch, else 0); its
    batch j is role j % nw's (the plan's contiguous blocks), so worker w plays role
    (w + first - done) % nw in it, done = batches yielded before the epoch."""
    nw = max(1, num_workers)
    w = _worker_id()
    e, first, done = epoch, start_batch, 0
    while epochs is None or e < epoch + epochs:
        role = (w + first - done) % nw
        plan = train_plan(entries, seed, e, rank, world_size, batch_videos, num_workers)
        skip, take = _count(first, role, nw), _count(used, role, nw) - _count(first, role, nw)
        yield from _epoch_samples(plan[role], seed, e, rank, role, skip * batch_videos, take * batch_videos,
                                  shuffle_buffer, hflip, crops)
        done += used - first
        e, first = e + 1, 0


def _eval_source(plan, crops):
    for raw in _interleave_in_order(plan[_worker_id()], crops):
        raw["__hflip__"] = False
        yield raw


def _interleave_in_order(segments, crops):
    for path, keys in segments:
        yield from _read_segment(path, keys, crops)


def _decode(raw: dict, crops: bool) -> dict:
    video = decode_sample(raw, crops=crops)
    video["hflip"] = raw["__hflip__"]
    return video


# ----------------------------------------------------------------------------- collation


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """[..., C, H, W] float -> [..., C, size, size]."""
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


def _mean_inv_std() -> tuple[torch.Tensor, torch.Tensor]:
    inv_std = 1.0 / (torch.tensor(IMAGENET_STD) * 255.0)
    return torch.tensor(IMAGENET_MEAN) * 255.0 * inv_std, inv_std


def _alloc(shape, dtype) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker it is born in shared memory, so
    handing the batch to the main process does not copy it again (share_memory_() on a
    new tensor would: it copies the old storage into a new shared one)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes)).view(shape)


def _images(stacks: list[np.ndarray], size: int, normalize: bool) -> torch.Tensor:
    """uint8 [5,h,w,3] per video (already flipped) -> [B,5,3,size,size]: float normalised,
    or uint8 when `normalize` is False (normalisation then happens on the device)."""
    if any(s.shape != stacks[0].shape for s in stacks):
        return torch.cat([_images([s], size, normalize) for s in stacks])
    B, (T, h, w, C) = len(stacks), stacks[0].shape
    if (h, w) == (size, size) and not normalize:
        buf = _alloc((B, T, h, w, C), torch.uint8)
        np.stack(stacks, out=buf.numpy())
        return buf.permute(0, 1, 4, 2, 3)  # channels-last view; to_device makes it contiguous on the GPU
    x = torch.from_numpy(np.stack(stacks)).permute(0, 1, 4, 2, 3)  # a view: no copy yet
    if (h, w) != (size, size):
        x = _resize(x.float(), size, "bilinear")
        if not normalize:
            return x.round_().clamp_(0, 255).to(torch.uint8)
    else:
        # One pass from uint8 to contiguous float, then one fused scale-and-shift.
        x = _alloc(x.shape, torch.float32).copy_(x)
    shift, scale = _mean_inv_std()
    return x.mul_(scale.view(3, 1, 1)).sub_(shift.view(3, 1, 1))


def _masks(videos: list[dict], size: int, flips: list[bool], dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[B,5,size,size] masks (zeros where a frame has none) and mask_valid [B,5]."""
    B = len(videos)
    valid = np.zeros((B, FRAMES_PER_VIDEO), dtype=bool)
    if any(v["frames"].shape != videos[0]["frames"].shape for v in videos):
        parts = [_masks([v], size, [f], dtype) for v, f in zip(videos, flips)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    h, w = videos[0]["frames"].shape[1:3]
    resize = (h, w) != (size, size)
    # Written straight into the batch's (shared) buffer when no resize follows; numpy:
    # single-threaded fills are far cheaper than torch's for these small arrays.
    masks = torch.zeros if resize else _alloc
    masks = masks((B, FRAMES_PER_VIDEO, h, w), dtype=dtype if not resize else torch.uint8)
    out = masks.numpy()
    if not resize:
        out.fill(0)
    float_now = dtype != torch.uint8 and not resize
    for b, (v, flip) in enumerate(zip(videos, flips)):
        frames = v["mask_frames"]
        stored = v["masks"][:, :, ::-1] if flip else v["masks"]
        out[b, frames] = mask_targets(stored) if float_now else stored  # the target is stored v / 255
        valid[b, frames] = True
    if resize:
        masks = _resize(masks[:, :, None].float(), size, "nearest")[:, :, 0].to(torch.uint8)
        masks = _alloc(masks.shape, dtype).copy_(mask_targets(masks) if dtype != torch.uint8 else masks)
    return masks, torch.from_numpy(valid)


def collate(videos: list[dict], image_size: int, crop_size: int, normalize: bool = True) -> dict:
    """Decoded videos -> the training / eval batch (see module docstring).

    normalize=False keeps frames and crops uint8 [B,5,3,H,W] (channels-last strides, as
    decoded) and masks uint8: a quarter of the bytes to move between processes and no
    transpose on the CPU; `to_device` finishes the batch on the device. Videos decoded
    without crops give "crops": None.
    """
    flips = [bool(v["hflip"]) for v in videos]
    # Flipping the uint8 arrays is free: np.stack copies the reversed views anyway.
    frames = [v["frames"][:, :, ::-1] if f else v["frames"] for v, f in zip(videos, flips)]
    crops = None
    if "crops" in videos[0]:
        crops = _images([v["crops"][:, :, ::-1] if f else v["crops"] for v, f in zip(videos, flips)],
                        crop_size, normalize)
    masks, valid = _masks(videos, image_size, flips, torch.float32 if normalize else torch.uint8)
    audio = _alloc((len(videos), *videos[0]["audio"].shape), torch.float32)
    np.stack([v["audio"] for v in videos], out=audio.numpy())
    return {
        "frames": _images(frames, image_size, normalize),
        "masks": masks,
        "mask_valid": valid,
        "crops": crops,
        "audio": audio[:, :, None],
        "label": torch.tensor([v["label"] for v in videos], dtype=torch.int64),
        "index": torch.tensor([v["index"] for v in videos], dtype=torch.int64),
        "hflip": torch.tensor(flips),
        "name": [v["name"] for v in videos],
    }


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 [...,3,H,W] (any strides) -> contiguous float32, ImageNet-normalised, on x's device."""
    shift, scale = (t.view(3, 1, 1) for t in _mean_inv_std())
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if x.device.type == "cpu":
        # numpy: one thread, cast + transpose + scale in one pass; torch's intra-op threads
        # cost several times the CPU here when other processes load the cores.
        out = y.numpy()
        np.multiply(x.numpy(), scale.numpy(), out=out)
        np.subtract(out, shift.numpy(), out=out)
        return y
    scale, shift = scale.to(x.device, non_blocking=True), shift.to(x.device, non_blocking=True)
    return y.copy_(x).mul_(scale).sub_(shift)  # copy_: cast + transpose in one kernel


_WIRE_NUMEL = 4096


def _to_wire(batch: dict) -> dict:
    """Small tensors -> numpy arrays for the trip from a worker: they travel inside the
    pickle, while each tensor costs a shared-memory segment and a file-descriptor handover
    (a few hundred microseconds each)."""
    return {k: (v.numpy() if torch.is_tensor(v) and v.numel() <= _WIRE_NUMEL else v) for k, v in batch.items()}


def to_device(batch: dict, device, non_blocking: bool = True) -> dict:
    """Move a batch to `device`; uint8 frames / crops / masks (collate(normalize=False)) are
    normalised there, so the result always matches the batch contract. Copies are
    non-blocking (asynchronous from pinned memory); the kernels after them queue behind."""
    out = {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in batch.items()}
    out = {k: (v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v) for k, v in out.items()}
    for k in ("frames", "crops"):
        if out.get(k) is not None and out[k].dtype == torch.uint8:
            out[k] = _normalize(out[k])
    if out["masks"].dtype == torch.uint8:
        out["masks"] = mask_targets(out["masks"])  # stored v -> the reference's target v / 255
    return out


# ----------------------------------------------------------------------------- loaders


class Batches:
    """The batches of a loader: iterable, with len() = the number of batches it yields
    (a TypeError for an endless one, epochs=None).

    `loader` yields what the workers send (uint8 images and masks, small arrays as numpy,
    see _to_wire); each batch is finished by `to_device` on `device` (None: the CPU, in
    this process)."""

    def __init__(self, loader, length: int | None, device=None):
        self.loader, self.length, self.device = loader, length, device

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("an endless train loader (epochs=None) has no length")
        return self.length

    def __iter__(self):
        device = "cpu" if self.device is None else self.device
        return (to_device(b, device) for b in self.loader)


def _loader(source, cfg_data, batch_videos: int, partial: bool, num_workers: int, device, crops: bool,
            transport: str = "uint8"):
    import webdataset as wds

    pipeline = wds.DataPipeline(
        source,
        wds.map(functools.partial(_decode, crops=crops)),
        wds.batched(batch_videos, collation_fn=functools.partial(
            collate, image_size=cfg_data.image_size, crop_size=cfg_data.crop_size,
            normalize=transport == "float"), partial=partial),
        wds.map(_to_wire),
    )
    # Pinned host memory makes the copy to the GPU asynchronous (to_device is non-blocking).
    pin = device is not None and torch.device(device).type == "cuda"
    return wds.WebLoader(
        pipeline, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin,
        prefetch_factor=cfg_data.prefetch_factor if num_workers > 0 else None,
        persistent_workers=False, worker_init_fn=_ignore_stop_signals,
    )


def _ignore_stop_signals(worker_id: int) -> None:
    # torchrun and Slurm signal whole process groups. SIGTERM/SIGUSR2 ask the rank to save at
    # the next step boundary, which needs its loader workers alive until then; they still end
    # with the rank (the DataLoader shuts them down, and they exit when their parent is gone).
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def train_loader(shard_dir: str | Path, cfg_data, rank: int, world_size: int, seed: int, epoch: int,
                 start_batch: int = 0, device=None, crops: bool = True, epochs: int | None = 1,
                 batches_per_epoch: int | None = None) -> Batches:
    """Batches of `cfg_data.batch_videos` videos of one rank, from batch `start_batch` of
    `epoch` on, for `epochs` epochs (None: without end) through one set of worker
    processes (module docstring).

    Epoch e yields its batches 0 .. P-1, P = `batches_per_epoch` (default and at most
    steps_per_epoch(...); fewer: the same first P batches, e.g. when grad_accum does not
    divide it), the first epoch from `start_batch` on; the sequence is the one that
    separate one-epoch loaders would give. `device` (e.g. "cuda:0"): workers send uint8
    images (pinned) and the batch is normalised on that device (same values; saves most
    of the loader's CPU); None: float batches on the CPU. crops=False: no crops read or
    decoded, batch["crops"] is None (a model without a crop branch).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    manifest = read_manifest(shard_dir)
    steps = steps_per_epoch(manifest, world_size, cfg_data.batch_videos)
    used = steps if batches_per_epoch is None else batches_per_epoch
    if not 1 <= used <= steps:
        raise ValueError(f"batches_per_epoch {batches_per_epoch} is not in [1, {steps}] (batches per epoch)")
    if not 0 <= start_batch <= used:
        raise ValueError(f"start_batch {start_batch} is not in [0, {used}] (batches per epoch)")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs {epochs} is not >= 1 (or None: without end)")
    nw = cfg_data.num_workers
    source = functools.partial(_train_source, split_shards(shard_dir, "train", manifest), seed, epoch, epochs,
                               rank, world_size, cfg_data.batch_videos, nw, start_batch, used,
                               cfg_data.shuffle_buffer, cfg_data.hflip, crops)
    length = None if epochs is None else used * epochs - start_batch
    return Batches(_loader(source, cfg_data, cfg_data.batch_videos, False, nw, device, crops), length, device)


def eval_loader(shard_dir: str | Path, split: str, cfg_data, rank: int = 0, world_size: int = 1,
                max_videos: int | None = None, device=None, crops: bool = True, transport: str = "uint8") -> Batches:
    """Every video of `split` exactly once across ranks and workers, in batches of
    `cfg_data.eval_batch_videos` carrying `index`; ranks may get different batch counts.

    `max_videos`: only the first N videos of the split (quick checks, benchmarks);
    `device`, `crops`: as in train_loader. transport="float": the workers normalise and send
    float32 (4x the bytes between processes; more CPU in all, measured by `avs-dist bench
    data`), kept for that comparison."""
    if transport not in ("uint8", "float"):
        raise ValueError(f"transport {transport!r} is not 'uint8' or 'float'")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    entries = split_shards(shard_dir, split)
    if max_videos is not None:
        kept, left = [], max_videos
        for e in entries:
            if left > 0:
                kept.append(dict(e, keys=e["keys"][:left]))
                left -= len(kept[-1]["keys"])
        entries = kept
    nw = cfg_data.num_workers
    plan = eval_plan(entries, rank, world_size, cfg_data.eval_batch_videos, nw)
    length = sum(math.ceil(sum(len(k) for _, k in segs) / cfg_data.eval_batch_videos) for segs in plan)
    source = functools.partial(_eval_source, plan, crops)
    return Batches(_loader(source, cfg_data, cfg_data.eval_batch_videos, True, nw, device, crops, transport),
                   length, device)
