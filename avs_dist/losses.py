"""Training losses: mask BCE (S4, MS3) or class cross-entropy (AVSS), AVM (AVSBench's S4, MS3
and AVSS variants), and the seed's three crop-branch terms.

`total, terms = compute_losses(out, batch, cfg.loss)`. `terms` maps each enabled term's name
(bce, ce, avm, crop_ce, crop_pair, crop_audio) to its UNWEIGHTED value, not detached; `total` is
the sum of weight * term. Everything is a masked mean over tensors: no boolean indexing or
.item(), so no host synchronisation in the losses (an AVSS crop branch synchronises in the
model, where avss/objects.py:object_boxes checks the class range and counts its objects: two
syncs per step; models/system.py).

The crop terms have two forms. S4 (the seed's): 5 packed crops per video of its one sounding
object, the video's class (batch["label"]). AVSS (out["crop_objects"] is an avss/objects.py
ObjectBoxes): one crop per labelled frame and object class present in it, N per batch, N = 0
possible, each term 0 then (a masked mean, with a gradient of zeros reaching the branch); see
the `*_objects` functions for how each seed term carries over.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LossConfig

AVM_EPS = 1e-6  # -log(relu(cos) + eps), and the masked-pooling denominator, as AVSBench


def _masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(values * weights) / max(sum(weights), 1): 0 rather than NaN when nothing counts."""
    weights = weights.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1)


