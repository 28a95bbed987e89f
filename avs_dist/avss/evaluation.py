"""AVSS evaluation: a model over an eval loader into avss/metrics.py's SemanticEvaluator, and the
audio gap of class-logit models. evaluation.py's `evaluate` dispatches here for
`model.mask_classes = 71`; `avs-dist eval`, the training's validation and the study call that.

Batches are data/loader.py's AVSS batches (architecture.md): `frames` [B,T,3,H,W], `masks` int64
[B,T,H,W] class indices, `frame_exists` / `mask_valid` bool [B,T], `audio` [B,T,1,96,64],
`index` int64 [B]; T = 10 or 5. The model gets `frame_exists` (its padded frames' audio and
logits are zeroed, models/system.py) and returns logits [B*T,71,H,W].

**Figures.** The result holds every figure of `avss.metrics.summarize` under its own name
(`miou_avsbench` / `f_avsbench`: the reference's; `miou_frame_*`, `miou_dataset_*`, ...: the
correct ones) and two headline entries:

    miou = miou_frame_all71,   f = f_frame_all71

the reference's own definition (per-frame IoU / F of each class averaged over the frames whose
union holds it, the mean over all 71 classes, an absent class counting 0) with the padded frames
left out. It is the correct figure closest to what AVSS papers publish (AVSBench, AVSegFormer,
COMBO-AVS all report the reference's `calc_color_miou_fscore`), so a number here can be set
beside theirs; the objects-only and dataset-level figures are in the result beside it. On one
split the set of classes present in the ground truth is fixed, so `miou` ranks checkpoints
exactly as the mean over the present classes does (validation's best checkpoint, train/state.py,
keeps the best `miou`).

**Padding.** The reference scores each clip as 10 frames, the 5-frame clips' padded frames as
perfect background frames (avss/metrics.py). The loader may pad a clip to 10 or hand it over in
a batch of 5 (bucketed by length); the frames a batch lacks are added here as padded frames, so
every figure (the reference's included) is the same either way. The correct figures never see
a padded frame.

**Audio gap** (as for S4, evaluation.py): every clip is segmented a second time with another
clip's audio; `audio_gap = miou - miou_mismatched` and `f_mismatched`, with `miou` / `f` as above
(frame-level, all 71 classes, padded frames out), over the same frames on both sides. Partners
(ClipAudioBank): among the first `per_length` clips (index order, over all ranks) of the same
length (5 or 10 frames, so every existing frame gets a second of real audio), the first one in
cyclic order from the clip's index whose labelled object classes share none with the clip's;
when no such clip exists, any other clip of that length; a clip alone of its length takes a
clip of the other length, cut or zero-padded to its frames; the choice depends only on the split.
`audio_gap_per_class` (with `per_class`): {class name: iou_frame matched - mismatched} for the
object classes present in the ground truth (background apart).

Every rank calls `evaluate_semantic` with its own share of the clips; the state is summed over
the ranks (exact integer sums), so the result is the same on every rank and for any batching.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from avs_dist.avss.batches import reference_padding
from avs_dist.avss.classes import AVSS_CLASSES, BACKGROUND, NUM_CLASSES
from avs_dist.avss.metrics import SemanticEvaluator
from avs_dist.evaluation import FirstPerKey
from avs_dist.metrics import refuse_duplicates

HEADLINE = {"miou": "miou_frame_all71", "f": "f_frame_all71"}  # headline key -> the figure it is
# The result's first keys, in this order (the rest follow in summarize's order).
ORDER = ("miou_avsbench", "f_avsbench", "miou", "f")
GAP_KEYS = ("audio_gap", "miou_mismatched", "f_mismatched")
# What the training's terminal line shows of an AVSS evaluation (train/sinks.py; every figure
# goes to eval.jsonl and TensorBoard).
TERMINAL_KEYS = (*ORDER, *GAP_KEYS, "miou_frame_objects", "miou_dataset_objects", "iou_frame_background")


def clip_lengths(batch: dict) -> torch.Tensor:
    """Frames that exist per clip, int64 [B] on the CPU (T for every clip without `frame_exists`)."""
    fe = batch.get("frame_exists")
    if fe is None:
        b, t = batch["frames"].shape[:2]
        return torch.full((b,), t, dtype=torch.int64)
    return fe.sum(1).long().cpu()


def clip_classes(batch: dict) -> list[frozenset]:
    """The object classes (1..70) labelled in each clip's labelled frames: B frozensets."""
    masks, valid = batch["masks"], batch["mask_valid"]
    b = masks.shape[0]
    clip = torch.arange(b, device=masks.device).view(b, 1, 1, 1).expand_as(masks)
    keep = valid.to(masks.device).view(b, -1, 1, 1).expand_as(masks)
    counts = torch.zeros(b * NUM_CLASSES, dtype=torch.int64, device=masks.device)
    counts.scatter_add_(0, (clip * NUM_CLASSES + masks.long())[keep], torch.ones_like(masks, dtype=torch.int64)[keep])
    present = (counts.view(b, NUM_CLASSES) > 0).cpu()
    present[:, BACKGROUND] = False
    return [frozenset(torch.nonzero(row).flatten().tolist()) for row in present]


