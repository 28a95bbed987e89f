"""WebDataset shard loaders: training in global batches that do not depend on the cluster, and
evaluation that visits every video once.

Training (`TrainStream`, `train_loader`). The unit is the **global batch**: G videos per
optimizer step over all ranks (`data.global_batch_videos`, or `data.batch_videos` x ranks x
`optim.grad_accum`; config.global_batch). Epoch e of the train split (N videos, CSV order)
is one sequence drawn from (seed, e) alone:

    order  = permutation of the N videos (numpy default_rng([seed, e, 0]))
    seq[p] = order[p % N] for p < S * G, S = ceil(N / G) steps per epoch (the last global
             batch wraps around to the epoch's first videos, so every rank has work)
    flip[p] = default_rng([seed, e, 3]).random(S * G)[p] < 0.5   (with data.hflip)

Global batch k of epoch e is seq[k*G : (k+1)*G]. With W ranks and A micro-steps per
optimizer step, each rank takes b = G / (W * A) videos per micro-step: micro-step m of
step k gives rank r the positions k*G + m*W*b + r*b + [0, b). So the sequence of global
batches is a function of (seed, epoch, G) only: not of the number of nodes, ranks or
loader workers; a run can resume on another world size at the same (epoch, step) and see
the same videos in every later step. Videos are read by key (data/samples.py), decoded,
flipped (frames, masks and crops together) and collated in the loader workers; worker w
of nw builds the rank's micro-batches g, g + nw, ... (g counted from the start position),
which the DataLoader hands out round-robin, i.e. in order.

AVSBench-semantic (5- and 10-frame clips; the manifest lists each clip's frame count).
`data.avss_batching` decides which clips share a global batch; both keep it a function of
(seed, epoch, G) only, so the resume rule above holds unchanged:
  "bucket"  every global batch holds clips of one length. The epoch's permutation is split
            by length (keeping its order within a length); each length's clips are cut into
            global batches of G (its last one wrapping to that length's first clips), and
            default_rng([seed, e, 1]).permutation decides which length each step takes its
            next batch from. S = sum over lengths of ceil(N_len / G). 5-frame batches run at
            T = 5: no padded frames (docs/perf/NOTES.md "AVSS batching").
  "pad"     the plain rule above: clips mixed as drawn (the reference's batch composition).
            Each rank pads its own micro-batch to the longest clip in it (avss/batches.py),
            so T may differ between ranks and micro-steps of one step; a micro-batch of
            5-frame clips runs at T = 5 even when another rank's runs at 10. Which frames
            exist, are labelled and are scored (frame_exists, mask_valid) does not depend on
            T; only BatchNorm's batch statistics in training see the padded frames, as the
            reference's do (models/avsmodel.py), and those are per rank anyway.
A set with one clip length (only v2, or S4 / MS3) gets the plain rule under either setting.
`TrainOrder.step_frames` counts the frames that exist in a global batch (for frames/s).

Evaluation (`eval_loader`): the split in CSV order, cut into contiguous blocks per rank
(sizes differ by at most one video) and per worker; every video exactly once, no padding,
batches of `cfg.eval_batch_videos` (a worker's last batch may be smaller), no augmentation.
Batches carry `index` (position in the split) to restore CSV order. AVSS with
avss_batching="bucket": each rank's block is ordered by clip length first (CSV order within a
length) and no batch holds two lengths (a rank's last batch of each length may be smaller).

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
AVSS batches have T frames, class-index masks, frame_exists and more: avss/batches.py.
Frames and crops are resized (bilinear, antialiased when shrinking, rounded to uint8)
when the stored size differs from the configured one; masks with nearest.
"""
from __future__ import annotations

import collections
import functools
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avs_dist.avss.batches import collate_clips, finish as finish_clip_batch
from avs_dist.data.layout import FRAMES_PER_VIDEO
from avs_dist.data.masks import mask_targets
from avs_dist.data.samples import SampleReader
from avs_dist.data.shards import ShardError, decode_sample, iter_raw, read_manifest, split_shards
from avs_dist.data.transforms import alloc_shared, normalize_uint8, resize, stack_images


# ----------------------------------------------------------------------------- the train order


