"""AVSBench-exact mIoU / F-measure, their batch-size-free versions, and a streaming evaluator.

The reference (AVSBench `utility.py`) computes, for one test batch of N frames [N,H,W]
with float targets G (0/1 for clean masks; MS3 targets are palette index / 255, so a mask
that is not clean 0/255 gives values in between, see data/masks.py):

* ``mask_iou``: P = (sigmoid(logit) > 0.5) (strict) as 0/1. Per frame
  IoU = sum(P * G) / (sum(max(P, G)) + 1e-7); when sum(G) == 0, IoU =
  sum((1 - G) * (1 - P)) / (H*W) (the share of pixels that are background in both). The
  batch value is the mean over its N frames.
* ``Eval_Fmeasure``: p = sigmoid(logit); thresholds t_i = linspace(0, 1 - 1e-10, 255) in
  float32 (so the last one is exactly 1.0); a pixel is predicted at t_i when p >= t_i.
  Per frame: TP = sum(G over the predicted pixels), precision = TP / (#pred + 1e-20),
  recall = TP / (sum(G) + 1e-20), F = 1.3 P R / (0.3 P + R), NaN -> 0. Frames with
  mean(G) == 0 are skipped; the F curves of the remaining frames are averaged and the batch
  contributes the max over thresholds (0 when every frame of the batch is empty).
* The reported figure is the unweighted mean of the per-batch values, so both depend on
  the test batch size (AVSBench: 4 videos = 20 frames).

Everything here is computed from per-frame statistics (intersection, union, background
agreement, sum(G), and per-threshold TP / #pred from 256-bin histograms of the sigmoid
values): G-weighted sums in float64, which are exact for 0/1 and v/255 targets (so the
order of summation, across pixels, ranks or batches, never changes a bit), and pixel counts
in int64. So frames can be evaluated anywhere, gathered across ranks, and regrouped
into any batch size afterwards. The batch-size-free figures are

* ``miou``: mean over all evaluated frames of the per-frame IoU (same empty-GT rule);
* ``f``: max over the 255 thresholds of the mean, over all frames with a non-empty GT, of
  the per-frame F curve, i.e. ``Eval_Fmeasure`` with the whole split as one batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

NUM_THRESHOLDS = 255
BETA2 = 0.3
IOU_EPS = 1e-7
PR_EPS = 1e-20


def f_thresholds(device=None) -> torch.Tensor:
    """The reference thresholds, in float32 as the reference builds them (last one == 1.0)."""
    return torch.linspace(0, 1 - 1e-10, NUM_THRESHOLDS, dtype=torch.float32, device=device)


def _as_frames(logits: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten [B*T,1,H,W] / [B,T,H,W] / [N,H,W] logits and masks to matching [N,H,W]."""
    h, w = masks.shape[-2:]
    if logits.shape[-2:] != (h, w):
        raise ValueError(f"logits are {tuple(logits.shape[-2:])} pixels but masks are {(h, w)}: "
                         "resize the prediction to the mask size before evaluating")
    logits = logits.reshape(-1, h, w)
    masks = masks.reshape(-1, h, w)
    if logits.shape[0] != masks.shape[0]:
        raise ValueError(f"{logits.shape[0]} predicted frames but {masks.shape[0]} masks")
    return logits, masks


def frame_stats(logits: torch.Tensor, masks: torch.Tensor, curves: bool = True) -> dict:
    """Per-frame statistics of a batch; stays on the input's device (no host sync).

    `masks`: float targets in [0, 1] (any real dtype). Returns, each [N]: float64 ``inter``
    sum(P*G), ``union`` sum(max(P, G)), ``bg`` sum((1-G)(1-P)), ``gt`` sum(G); int64 ``npix``;
    with ``curves``, [N,255]: float64 ``tp`` (sum of G over the pixels predicted at each F
    threshold) and int64 ``pred`` (#predicted pixels).
    """
    logits, masks = _as_frames(logits, masks)
    n, h, w = logits.shape
    prob = torch.sigmoid(logits.float())  # the reference thresholds float32 sigmoids
    # float64: the products and sums of 0/1 and v/255 float32 targets are exact in it.
    gt = masks.to(torch.float64)
    pred = prob > 0.5
    stats = {
        "inter": torch.where(pred, gt, 0.0).sum((1, 2)),
        "union": torch.where(pred, 1.0, gt).sum((1, 2)),  # max(P, G) for G in [0, 1]
        "bg": torch.where(pred, 0.0, 1.0 - gt).sum((1, 2)),
        "gt": gt.sum((1, 2)),
        "npix": torch.full((n,), h * w, dtype=torch.int64, device=logits.device),
    }
    if curves:
        stats["tp"], stats["pred"] = _threshold_sums(prob.reshape(n, -1), gt.reshape(n, -1))
    return stats