class ClipAudioBank:
    """Partner audio for the AVSS mismatched pass (module docstring), the same on every rank.

    Keeps, per clip length, the audio (its existing seconds, [n,1,96,64] on the CPU) and object
    classes of the first `per_length` clips by index; `freeze` merges the ranks' entries,
    `partner_audio` builds a batch's mismatched audio [B,T,1,96,64].
    """

    def __init__(self, per_length: int = 8):
        self.kept = FirstPerKey(per_length)  # length -> [(clip index, (classes, audio on the CPU))]

    def add(self, batch: dict) -> None:
        lengths, classes = clip_lengths(batch), clip_classes(batch)
        for a, n, cls, index in zip(batch["audio"], lengths.tolist(), classes, batch["index"].tolist()):
            self.kept.add(n, int(index), (cls, a[:n].detach().to("cpu", copy=True)))

    def freeze(self, group=None) -> int:
        """Merge the ranks' entries (every rank of `group` must call it); returns the clips held."""
        self.kept.gather(group)
        return len(self.kept)

    def partner(self, n: int, index: int, cls: frozenset) -> tuple[int, torch.Tensor]:
        """(partner index, its audio [m,1,96,64]) for clip `index` of `n` frames and classes `cls`."""
        entries = self.kept.entries
        same = [e for e in entries.get(n, []) if e[0] != index]
        if not same:  # the only clip of its length: another length, cut or zero-padded by the caller
            same = [e for m in sorted(entries) for e in entries[m] if e[0] != index]
        if not same:
            raise ValueError("the audio gap needs at least two clips")
        start = index % len(same)
        cyclic = same[start:] + same[:start]
        chosen_index, (_, audio) = next((e for e in cyclic if not (e[1][0] & cls)), cyclic[0])
        return chosen_index, audio

    def partner_audio(self, batch: dict, device) -> torch.Tensor:
        """float32 [B,T,1,96,64] on `device`: each clip's partner audio in its existing seconds, zeros after."""
        audio = torch.zeros(batch["audio"].shape, dtype=batch["audio"].dtype)
        for b, (n, cls, index) in enumerate(zip(clip_lengths(batch).tolist(), clip_classes(batch),
                                               batch["index"].tolist())):
            _, a = self.partner(n, int(index), cls)
            m = min(n, a.shape[0])
            audio[b, :m] = a[:m]
        return audio.to(device, non_blocking=True)