def clip_frames(entries: list[dict], manifest: dict) -> tuple[int, ...] | None:
    """Each video's frame count, in the entries' (CSV) order: from an AVSS manifest's
    per-shard "num_frames"; None for S4 / MS3 (every video has 5). ShardError for an AVSS
    set packed without them."""
    if manifest.get("subset") != "avss":
        return None
    out: list[int] = []
    for e in entries:
        n = e.get("num_frames")
        if n is None or len(n) != len(e["keys"]):
            raise ShardError(f"{e['path']}: its manifest entry lists no frame count per clip (packed by an older "
                             f"avs-dist); re-pack the AVSS set (avs-dist pack --subset avss --overwrite)")
        out += [int(x) for x in n]
    return tuple(out)


@dataclass(frozen=True)
class TrainOrder:
    """The epoch sequences of the train split for one global batch size (module docstring).

    refs: (shard path, sample key) of every train video, CSV order; global_batch: G;
    lengths: each video's frame count (AVSS) or None (every video has 5); bucket: global
    batches of one length (data.avss_batching="bucket"; only with lengths)."""

    refs: tuple[tuple[str, str], ...]
    seed: int
    global_batch: int
    hflip: bool = True
    lengths: tuple[int, ...] | None = None
    bucket: bool = False

    @classmethod
    def from_shards(cls, shard_dir, seed: int, global_batch: int, hflip: bool = True,
                    manifest: dict | None = None, bucket: bool = False) -> TrainOrder:
        manifest = manifest or read_manifest(shard_dir)
        entries = split_shards(shard_dir, "train", manifest)
        refs = tuple((e["path"], key) for e in entries for key in e["keys"])
        if not refs:
            raise ShardError(f"{shard_dir}: the shard set has no train videos")
        if global_batch < 1:
            raise ValueError(f"global batch {global_batch} must be >= 1 video")
        lengths = clip_frames(entries, manifest)
        return cls(refs, seed, global_batch, hflip, lengths, bucket and lengths is not None)

    # Derived once per order (the loader asks per micro-batch); a cached_property writes the
    # instance __dict__ directly, which a frozen dataclass allows.
    @functools.cached_property
    def _buckets(self) -> dict[int, int] | None:
        """{clip length: clips} when the order is bucketed and has two or more lengths, else None."""
        if not self.bucket or self.lengths is None:
            return None
        counts = dict(sorted(collections.Counter(self.lengths).items()))
        return counts if len(counts) > 1 else None

    @functools.cached_property
    def steps_per_epoch(self) -> int:
        if self._buckets is None:
            return math.ceil(len(self.refs) / self.global_batch)
        return sum(math.ceil(count / self.global_batch) for count in self._buckets.values())

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(video index, flip) per position 0 .. S*G-1 of `epoch`."""
        n, g = len(self.refs), self.global_batch
        length = self.steps_per_epoch * g
        order = np.random.default_rng([self.seed, epoch, 0]).permutation(n)
        flips = (np.random.default_rng([self.seed, epoch, 3]).random(length) < 0.5 if self.hflip
                 else np.zeros(length, dtype=bool))
        buckets = self._buckets
        if buckets is None:
            return order[np.arange(length) % n], flips
        lengths = np.asarray(self.lengths)[order]
        batches = []  # per bucket, its global batches in order
        for frames in buckets:
            members = order[lengths == frames]  # the epoch's order within the bucket
            steps = math.ceil(len(members) / g)
            batches.append(list(members[np.arange(steps * g) % len(members)].reshape(steps, g)))
        # which bucket each step takes its next batch from: a seeded shuffle of the labels
        labels = np.repeat(np.arange(len(batches)), [len(b) for b in batches])
        labels = labels[np.random.default_rng([self.seed, epoch, 1]).permutation(len(labels))]
        taken = [iter(b) for b in batches]
        return np.concatenate([next(taken[k]) for k in labels]), flips

    def step_frames(self, step: int) -> int:
        """Frames that exist in global batch `step` (counted from step 0 of epoch 0): G x 5
        for S4 / MS3, the sum of its clips' frame counts for AVSS."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if self.lengths is None:
            return self.global_batch * FRAMES_PER_VIDEO
        videos, _ = self.epoch(epoch)
        lengths = np.asarray(self.lengths)
        return int(lengths[videos[k * self.global_batch:(k + 1) * self.global_batch]].sum())