def _threshold_sums(prob: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """prob, gt [N, P] -> (sum of gt, count) over the pixels with p >= t_i, each [N, 255]."""
    n = prob.shape[0]
    # bin k = number of thresholds t with t <= p, so the pixel is predicted at t_i iff i < k.
    bins = torch.bucketize(prob, f_thresholds(prob.device), right=True)
    nb = NUM_THRESHOLDS + 1
    key = (bins + torch.arange(n, device=prob.device).unsqueeze(1) * nb).reshape(-1)
    # scatter_add_ (unlike CUDA bincount) never reads a size back to the host.
    count = torch.zeros(n * nb, dtype=torch.int64, device=prob.device)
    count.scatter_add_(0, key, torch.ones_like(key))
    weight = torch.zeros(n * nb, dtype=torch.float64, device=prob.device)
    weight.scatter_add_(0, key, gt.reshape(-1))

    def above(hist):  # value at threshold i = bins i+1..255: a reversed cumulative sum
        return hist.view(n, nb)[:, 1:].flip(-1).cumsum(-1).flip(-1)

    return above(weight), above(count)


def iou_from_stats(stats: dict) -> torch.Tensor:
    """Per-frame IoU (float64) with the reference's empty-GT rule (sum(G) == 0)."""
    inter, union = stats["inter"].double(), stats["union"].double()
    empty = stats["gt"] == 0
    inter = torch.where(empty, stats["bg"].double(), inter)
    union = torch.where(empty, stats["npix"].double(), union)
    return inter / (union + IOU_EPS)


def fcurve_from_stats(stats: dict) -> torch.Tensor:
    """Per-frame F curve [N,255] (float64), NaN -> 0 as in the reference."""
    tp, npred = stats["tp"].double(), stats["pred"].double()
    ngt = stats["gt"].double().unsqueeze(-1)
    precision = tp / (npred + PR_EPS)
    recall = tp / (ngt + PR_EPS)
    f = (1 + BETA2) * precision * recall / (BETA2 * precision + recall)
    return torch.nan_to_num(f, nan=0.0)


def batch_fscore(curves: torch.Tensor, gt_pixels: torch.Tensor) -> torch.Tensor:
    """Eval_Fmeasure of one batch from its frame curves: frames with sum(G) == 0 skipped, max of mean."""
    keep = (gt_pixels > 0).to(curves.dtype).unsqueeze(-1)
    kept = keep.sum()
    mean = (curves * keep).sum(0) / kept.clamp(min=1)
    return torch.where(kept > 0, mean.max(), torch.zeros((), dtype=curves.dtype, device=curves.device))


def avsbench_miou(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The reference ``mask_iou`` of one batch [N,H,W] (logits before sigmoid, float targets in [0, 1])."""
    stats = frame_stats(logits, masks, curves=False)
    return iou_from_stats(stats).mean().float()


def avsbench_fscore(logits: torch.Tensor, masks: torch.Tensor) -> float:
    """The reference ``Eval_Fmeasure`` of one batch [N,H,W] (logits before sigmoid, float targets in [0, 1])."""
    stats = frame_stats(logits, masks, curves=True)
    return float(batch_fscore(fcurve_from_stats(stats), stats["gt"]))


_PER_FRAME = ("inter", "union", "bg", "gt", "npix", "tp", "pred")


def refuse_duplicates(index: torch.Tensor, what: str = "videos") -> None:
    """ValueError naming the first indices that occur more than once in `index` (int64 [N],
    sorted): each video or clip of a split must be evaluated by exactly one rank, once."""
    dup = index[1:][index[1:] == index[:-1]].unique()
    if dup.numel():
        raise ValueError(f"{what} with index {dup.tolist()[:10]} were evaluated more than once (a padded "
                         f"sampler or overlapping rank shards); each must be evaluated exactly once")


class StreamingEvaluator:
    """Accumulates per-frame statistics batch by batch; ``result`` gathers and regroups them.

    ``update`` only launches device work (no ``.item()``, no boolean indexing), so it does not
    stall the GPU; frames whose ``mask_valid`` is false are dropped in ``result``.
    ``result`` puts videos in CSV order (``batch["index"]``) and computes the AVSBench figures
    as the reference test loop with a batch of ``batch_videos`` videos would, plus the
    batch-size-free ``miou`` / ``f`` described in the module docstring.
    """

    def __init__(self, batch_videos: int = 4, frames_per_video: int = 5, curves: bool = True,
                 per_class: bool = False):
        if batch_videos < 1 or frames_per_video < 1:
            raise ValueError("batch_videos and frames_per_video must be >= 1")
        self.per_class = per_class  # result() adds miou_per_class {label: per-frame mIoU} (batch["label"])
        self.batch_videos = batch_videos
        self.frames_per_video = frames_per_video
        self.curves = curves
        self._chunks: list[dict] = []

    def update(self, logits: torch.Tensor, batch: dict) -> None:
        masks = batch["masks"]
        b, t = masks.shape[0], self.frames_per_video
        if masks.dim() != 4 or masks.shape[1] != t:
            raise ValueError(f"batch['masks'] must be [B,{t},H,W], got {tuple(masks.shape)}")
        masks = masks.to(logits.device, non_blocking=True)
        stats = frame_stats(logits.detach(), masks, curves=self.curves)
        chunk = {k: v.view(b, t, *v.shape[1:]) for k, v in stats.items()}
        chunk["valid"] = batch["mask_valid"].reshape(b, t).to(torch.bool)
        index = batch["index"]
        chunk["index"] = index.reshape(b).long() if torch.is_tensor(index) else torch.as_tensor(index).long()
        if self.per_class:
            label = batch.get("label", torch.full((b,), -1))
            chunk["label"] = label.reshape(b).long() if torch.is_tensor(label) else torch.as_tensor(label).long()
        self._chunks.append(chunk)

    def local_stats(self) -> dict:
        """This rank's statistics as CPU tensors: per video [V,...] with ``index`` [V]."""
        if not self._chunks:
            t = self.frames_per_video
            out = {k: torch.zeros(0, t, dtype=torch.float64) for k in ("inter", "union", "bg", "gt")}
            out["npix"] = torch.zeros(0, t, dtype=torch.int64)
            if self.curves:
                out.update(tp=torch.zeros(0, t, NUM_THRESHOLDS, dtype=torch.float64),
                           pred=torch.zeros(0, t, NUM_THRESHOLDS, dtype=torch.int64))
            out.update(valid=torch.zeros(0, t, dtype=torch.bool), index=torch.zeros(0, dtype=torch.int64))
            if self.per_class:
                out["label"] = torch.zeros(0, dtype=torch.int64)
            return out
        keys = self._chunks[0].keys()
        return {k: torch.cat([c[k].cpu() for c in self._chunks]) for k in keys}

    def gathered_stats(self, group=None) -> dict:
        """All ranks' statistics in CSV order; raises if a video was evaluated twice."""
        local = self.local_stats()
        if dist.is_available() and dist.is_initialized():
            parts = [None] * dist.get_world_size(group)
            dist.all_gather_object(parts, local, group=group)
            stats = {k: torch.cat([p[k] for p in parts]) for k in local}
        else:
            stats = local
        order = torch.argsort(stats["index"], stable=True)
        stats = {k: v[order] for k, v in stats.items()}
        refuse_duplicates(stats["index"], "videos")
        return stats

    def result(self, group=None) -> dict:
        stats = self.gathered_stats(group)
        valid = stats["valid"]
        frames = {k: stats[k][valid] for k in _PER_FRAME if k in stats}  # [F,...] in CSV order
        iou = iou_from_stats(frames)
        curves = fcurve_from_stats(frames) if self.curves else None
        # video v's valid frames are a contiguous run; regroup runs of batch_videos videos.
        per_video = valid.sum(1)
        ends = per_video.cumsum(0)
        batch_iou, batch_f = [], []
        n_videos = valid.shape[0]
        for start in range(0, n_videos, self.batch_videos):
            stop = min(start + self.batch_videos, n_videos)
            lo = int(ends[start - 1]) if start else 0
            hi = int(ends[stop - 1])
            if hi == lo:  # a batch with no ground truth at all has no reference value
                continue
            batch_iou.append(iou[lo:hi].mean())
            if curves is not None:
                batch_f.append(batch_fscore(curves[lo:hi], frames["gt"][lo:hi]))
        out = {
            "miou_avsbench": float(torch.stack(batch_iou).mean()) if batch_iou else float("nan"),
            "miou": float(iou.mean()) if iou.numel() else float("nan"),
            "videos": int(n_videos),
            "frames": int(iou.numel()),
            "empty_frames": int((frames["gt"] == 0).sum()),
            "batch_videos": self.batch_videos,
        }
        if curves is not None:
            out["f_avsbench"] = float(torch.stack(batch_f).mean()) if batch_f else float("nan")
            out["f"] = float(batch_fscore(curves, frames["gt"])) if iou.numel() else float("nan")
        if self.per_class:
            frame_label = stats["label"].unsqueeze(1).expand_as(valid)[valid]  # [F], CSV order like iou
            out["miou_per_class"] = {int(c): float(iou[frame_label == c].mean())
                                     for c in frame_label.unique().tolist() if c >= 0}
        return out