def bce_loss(logits: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Pixel-mean BCE over the frames with a ground-truth mask.

    logits [B*T, 1, H, W], masks [B, T, H, W] 0/1, valid bool [B, T]. S4 training marks only
    frame 0 valid (the reference's first-frame loss), MS3 all five. Equal to the reference's
    BCELoss(sigmoid(logits)) except where the latter clamps log() at -100.
    """
    b, t = valid.shape
    target = masks.reshape(b * t, 1, *masks.shape[-2:]).to(logits.dtype)
    per_frame = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(1, 2, 3))
    return _masked_mean(per_frame.float(), valid.reshape(-1))


def ce_loss(logits: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-pixel cross-entropy of class logits, the mean per frame, then over the labelled frames
    (avs_scripts/avss/loss.py F10_IoU_BCELoss: torch's CrossEntropyLoss(reduction='none'), no
    ignore index, pixel mean per frame, sum x flag / sum of flags).

    logits [B*T, K, H, W]; masks int64 [B, T, H, W] class indices in 0..K-1 (0 where a frame is
    not labelled); valid bool [B, T] (the frame is labelled). Computed in float32. 0, not the
    reference's NaN, when no frame is labelled.
    """
    b, t = valid.shape
    target = masks.reshape(b * t, *masks.shape[-2:]).long()
    per_pixel = F.cross_entropy(logits.float(), target, reduction="none")  # [B*T, H, W]
    return _masked_mean(per_pixel.mean(-1).mean(-1), valid.reshape(-1))


def _avm_inputs(avm: list, stages) -> dict:
    by_stage = {s: (v, a) for s, v, a in avm}
    missing = [s for s in stages if s not in by_stage]
    if missing:
        raise ValueError(f"AVM loss: no TPAVI audio-visual output for stages {missing} (have {sorted(by_stage)})")
    return by_stage


def _kl_softmax(visual: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
    """The reference's ``F.kl_div(softmax(visual).log(), softmax(audio), reduction='none')``
    ([N, C] -> [N, C]; both sides keep their gradient, as in the reference), computed from
    log-probabilities (``log_softmax`` both sides, ``log_target=True``): the same values to
    float32 rounding wherever the reference's are finite (tests/test_losses.py), without its
    NaN gradients. Once a channel's probability is denormal or 0 (channels ~90 apart, which
    the pooled AVSS features and TPAVI audio reach within ~50 steps of a tiny_avss run), the
    reference's forward stays finite but log()'s backward overflows (visual side) and xlogy's
    backward is 0/0 (audio side): every step of that run was then skipped as non-finite."""
    return F.kl_div(torch.log_softmax(visual, dim=-1), torch.log_softmax(audio, dim=-1), reduction="none",
                    log_target=True)


def avm_loss_s4(logits: torch.Tensor, avm: list, stages) -> torch.Tensor:
    """AVSBench's S4 audio-visual matching loss (avs_s4/loss.py), averaged over `stages`.

    logits [B*T, 1, H, W]; avm: (stage, visual [B*T, C, h, w], a' [B, T, C]) per TPAVI stage.
    Per stage: the predicted mask (sigmoid, average-pooled to the stage size, > 0.5) pools
    the stage's visual map; loss = mean over frames of -log(relu(cos(pooled, a'_t)) + 1e-6).
    The thresholded mask carries no gradient, so it is built from detached logits.
    """
    by_stage = _avm_inputs(avm, stages)
    prob = torch.sigmoid(logits.detach().float())
    total = 0.0
    for s in stages:
        visual, audio = by_stage[s]
        mask = (F.adaptive_avg_pool2d(prob, visual.shape[-2:]) > 0.5).to(visual.dtype)  # [B*T, 1, h, w]
        pooled = (visual * mask).sum(dim=(2, 3)) / (mask.sum(dim=(2, 3)) + AVM_EPS)  # [B*T, C]
        cos = F.cosine_similarity(pooled.float(), audio.reshape(-1, audio.shape[-1]).float(), dim=-1)
        total = total + (-torch.log(F.relu(cos) + AVM_EPS)).mean()
    return total / len(stages)


def avm_loss_ms3(logits: torch.Tensor, avm: list, stages, sum_frames: int | None = None) -> torch.Tensor:
    """AVSBench's MS3 audio-visual matching loss as the MS3 recipe runs it (avs_ms3/loss.py
    A_MaskedV_SimmLoss with kl_flag, no threshold, no normalisation), averaged over `stages`.

    Per stage: mask = sigmoid(logits average-pooled to the stage size), a soft mask that
    passes gradient to the logits; pooled = mean over h, w of visual * mask [B*T, C];
    loss = kl_div(softmax(pooled).log() (as _kl_softmax), softmax(a'), reduction='sum'): summed over the
    B*T frames and the C channels, not averaged. Computed in float32 whatever the autocast.

    `sum_frames`: rescale the sum to that many frames (sum x sum_frames / (B*T)). The reference
    sums over its batch of 4 videos on one GPU; with the same sum_frames the objective is that
    one whatever the split of a global batch over ranks and micro-steps (loss.avm_sum_videos).
    None: the plain sum over this batch.
    """
    by_stage = _avm_inputs(avm, stages)
    total = 0.0
    for s in stages:
        visual, audio = by_stage[s]
        mask = torch.sigmoid(F.adaptive_avg_pool2d(logits.float(), visual.shape[-2:]))  # [B*T, 1, h, w]
        pooled = torch.mul(visual.float(), mask).mean(-1).mean(-1)  # [B*T, C], the reference's reduction order
        total = total + _kl_softmax(pooled, audio.float().reshape(-1, audio.shape[-1])).sum()
    scale = 1.0 if sum_frames is None else sum_frames / logits.shape[0]
    return total * scale / len(stages)


def avm_loss_avss(logits: torch.Tensor, avm: list, stages, valid: torch.Tensor,
                  background: int = 0) -> torch.Tensor:
    """AVSBench-semantic's audio-visual matching loss as its recipe runs it
    (avs_scripts/avss/loss.py A_MaskedV_SimmLoss with kl_flag; avg pooling, no threshold, no
    normalisation), averaged over `stages`.

    logits [B*T, K, H, W]; avm as for the other variants; valid bool [B, T] (labelled frames,
    the reference's gt_temporal_mask_flag). The mask is "argmax of softmax(logits) is not
    `background`" (a hard mask: no gradient to the logits), average-pooled to the stage size;
    pooled = mean over h, w of visual x mask [B*T, C]; per frame
    kl_div(softmax(pooled).log() (as _kl_softmax), softmax(a'), reduction='none') summed over C; the mean over
    the labelled frames. Float32. `background`: 0 is AVSS's background class; the reference's
    code uses K - 1 (see loss.avm_variant "avss_avsbench").
    """
    by_stage = _avm_inputs(avm, stages)
    with torch.no_grad():
        # softmax before argmax, as the reference: rounding in softmax can make ties argmax breaks
        pred = torch.softmax(logits.float(), dim=1).argmax(dim=1, keepdim=True)  # [B*T, 1, H, W]
        mask = (pred != background).float()
    frames = valid.reshape(-1)
    total = 0.0
    for s in stages:
        visual, audio = by_stage[s]
        pooled_mask = F.adaptive_avg_pool2d(mask, visual.shape[-2:])  # [B*T, 1, h, w]
        pooled = torch.mul(visual.float(), pooled_mask).mean(-1).mean(-1)  # [B*T, C]
        kl = _kl_softmax(pooled, audio.float().reshape(-1, audio.shape[-1])).sum(-1)  # [B*T]
        total = total + _masked_mean(kl, frames)
    return total / len(stages)


AVM_VARIANTS = ("s4", "ms3", "avss", "avss_avsbench")


def avm_loss(logits: torch.Tensor, avm: list, stages, variant: str = "s4",
             sum_frames: int | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The AVM loss of `variant` (cfg.loss.avm_variant): "s4", "ms3" (one-channel logits), or
    "avss" / "avss_avsbench" (class logits; background class 0 / the reference's K - 1); see
    the functions above. `sum_frames` only concerns the MS3 variant's sum; `valid` [B, T] (the
    labelled frames) is required by the AVSS ones."""
    if variant not in AVM_VARIANTS:
        raise ValueError(f"AVM loss variant must be one of {sorted(AVM_VARIANTS)}, got {variant!r}")
    if variant == "ms3":
        return avm_loss_ms3(logits, avm, stages, sum_frames)
    if variant in ("avss", "avss_avsbench"):
        if valid is None:
            raise ValueError(f"AVM loss variant {variant!r} needs the labelled frames (valid [B, T])")
        background = 0 if variant == "avss" else logits.shape[1] - 1
        return avm_loss_avss(logits, avm, stages, valid, background)
    return avm_loss_s4(logits, avm, stages)


def crop_ce_loss(crop_logits: torch.Tensor, label: torch.Tensor, frames: int) -> torch.Tensor:
    """Cross-entropy of every crop against its video's class; label -1 (MS3) is ignored."""
    target = label.repeat_interleave(frames)
    ce = F.cross_entropy(crop_logits.float(), target.clamp_min(0), reduction="none")
    return _masked_mean(ce, target >= 0)


def crop_pair_loss(crop_embed: torch.Tensor, frames: int) -> torch.Tensor:
    """Mean L2 distance (torch PairwiseDistance) over all pairs of a video's crop embeddings."""
    e = crop_embed.float().reshape(-1, frames, crop_embed.shape[-1])
    i, j = torch.triu_indices(frames, frames, offset=1, device=e.device)
    return nn.PairwiseDistance(p=2)(e[:, i].reshape(-1, e.shape[-1]), e[:, j].reshape(-1, e.shape[-1])).mean()


def crop_audio_loss(crop_proj: torch.Tensor, audio_proj: torch.Tensor) -> torch.Tensor:
    """1 - cos(each crop's projection, its video's mean-audio projection), mean over crops."""
    b = audio_proj.shape[0]
    crops = crop_proj.float().reshape(b, -1, crop_proj.shape[-1])
    return (1 - F.cosine_similarity(crops, audio_proj.float()[:, None], dim=-1)).mean()



def crop_ce_loss_objects(crop_logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """AVSS crop CE: cross-entropy of each object crop against its own class, mean over the N
    crops (0 when N = 0). crop_logits [N, K], cls int64 [N] in 1..K-1.

    The seed's crop CE classifies a video's crops into its clip class (S4's 23 categories); an
    AVSS clip has no one class but each object its AVSBench-semantic class, so each crop is
    classified into that. K = model.num_classes = 71, the AVSS class indices themselves
    (label2idx.json, avs_dist/avss/classes.py): no offset to keep in step, and the background
    logit (class 0), never a target, only learns to lose (config.py refuses another K)."""
    ce = F.cross_entropy(crop_logits.float(), cls.to(crop_logits.device), reduction="none")
    return _masked_mean(ce, torch.ones_like(ce))


def _same_object_pairs(clip: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """bool [N, N]: i < j, same clip and same class (so different frames: one entry per frame
    and class)."""
    n = cls.shape[0]
    upper = torch.ones(n, n, dtype=torch.bool, device=cls.device).triu(1)
    return upper & (clip[:, None] == clip[None, :]) & (cls[:, None] == cls[None, :])


def crop_pair_loss_objects(crop_embed: torch.Tensor, clip: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """AVSS crop pairwise: the mean L2 distance (torch PairwiseDistance, as the seed: ||e_i -
    e_j + 1e-6||) over every pair i < j of crops of one object (same clip, same class) in two
    of its frames; 0 when there is no such pair. crop_embed [N, D]; clip, cls int64 [N].

    The seed pulls the 5 crops of a video's one sounding object together: here each object's
    crops across the frames where it is labelled, pooled over all pairs of the batch as S4's
    mean over its videos' pairs (a clip whose object is in all its frames gives S4's value).
    Dense [N, N] distances (N ~ B x T x objects per frame, ~100 at 4 clips): no host sync."""
    e = crop_embed.float()
    n, d = e.shape
    pairs = _same_object_pairs(clip.to(e.device), cls.to(e.device))
    dist = nn.PairwiseDistance(p=2)(e[:, None, :].expand(n, n, d), e[None, :, :].expand(n, n, d))  # [N, N]
    return _masked_mean(dist, pairs)


def crop_audio_loss_objects(crop_proj: torch.Tensor, audio_proj: torch.Tensor) -> torch.Tensor:
    """AVSS crop-audio: 1 - cos(each object crop's projection, the projection of its own
    frame's audio embedding), mean over the N crops (0 when N = 0). crop_proj, audio_proj
    [N, D] (models/crop_branch.py pairs them).

    Its own second, not the clip mean S4 uses: S4's one object sounds through its video, so the
    mean is its sound; an AVSS mask labels the objects sounding at that second, which change
    within a clip (a 10-second v2 clip often has several in turn), so the clip mean would pull
    each crop toward the others' sounds too; and the mean of a padded clip would count its zeroed
    padded seconds (models/system.py), which no object crop comes from (they are unlabelled)."""
    cos = F.cosine_similarity(crop_proj.float(), audio_proj.float(), dim=-1)
    return _masked_mean(1 - cos, torch.ones_like(cos))

@dataclass(frozen=True)
class LossTerm:
    """One loss term: the model outputs it reads (architecture.md "Model"), and its value.

    The switch and weight are the LossConfig fields named after the term: `cfg.<name>` (bool)
    and `cfg.<name>_weight`. Which parameters get gradients follows
    from `reads` (see `unreached_parameters`), so DDP's unused-parameter handling needs no
    list of term names anywhere else."""
    reads: tuple[str, ...]
    compute: Callable[[dict, dict, LossConfig, int], torch.Tensor]  # (out, batch, cfg, frames per video)


def _crop_ce(out: dict, batch: dict, cfg: LossConfig, frames: int) -> torch.Tensor:
    objects = out.get("crop_objects")
    if objects is not None:  # AVSS: each object's class
        return crop_ce_loss_objects(out["crop_logits"], objects.cls)
    return crop_ce_loss(out["crop_logits"], batch["label"], frames)


def _crop_pair(out: dict, batch: dict, cfg: LossConfig, frames: int) -> torch.Tensor:
    objects = out.get("crop_objects")
    if objects is not None:  # AVSS: one object's crops across its frames
        return crop_pair_loss_objects(out["crop_embed"], objects.clip, objects.cls)
    return crop_pair_loss(out["crop_embed"], frames)


def _crop_audio(out: dict, batch: dict, cfg: LossConfig, frames: int) -> torch.Tensor:
    if out.get("audio_proj") is None:
        raise ValueError("loss.crop_audio needs audio features (out['audio_proj'] is None)")
    if out.get("crop_objects") is not None:  # AVSS: each crop against its own frame's audio
        return crop_audio_loss_objects(out["crop_proj"], out["audio_proj"])
    return crop_audio_loss(out["crop_proj"], out["audio_proj"])


# Adding a term: its LossConfig fields (`<name>: bool`, `<name>_weight: float`) and one entry
# here; nothing else in the package names it (tests/test_losses.py checks both).
TERMS: dict[str, LossTerm] = {
    "bce": LossTerm(("logits",), lambda out, batch, cfg, frames: bce_loss(out["logits"], batch["masks"],
                                                                          batch["mask_valid"])),
    "ce": LossTerm(("logits",), lambda out, batch, cfg, frames: ce_loss(out["logits"], batch["masks"],
                                                                        batch["mask_valid"])),
    "avm": LossTerm(("logits", "avm"), lambda out, batch, cfg, frames: avm_loss(
        out["logits"], out["avm"], cfg.avm_stages, cfg.avm_variant, sum_frames=cfg.avm_sum_videos * frames,
        valid=batch["mask_valid"])),
    "crop_ce": LossTerm(("crop_logits",), _crop_ce),
    "crop_pair": LossTerm(("crop_embed",), _crop_pair),
    "crop_audio": LossTerm(("crop_proj", "audio_proj"), _crop_audio),
}


def enabled_terms(cfg: LossConfig) -> list[str]:
    """The names of the terms `cfg` switches on, in TERMS order."""
    return [name for name in TERMS if getattr(cfg, name)]


def outputs_read(cfg: LossConfig) -> set[str]:
    """The model outputs (keys of the model's dict) that the enabled terms read."""
    return {key for name in enabled_terms(cfg) for key in TERMS[name].reads}


def unreached_parameters(model: nn.Module, cfg: LossConfig) -> list[str] | None:
    """Names of the trainable parameters of `model` that no enabled term's gradient reaches.

    `model.output_params()` (models/system.py) maps each output to the parameter-name prefixes
    that produce it. None when the model does not declare that (the caller must then assume
    some parameters may go unused)."""
    produced_by = getattr(model, "output_params", None)
    if produced_by is None:
        return None
    table = produced_by()
    prefixes = tuple(p for key in outputs_read(cfg) for p in table.get(key, ()))
    return [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(prefixes)]


def compute_losses(out: dict, batch: dict, cfg: LossConfig) -> tuple[torch.Tensor, dict]:
    """-> (total: scalar tensor = sum of weight x term, {term name: unweighted scalar tensor}).
    ValueError when an enabled term's model output is missing (e.g. crop terms without the crop branch)."""
    frames = batch["mask_valid"].shape[1]
    names = enabled_terms(cfg)
    crop_terms = [t for t in names if any(k.startswith("crop_") for k in TERMS[t].reads)]
    if crop_terms and out.get("crop_logits") is None:
        raise ValueError(f"loss terms {crop_terms} need the crop branch's outputs (model.crop_branch=true and crops)")
    terms = {name: TERMS[name].compute(out, batch, cfg, frames) for name in names}
    total = sum(getattr(cfg, f"{k}_weight") * v for k, v in terms.items())
    return total, terms