@dataclass(frozen=True)
class RankShare:
    """Which positions of each global batch one rank reads (module docstring)."""

    rank: int
    world_size: int
    grad_accum: int
    micro_batch: int  # b = G / (world_size * grad_accum)

    def positions(self, order: TrainOrder, micro_index: int) -> tuple[int, int, int]:
        """(epoch, first position, end) of the rank's micro-batch `micro_index`, counted from
        micro-step 0 of step 0 of epoch 0."""
        per_epoch = order.steps_per_epoch * self.grad_accum
        epoch, rest = divmod(micro_index, per_epoch)
        step, micro = divmod(rest, self.grad_accum)
        first = step * order.global_batch + (micro * self.world_size + self.rank) * self.micro_batch
        return epoch, first, first + self.micro_batch


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _train_source(order: TrainOrder, share: RankShare, first: int, count: int | None, crops: bool):
    """This worker's micro-batches of raw samples: the rank's micro-batches first + w, first
    + w + nw, ... (count micro-batches in all; None: without end), a list of b samples each."""
    w, nw = _worker()
    reader = SampleReader(crops=crops)
    cached = (None, None)
    stop = None if count is None else first + count
    try:
        for g in itertools.count(first + w, nw):
            if stop is not None and g >= stop:
                return
            epoch, start, end = share.positions(order, g)
            if cached[0] != epoch:
                cached = (epoch, order.epoch(epoch))
            videos, flips = cached[1]
            batch = []
            for p in range(start, end):
                raw = reader.read(*order.refs[videos[p]])
                raw["__hflip__"] = bool(flips[p])
                batch.append(raw)
            yield batch
    finally:
        reader.close()


def _decode(raw: dict, crops: bool) -> dict:
    video = decode_sample(raw, crops=crops)
    video["hflip"] = raw["__hflip__"]
    return video


def _batch(raws: list[dict], crops: bool, image_size: int, crop_size: int, normalize: bool) -> dict:
    """One batch of raw samples -> decoded, collated and ready for the trip from the worker."""
    return _to_wire(collate([_decode(r, crops) for r in raws], image_size, crop_size, normalize))


# ----------------------------------------------------------------------------- collation