def _update(evaluator: SemanticEvaluator, logits: torch.Tensor, batch: dict) -> None:
    """Add a batch; then the padded frames the batch lacks, so that the reference's figures
    score every clip as 10 frames whether the loader padded it to 10 or bucketed it at 5."""
    masks = batch["masks"]
    b, t = masks.shape[:2]
    fe = batch.get("frame_exists")
    fe = torch.ones(b, t, dtype=torch.bool, device=masks.device) if fe is None else fe
    evaluator.update(logits, masks.flatten(0, 1), fe.reshape(-1), batch["mask_valid"].reshape(-1))
    evaluator.add_padding(reference_padding(batch))


def _check_once(indices: list[int], group) -> int:
    """The number of clips over all ranks; ValueError when a clip was evaluated twice."""
    if dist.is_available() and dist.is_initialized():
        parts = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, indices, group=group)
        indices = [i for p in parts for i in p]
    refuse_duplicates(torch.as_tensor(sorted(indices), dtype=torch.int64), "clips")
    return len(indices)


def _gap_per_class(matched: list[dict], mismatched: list[dict], names) -> dict:
    return {names[k]: m["iou_frame"] - mm["iou_frame"]
            for k, (m, mm) in enumerate(zip(matched, mismatched))
            if k != BACKGROUND and m["present"] and m["iou_frame"] is not None and mm["iou_frame"] is not None}


def evaluate_semantic(model, fresh, device, segment, audio_gap: bool = True, precision: str = "auto",
                      group=None, per_class: bool = False, class_names=None) -> dict:
    """The AVSS figures of `model` over the batches of `fresh()` (module docstring).

    `fresh`: a callable returning a fresh iterable of batches (called twice with `audio_gap`);
    `segment(model, frames, audio, frame_exists)` -> logits [B*T,71,H,W]; `class_names`: the
    manifest's 71 names (default: avss/classes.py's). Returns `miou_avsbench`, `f_avsbench`,
    `miou`, `f`, (with `audio_gap`: `audio_gap`, `miou_mismatched`, `f_mismatched`, None for a split
    of one clip), every other figure of summarize, `videos` (clips), `frames` (scored frames) and,
    with `per_class`, `per_class` (summarize's 71 entries, named) and `audio_gap_per_class`.
    ValueError when a clip was evaluated twice or the logits are not [B*T,71,H,W].
    """
    from avs_dist.evaluation import _to_device
    from avs_dist.precision import autocast

    names = list(class_names) if class_names is not None else list(AVSS_CLASSES)
    matched = SemanticEvaluator()
    mismatched = SemanticEvaluator()
    bank = ClipAudioBank()
    indices: list[int] = []
    for batch in fresh():
        indices += batch["index"].tolist()
        if audio_gap:
            bank.add(batch)
        batch = _to_device(batch, device)
        with autocast(device, precision):
            logits = segment(model, batch["frames"], batch["audio"], batch.get("frame_exists"))
        _update(matched, logits, batch)
    videos = _check_once(indices, group)
    paired = audio_gap and bank.freeze(group) >= 2
    if paired:
        for batch in fresh():
            other = bank.partner_audio(batch, device)
            batch = _to_device(batch, device)
            with autocast(device, precision):
                logits = segment(model, batch["frames"], other, batch.get("frame_exists"))
            _update(mismatched, logits, batch)
    res = matched.result(group, names)
    res.update({k: res[v] for k, v in HEADLINE.items()})
    res.update(videos=videos, frames=res["frames_scored"])
    order = list(ORDER)
    if audio_gap:
        mis = mismatched.result(group, names) if paired else None
        res.update(audio_gap=res["miou"] - mis[HEADLINE["miou"]] if paired else None,
                   miou_mismatched=mis[HEADLINE["miou"]] if paired else None,
                   f_mismatched=mis[HEADLINE["f"]] if paired else None)
        order += GAP_KEYS
        if per_class and paired:
            res["audio_gap_per_class"] = _gap_per_class(res["per_class"], mis["per_class"], names)
    if not per_class:
        res.pop("per_class")
    return {**{k: res[k] for k in order}, **res}