def _masks(videos: list[dict], size: int, flips: list[bool], dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[B,5,size,size] masks (zeros where a frame has none) and mask_valid [B,5]."""
    B = len(videos)
    valid = np.zeros((B, FRAMES_PER_VIDEO), dtype=bool)
    if any(v["frames"].shape != videos[0]["frames"].shape for v in videos):
        parts = [_masks([v], size, [f], dtype) for v, f in zip(videos, flips)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    h, w = videos[0]["frames"].shape[1:3]
    resized = (h, w) != (size, size)
    # Written straight into the batch's (shared) buffer when no resize follows; numpy:
    # single-threaded fills are far cheaper than torch's for these small arrays.
    masks = torch.zeros if resized else alloc_shared
    masks = masks((B, FRAMES_PER_VIDEO, h, w), dtype=dtype if not resized else torch.uint8)
    out = masks.numpy()
    if not resized:
        out.fill(0)
    float_now = dtype != torch.uint8 and not resized
    for b, (v, flip) in enumerate(zip(videos, flips)):
        frames = v["mask_frames"]
        stored = v["masks"][:, :, ::-1] if flip else v["masks"]
        out[b, frames] = mask_targets(stored) if float_now else stored  # the target is stored v / 255
        valid[b, frames] = True
    if resized:
        masks = resize(masks[:, :, None].float(), size, "nearest")[:, :, 0].to(torch.uint8)
        masks = alloc_shared(masks.shape, dtype).copy_(mask_targets(masks) if dtype != torch.uint8 else masks)
    return masks, torch.from_numpy(valid)


def collate(videos: list[dict], image_size: int, crop_size: int, normalize: bool = True) -> dict:
    """Decoded videos -> the training / eval batch (see module docstring).

    normalize=False keeps frames and crops uint8 [B,5,3,H,W] (channels-last strides, as
    decoded) and masks uint8: a quarter of the bytes to move between processes and no
    transpose on the CPU; `to_device` finishes the batch on the device. Videos decoded
    without crops give "crops": None. AVSS clips (subset "avss") make the batch of
    avss/batches.py:collate_clips (T = the longest clip's frames, padding, frame_exists).
    """
    if videos[0].get("subset") == "avss":
        return collate_clips(videos, image_size, normalize)
    flips = [bool(v["hflip"]) for v in videos]
    # Flipping the uint8 arrays is free: np.stack copies the reversed views anyway.
    frames = [v["frames"][:, :, ::-1] if f else v["frames"] for v, f in zip(videos, flips)]
    crops = None
    if "crops" in videos[0]:
        crops = stack_images([v["crops"][:, :, ::-1] if f else v["crops"] for v, f in zip(videos, flips)],
                             crop_size, normalize)
    masks, valid = _masks(videos, image_size, flips, torch.float32 if normalize else torch.uint8)
    audio = alloc_shared((len(videos), *videos[0]["audio"].shape), torch.float32)
    np.stack([v["audio"] for v in videos], out=audio.numpy())
    return {
        "frames": stack_images(frames, image_size, normalize),
        "masks": masks,
        "mask_valid": valid,
        "crops": crops,
        "audio": audio[:, :, None],
        "label": torch.tensor([v["label"] for v in videos], dtype=torch.int64),
        "index": torch.tensor([v["index"] for v in videos], dtype=torch.int64),
        "hflip": torch.tensor(flips),
        "name": [v["name"] for v in videos],
    }


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
    if "frame_exists" in out:  # AVSS: zero padded frames, int64 class-index masks
        return finish_clip_batch(out)
    for k in ("frames", "crops"):
        if out.get(k) is not None and out[k].dtype == torch.uint8:
            out[k] = normalize_uint8(out[k])
    if out["masks"].dtype == torch.uint8:
        out["masks"] = mask_targets(out["masks"])  # stored v -> the reference's target v / 255
    return out


# ----------------------------------------------------------------------------- loaders


class Batches:
    """The batches of a loader: iterable, with len() = the number of batches it yields
    (a TypeError for an endless one).

    `loader` yields what the workers send (uint8 images and masks, small arrays as numpy,
    see _to_wire); each batch is finished by `to_device` on `device` (None: the CPU, in
    this process)."""

    def __init__(self, loader, length: int | None, device=None):
        self.loader, self.length, self.device = loader, length, device

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("an endless train loader has no length")
        return self.length

    def __iter__(self):
        device = "cpu" if self.device is None else self.device
        return (to_device(b, device) for b in self.loader)


def _loader(source, cfg_data, num_workers: int, device, crops: bool, transport: str = "uint8", seed: int = 0):
    """A DataLoader over `source`, which yields one list of raw samples per batch."""
    import webdataset as wds

    pipeline = wds.DataPipeline(
        source,
        wds.map(functools.partial(_batch, crops=crops, image_size=cfg_data.image_size,
                                  crop_size=cfg_data.crop_size, normalize=transport == "float")),
    )
    # Pinned host memory makes the copy to the GPU asynchronous (to_device is non-blocking).
    pin = device is not None and torch.device(device).type == "cuda"
    return wds.WebLoader(
        pipeline, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin,
        prefetch_factor=cfg_data.prefetch_factor if num_workers > 0 else None,
        persistent_workers=False, worker_init_fn=_ignore_stop_signals,
        # its own generator: starting the workers draws no number from the training RNG streams
        generator=torch.Generator().manual_seed(seed),
    )


def _ignore_stop_signals(worker_id: int) -> None:
    # Terminals, torchrun and Slurm signal whole process groups. A stop signal asks the rank
    # to save at the next step boundary, which needs its loader workers alive until then; they
    # still end with the rank (the DataLoader shuts them down, and they exit when their parent
    # is gone).
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)




def train_loader(shard_dir: str | Path, cfg_data, rank: int, world_size: int, seed: int, epoch: int = 0,
                 step: int = 0, *, grad_accum: int = 1, global_batch: int | None = None,
                 steps: int | None = None, endless: bool = False, device=None, crops: bool = True) -> Batches:
    """This rank's micro-batches from optimizer step `step` of `epoch` on: `steps` optimizer
    steps (default: to the end of the epoch), or without end (`endless`), through one set
    of worker processes; grad_accum micro-batches per step (module docstring).

    `global_batch`: G videos per optimizer step over all ranks (default: cfg_data's, see
    config.global_batch). `device` (e.g. "cuda:0"): the batch is normalised on that device
    from pinned uint8; None: float batches on the CPU. crops=False: no crops read or
    decoded, batch["crops"] is None (a model without a crop branch).
    Raises ConfigError when G does not split into world_size x grad_accum equal parts,
    ValueError for a position outside the epoch, ShardError for a shard set without train videos.
    """
    from avs_dist.config import global_batch as derive

    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    g, b = derive(cfg_data, world_size, grad_accum, global_batch)
    order = TrainOrder.from_shards(shard_dir, seed, g, cfg_data.hflip, bucket=cfg_data.avss_batching == "bucket")
    s = order.steps_per_epoch
    if not 0 <= step < s:
        raise ValueError(f"step {step} is not in [0, {s}) (steps per epoch of {g} videos)")
    if steps is None and not endless:
        steps = s - step
    if steps is not None and (endless or steps < 1):
        raise ValueError("train_loader: give steps >= 1 or endless=True, not both")
    share = RankShare(rank, world_size, grad_accum, b)
    first = (epoch * s + step) * grad_accum
    count = None if endless else steps * grad_accum
    source = functools.partial(_train_source, order, share, first, count, crops)
    loader = _loader(source, cfg_data, cfg_data.num_workers, device, crops, seed=seed)
    return Batches(loader, count, device)


@dataclass
class StepBatches:
    """What one optimizer step trains on: `micro` (grad_accum batches of this rank), the
    epoch they belong to, whether they close it, and the seconds spent waiting for them."""

    micro: list[dict]
    epoch: int
    epoch_end: bool
    wait_s: float


class TrainStream:
    """This rank's train data, one optimizer step at a time; the only owner of the data
    position (epoch, step in epoch) and of the epoch arithmetic (Stateful).

    One endless loader serves the whole run (no worker restart at epoch boundaries); it is
    started at the first `next_step`, so `load_state_dict` must come before that.
    state_dict() = {"epoch", "step_in_epoch", "last_epoch", "global_batch_videos", "train_videos",
    "seed"}, and "avss_batching" on AVSS shards (it fixes the order and the steps per epoch):
    world-size free, so a checkpoint continues on any number of ranks whose per-rank batch
    divides G (ValueError naming both global batches otherwise)."""

    def __init__(self, shard_dir, cfg_data, rank: int, world_size: int, seed: int, grad_accum: int = 1,
                 global_batch: int | None = None, device=None, crops: bool = True):
        from avs_dist.config import global_batch as derive

        self.shard_dir, self.cfg_data, self.rank, self.world_size = shard_dir, cfg_data, rank, world_size
        self.seed, self.grad_accum, self.device, self.crops = seed, grad_accum, device, crops
        self.global_batch, self.micro_batch = derive(cfg_data, world_size, grad_accum, global_batch)
        self.manifest = read_manifest(shard_dir)
        self.order = TrainOrder.from_shards(shard_dir, seed, self.global_batch, cfg_data.hflip, self.manifest,
                                            bucket=cfg_data.avss_batching == "bucket")
        self.steps_per_epoch = self.order.steps_per_epoch
        self.epoch = self.step_in_epoch = 0
        self.last_epoch = 0  # the epoch of the last step handed out
        self._it = None

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "last_epoch": self.last_epoch,
                 "seed": self.seed, "global_batch_videos": self.global_batch, "train_videos": len(self.order.refs)}
        if self.order.lengths is not None:
            state["avss_batching"] = self.cfg_data.avss_batching
        return state

    def load_state_dict(self, state: dict) -> None:
        if self._it is not None:
            raise RuntimeError("TrainStream.load_state_dict after the stream started")
        from avs_dist.config import ConfigError

        if state["global_batch_videos"] != self.global_batch:
            raise ConfigError(f"the checkpoint's global batch is {state['global_batch_videos']} videos per step, "
                             f"this run's is {self.global_batch} ({self.world_size} ranks x {self.micro_batch} x "
                             f"grad_accum {self.grad_accum}); set data.global_batch_videos="
                             f"{state['global_batch_videos']} to continue it")
        if state["train_videos"] != len(self.order.refs) or state["seed"] != self.seed:
            raise ConfigError(f"the checkpoint was trained on {state['train_videos']} train videos with seed "
                             f"{state['seed']}, this run has {len(self.order.refs)} with seed {self.seed}: "
                             f"not the same data order: resume with the checkpoint's shards and train.seed, "
                             f"or start a new --run-dir")
        saved = state.get("avss_batching")
        if saved is not None and saved != self.cfg_data.avss_batching:
            raise ConfigError(f"the checkpoint's AVSS clips were batched with data.avss_batching={saved!r}, this "
                              f"run's is {self.cfg_data.avss_batching!r}: set data.avss_batching={saved!r} to "
                              f"continue it (the setting fixes the data order)")
        self.epoch, self.step_in_epoch, self.last_epoch = state["epoch"], state["step_in_epoch"], state["last_epoch"]

    def next_step(self) -> StepBatches:
        t0 = time.perf_counter()
        if self._it is None:
            self._it = iter(train_loader(self.shard_dir, self.cfg_data, self.rank, self.world_size, self.seed,
                                         self.epoch, self.step_in_epoch, grad_accum=self.grad_accum,
                                         global_batch=self.global_batch, endless=True, device=self.device,
                                         crops=self.crops))
        micro = [next(self._it) for _ in range(self.grad_accum)]
        epoch = self.last_epoch = self.epoch
        self.step_in_epoch += 1
        end = self.step_in_epoch == self.steps_per_epoch
        if end:
            self.epoch, self.step_in_epoch = epoch + 1, 0
        return StepBatches(micro, epoch, end, time.perf_counter() - t0)

    def close(self) -> None:
        self._it = None  # the DataLoader iterator shuts its workers down when collected


def eval_plan(entries: list[dict], rank: int, world_size: int, batch_videos: int, num_workers: int,
              lengths: tuple[int, ...] | None = None) -> list[tuple[list[tuple[str, list[str]]], list[int]]]:
    """Per worker: (the shard segments [(path, [keys])] it reads, in order; the sizes of the
    batches it cuts from them).

    The rank's block of the split (CSV order) is cut into batches of `batch_videos`; with
    `lengths` (bucketed AVSS) the block is first ordered by clip length (CSV order within a
    length) and no batch holds two lengths. Workers take consecutive batches."""
    seq = [(e["path"], key) for e in entries for key in e["keys"]]
    n = len(seq)
    mine = list(range(rank * n // world_size, (rank + 1) * n // world_size))
    by_length = (lambda i: lengths[i]) if lengths is not None else (lambda i: 0)
    mine.sort(key=by_length)  # stable: CSV order within a length
    batches = []
    for _, group in itertools.groupby(mine, key=by_length):
        group = list(group)
        batches += [group[j:j + batch_videos] for j in range(0, len(group), batch_videos)]
    nw = max(1, num_workers)
    out, start = [], 0
    for w in range(nw):
        count = len(batches) // nw + (w < len(batches) % nw)
        items = [i for b in batches[start:start + count] for i in b]
        out.append((_segments([(*seq[i], i) for i in items]), [len(b) for b in batches[start:start + count]]))
        start += count
    return out


def _segments(items: list[tuple[str, str, int]]) -> list[tuple[str, list[str]]]:
    """(path, key, position in the split) items -> per-shard segments, each read in one
    forward pass: a new one where the shard changes or the order goes back."""
    segs: list[tuple[str, list[str]]] = []
    last = None
    for path, key, pos in items:
        if not segs or segs[-1][0] != path or pos < last:
            segs.append((path, []))
        segs[-1][1].append(key)
        last = pos
    return segs


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


def _eval_source(plan, crops):
    w, _ = _worker()
    segments, sizes = plan[w]
    raws = (raw for path, keys in segments for raw in _read_segment(path, keys, crops))
    for size in sizes:
        batch = list(itertools.islice(raws, size))
        for raw in batch:
            raw["__hflip__"] = False
        yield batch


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
    manifest = read_manifest(shard_dir)
    entries = split_shards(shard_dir, split, manifest)
    if max_videos is not None:
        kept, left = [], max_videos
        for e in entries:
            if left > 0:
                cut = {k: e[k][:left] for k in ("keys", "num_frames") if k in e}
                kept.append(dict(e, **cut))
                left -= len(kept[-1]["keys"])
        entries = kept
    lengths = clip_frames(entries, manifest)
    nw = cfg_data.num_workers
    plan = eval_plan(entries, rank, world_size, cfg_data.eval_batch_videos, nw,
                     lengths if cfg_data.avss_batching == "bucket" else None)
    length = sum(len(sizes) for _, sizes in plan)
    source = functools.partial(_eval_source, plan, crops)
    return Batches(_loader(source, cfg_data, nw, device, crops, transport), length, device)
