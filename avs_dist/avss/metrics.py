"""AVSBench-semantic metrics: the reference's mIoU / F exactly, and the correct, comparable figures.

Inputs, one batch of frames (clips x frames flattened to N):

* ``pred``: float logits [N,71,H,W] (any float dtype), or int class indices [N,H,W];
* ``target``: int class indices [N,H,W] in 0..70, index 0 = background (label2idx.json
  value v is index v - 1);
* ``frame_exists``: bool [N], False for the zero-padded frames of a 5-frame clip padded to 10;
* ``mask_valid``: bool [N], the frame has a label (never True where the frame does not exist).

Per frame f and class c, with P_c / G_c the pixels predicted / labelled c:
I = |P_c & G_c|, Pr = |P_c|, Gt = |G_c|, U = Pr + Gt - I; the frame's IoU is I / U and its
F-measure is (1 + b2) p r / (b2 p + r) with p = I / Pr, r = I / Gt, b2 = BETA2 = 0.3 (0 when
undefined, as the reference turns NaN into 0). Logits become indices as the reference does it:
argmax over classes of softmax(logits) (float32), first index on ties.

**The reference** (OpenNLPLab/AVSBench, avs_scripts/avss/utils/compute_color_metrics.py,
``calc_color_miou_fscore``; called by avss/test.py and avss/train.py's validation, commit
35d0b425): per frame, 71-bin ``torch.histc`` of the intersection, prediction and label
(argmax + 1 and label + 1 in 1..71, so bin k is class k); it adds the frame's IoU and F of
every class to per-class sums, and counts the frames in which the class is in the union.
The scripts add these over all test batches, then per class sum / count (0 where the count
is 0), and report the mean over all 71 classes: ``miou_avsbench``, ``f_avsbench``.

* It scores every frame of the padded clips: the model multiplies its output by the
  frame-exists flag (argmax of all-zero logits is class 0) and the loader pads labels with
  zeros, so each padded frame adds one perfect background frame (IoU 1, F 1): the test
  split of one public copy (804 five-frame and 750 ten-frame clips) has 4,020 padded frames
  beside 11,520 real ones, which inflates the background class. Here padded
  frames are scored that way whatever ``pred`` holds for them, and a frame that exists but
  has no label is scored against an all-background label (the loader's zero padding).
* It sums per-frame values, so it does not depend on the test batch size or order.
* Its "noBg" figures (``miou_nobg_avsbench``, ``f_nobg_avsbench``) average classes 0..69:
  they drop the last class (index 70, "woman"), not background (index 0).
* As released, ``calc_color_miou_fscore`` returns four values (a per-frame list as well)
  where test.py / train.py unpack three, so the scripts stop at the first batch. "As the
  reference computes them" means with only that unpacking fixed (the fourth value is unused).

**The correct figures** score only frames that exist and have a label ("scored frames"):

* ``*_frame*``: AVSBench's per-class definition (per-frame IoU / F averaged over the scored
  frames whose union holds the class), without the padded frames.
* ``*_dataset*``: the semantic-segmentation convention other AVS papers use (cyh-0/CAVP
  utils/eval_utils.py ``MIoU`` / ``ForegroundDetect``, discussed in cyh-0/CAVP#6; as
  mmsegmentation's IoUMetric): per class IoU = sum I / sum U over all scored frames,
  F = (1 + b2) sum I / (b2 sum Gt + sum Pr), which is (1 + b2) P R / (b2 P + R) with the
  dataset's precision and recall, written as CAVP's ``f_beta_score`` (beta2 = 0.3) so that
  a labelled class never predicted scores 0 (mmsegmentation's P R form gives NaN and drops it).

Each comes as a mean over classes, named for its class set:

* ``_objects``: the object classes 1..70 present in the ground truth of a scored frame
  (background reported apart as ``iou_*_background`` / ``f_*_background``);
* ``_objects_all70``: all 70 object classes, a class never present counting 0;
* ``_present``: background and the present object classes;
* ``_all71``: all 71 classes, absent ones counting 0: the reference's class convention
  (and CAVP's ``iou.mean()``), so ``miou_frame_all71`` is ``miou_avsbench`` without padded
  frames.

"Present" means present in the ground truth, so every model evaluated on one test set is
averaged over the same classes. A class that is predicted but never labelled has no
defined score in those means (mmsegmentation's nanmean over classes with a union counts its
IoU as 0); its false positives still lower the IoU of the classes whose pixels they took.

**Exact merging.** The state is two int64 tensors: pixel and frame counts, and per-frame
IoU / F stored in fixed point (multiples of 2**-FRAC_BITS, rounded to nearest; the error
of a mean is below 2**-41 ~ 5e-13). Integer sums do not depend on order, so any batch
size, any split of the frames across processes and any all_reduce give bit-identical
state and results. Each fixed-point sum holds at most MAX_FRAMES frames.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from avs_dist.avss.classes import BACKGROUND, NUM_CLASSES

BETA2 = 0.3
FRAC_BITS = 40
MAX_FRAMES = 2 ** (62 - FRAC_BITS)  # a class's fixed-point sum stays below 2**62
_SCALE = float(2 ** FRAC_BITS)
_SOFTMAX_FRAMES = 8  # frames per softmax call: bounds the float32 copy of the logits

# Rows of the per-class state [len(CLASS_ROWS), NUM_CLASSES] (int64).
CLASS_ROWS = (
    "pixels_inter",           # sum of I over scored frames
    "pixels_pred",            # sum of Pr over scored frames
    "pixels_gt",              # sum of Gt over scored frames
    "frames_gt",              # scored frames whose label holds the class
    "frames_union",           # scored frames whose union holds the class
    "iou_fx",                 # sum of the per-frame IoU over those frames (fixed point)
    "f_fx",                   # sum of the per-frame F over those frames (fixed point)
    "frames_union_avsbench",  # every frame, scored as the reference scores it
    "iou_fx_avsbench",
    "f_fx_avsbench",
)
# Entries of the frame-count state [len(FRAME_ROWS)] (int64).
FRAME_ROWS = ("frames_scored", "frames_padded", "frames_unlabelled")


def class_indices(pred: torch.Tensor) -> torch.Tensor:
    """Class indices int64 [N,H,W] from logits [N,71,H,W] (or indices [N,H,W], passed through).

    Logits go through softmax (float32) and argmax over dim 1, as the reference does:
    softmax can round two close logits to one probability, and argmax then takes the
    first index. Raises ValueError for any other shape or dtype.
    """
    if pred.is_floating_point():
        if pred.dim() != 4 or pred.shape[1] != NUM_CLASSES:
            raise ValueError(f"float pred must be logits [N,{NUM_CLASSES},H,W], got {tuple(pred.shape)}")
        parts = [torch.softmax(chunk.float(), dim=1).argmax(1)
                 for chunk in pred.detach().split(_SOFTMAX_FRAMES)]
        return torch.cat(parts) if parts else pred.new_zeros((0, *pred.shape[2:]), dtype=torch.int64)
    if pred.dim() != 3 or pred.dtype == torch.bool:
        raise ValueError(f"integer pred must be class indices [N,H,W], got {tuple(pred.shape)} {pred.dtype}")
    return pred.long()


def _check_range(name: str, x: torch.Tensor) -> None:
    if x.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.stack(torch.aminmax(x)).tolist())  # one host sync per batch
    if lo < 0 or hi >= NUM_CLASSES:
        raise ValueError(f"{name} holds class indices {lo}..{hi}, outside 0..{NUM_CLASSES - 1}: "
                         "pass indices (label2idx.json value - 1), not colours or raw values")


def _check_inputs(pred, target, frame_exists, mask_valid):
    """-> (pred indices [N,H,W], target [N,H,W], exists [N], valid [N]) or ValueError."""
    if target.is_floating_point() or target.dtype == torch.bool or target.dim() != 3:
        raise ValueError(f"target must be int class indices [N,H,W], got {tuple(target.shape)} {target.dtype}")
    n, h, w = target.shape
    want = (n, NUM_CLASSES, h, w) if pred.is_floating_point() else (n, h, w)
    if tuple(pred.shape) != want or pred.dtype == torch.bool:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} do not match: expected "
                         f"logits [N,{NUM_CLASSES},H,W] or indices [N,H,W] for target [N,H,W]")
    idx = class_indices(pred)
    flags = []
    for name, flag in (("frame_exists", frame_exists), ("mask_valid", mask_valid)):
        flag = torch.as_tensor(flag, device=target.device)
        if flag.numel() != n:
            raise ValueError(f"{name} {tuple(flag.shape)} must have one entry per frame, "
                             f"{n} for target {tuple(target.shape)}")
        flags.append(flag.reshape(n) != 0)
    exists, valid = flags
    _check_range("target", target)
    if not pred.is_floating_point():
        _check_range("pred", idx)
    if bool((valid & ~exists).any()):
        raise ValueError("mask_valid is True for a frame whose frame_exists is False: "
                         "a padded frame cannot have a label")
    return idx, target.long(), exists, valid


def frame_class_counts(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per frame and class pixel counts (I, Pr, Gt), each int64 [N,71].

    `pred`, `target`: int64 class indices [N,H,W] in 0..70 (not checked here). One
    scatter_add into per-frame 71x71 confusion matrices (no host sync, unlike CUDA bincount).
    """
    n, c = target.shape[0], NUM_CLASSES
    frame = torch.arange(n, device=target.device).view(n, 1) * (c * c)
    key = (frame + target.flatten(1) * c + pred.flatten(1)).reshape(-1)
    conf = torch.zeros(n * c * c, dtype=torch.int64, device=target.device)
    conf.scatter_add_(0, key, torch.ones((), dtype=torch.int64, device=key.device).expand_as(key))
    conf = conf.view(n, c, c)  # [frame, label, prediction]
    return conf.diagonal(dim1=1, dim2=2), conf.sum(1), conf.sum(2)


def frame_scores(inter: torch.Tensor, npred: torch.Tensor, ngt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame and class IoU and F-measure (float64 [N,71]) from the pixel counts.

    IoU = I / U, 0 where U = 0; F = (1 + 0.3) p r / (0.3 p + r) with p = I / Pr,
    r = I / Gt, NaN (0 / 0) -> 0: compute_color_metrics.py's formulas (its 2.2e-16 added to
    U only changes U = 0, where the IoU is 0 either way).
    """
    i, p, g = inter.double(), npred.double(), ngt.double()
    union = p + g - i
    iou = torch.where(union > 0, i / union, torch.zeros_like(i))
    precision, recall = i / p, i / g
    f = (1 + BETA2) * precision * recall / (BETA2 * precision + recall)
    return iou, torch.nan_to_num(f, nan=0.0)


def _fixed(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * _SCALE).long()


def empty_state(device=None) -> dict:
    """A zero state: ``classes`` int64 [len(CLASS_ROWS),71], ``frames`` int64 [len(FRAME_ROWS)]."""
    return {"classes": torch.zeros(len(CLASS_ROWS), NUM_CLASSES, dtype=torch.int64, device=device),
            "frames": torch.zeros(len(FRAME_ROWS), dtype=torch.int64, device=device)}


def batch_state(pred, target, frame_exists, mask_valid) -> dict:
    """The state (see ``empty_state``) of one batch; validates the inputs (ValueError).

    Stays on the inputs' device; the only host syncs are the input checks.
    """
    idx, target, exists, valid = _check_inputs(pred, target, frame_exists, mask_valid)
    # The reference's view of the frames: a padded frame's output is zeroed (argmax -> 0)
    # and a frame without a label has the zero-padded label. Scored frames are unchanged,
    # so one pass of counts serves both the reference figure and the correct ones.
    idx = torch.where(exists.view(-1, 1, 1), idx, torch.zeros_like(idx))
    target = torch.where(valid.view(-1, 1, 1), target, torch.zeros_like(target))
    inter, npred, ngt = frame_class_counts(idx, target)
    iou, f = frame_scores(inter, npred, ngt)
    iou_fx, f_fx = _fixed(iou), _fixed(f)
    in_union = (npred + ngt - inter > 0).long()
    scored = (exists & valid).long().view(-1, 1)
    rows = {
        "pixels_inter": inter * scored,
        "pixels_pred": npred * scored,
        "pixels_gt": ngt * scored,
        "frames_gt": (ngt > 0).long() * scored,
        "frames_union": in_union * scored,
        "iou_fx": iou_fx * scored,
        "f_fx": f_fx * scored,
        "frames_union_avsbench": in_union,
        "iou_fx_avsbench": iou_fx,
        "f_fx_avsbench": f_fx,
    }
    classes = torch.stack([rows[name].sum(0) for name in CLASS_ROWS])
    frames = torch.stack([scored.sum(), (~exists).sum(), (exists & ~valid).sum()])
    return {"classes": classes, "frames": frames}


def padding_state(frames: int, device=None) -> dict:
    """The state of `frames` padded frames without their pixels: exactly what ``batch_state``
    adds for a frame whose frame_exists is False (the reference's perfect background frame:
    class 0 in its union with IoU 1 and F 1, no other class; nothing in the correct figures).

    For batches shorter than the reference's 10 frames (avss/batches.py:reference_padding):
    their clips' missing padded frames are counted without running the model on zeros.
    ValueError for a negative count."""
    if frames < 0:
        raise ValueError(f"padding_state: {frames} frames")
    state = empty_state(device)
    for row, value in (("frames_union_avsbench", frames), ("iou_fx_avsbench", frames * int(_SCALE)),
                       ("f_fx_avsbench", frames * int(_SCALE))):
        state["classes"][CLASS_ROWS.index(row), BACKGROUND] = value
    state["frames"][FRAME_ROWS.index("frames_padded")] = frames
    return state


def _mean(values: torch.Tensor, keep: torch.Tensor) -> float:
    """Mean of values[keep]; NaN over an empty set."""
    return float(values[keep].mean()) if bool(keep.any()) else float("nan")


def _or_none(x: float) -> float | None:
    return None if x != x else x


def summarize(state: dict, class_names: list[str] | None = None) -> dict:
    """The figures of a (summed) state; see the module docstring for each definition.

    Returns floats (NaN where a mean is over no class): ``miou_avsbench``, ``f_avsbench``,
    ``miou_nobg_avsbench``, ``f_nobg_avsbench``; for level in (frame, dataset) and m in
    (miou, f): ``{m}_{level}_objects``, ``{m}_{level}_objects_all70``, ``{m}_{level}_present``,
    ``{m}_{level}_all71``, and ``iou_{level}_background``, ``f_{level}_background``; ints
    ``frames_scored``, ``frames_padded``, ``frames_unlabelled``, ``frames_avsbench`` (every
    frame, as the reference counts them), ``classes_present``, ``objects_present``; and
    ``per_class``: a list of 71 dicts (position = class index) with ``index`` (and ``name``
    when `class_names`, 71 names, is given), the int counts ``frames_gt``, ``frames_union``,
    ``pixels_gt``, ``pixels_pred``, ``pixels_inter``, ``present`` (bool), and the floats
    ``iou_avsbench``, ``f_avsbench`` (0 where absent, as the reference) and ``iou_frame``,
    ``f_frame``, ``iou_dataset``, ``f_dataset`` (None where the class is in no union).
    """
    if class_names is not None and len(class_names) != NUM_CLASSES:
        raise ValueError(f"class_names has {len(class_names)} names, expected {NUM_CLASSES} (index 0 = background)")
    c = state["classes"].detach().cpu()
    frames = state["frames"].detach().cpu()
    row = {name: c[i] for i, name in enumerate(CLASS_ROWS)}
    total = int(frames[0] + frames[1] + frames[2])
    if total > MAX_FRAMES:
        raise ValueError(f"{total} frames exceed the {MAX_FRAMES} a fixed-point sum holds")
    nan = torch.full((NUM_CLASSES,), float("nan"), dtype=torch.float64)

    def ratio(num, den):  # num / den, NaN where den == 0
        num, den = num.double(), den.double()
        return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), nan)

    inter, npred, ngt = row["pixels_inter"], row["pixels_pred"], row["pixels_gt"]
    per = {
        "frame": (ratio(row["iou_fx"], row["frames_union"]) / _SCALE,
                  ratio(row["f_fx"], row["frames_union"]) / _SCALE),
        "dataset": (ratio(inter, npred + ngt - inter),
                    ratio((1 + BETA2) * inter.double(), BETA2 * ngt.double() + npred.double())),
    }
    present = ngt > 0
    objects = present.clone()
    objects[BACKGROUND] = False
    not_bg = torch.ones(NUM_CLASSES, dtype=torch.bool)
    not_bg[BACKGROUND] = False
    every = torch.ones(NUM_CLASSES, dtype=torch.bool)

    # The reference: per class sum / count, NaN -> 0, mean over the 71 (or the first 70).
    ref = {}
    for m, key in (("iou", "iou_fx_avsbench"), ("f", "f_fx_avsbench")):
        ref[m] = torch.nan_to_num(ratio(row[key], row["frames_union_avsbench"]) / _SCALE, nan=0.0)
    out = {
        "miou_avsbench": float(ref["iou"].mean()),
        "f_avsbench": float(ref["f"].mean()),
        "miou_nobg_avsbench": float(ref["iou"][:-1].mean()),  # the reference's slice: drops class 70
        "f_nobg_avsbench": float(ref["f"][:-1].mean()),
    }
    for level, (iou, f) in per.items():
        for m, v in (("miou", iou), ("f", f)):
            zero = torch.nan_to_num(v, nan=0.0)
            out[f"{m}_{level}_objects"] = _mean(v, objects)
            out[f"{m}_{level}_objects_all70"] = _mean(zero, not_bg)
            out[f"{m}_{level}_present"] = _mean(v, present)
            out[f"{m}_{level}_all71"] = _mean(zero, every)
        out[f"iou_{level}_background"] = float(iou[BACKGROUND])
        out[f"f_{level}_background"] = float(f[BACKGROUND])
    out.update({
        "frames_scored": int(frames[0]),
        "frames_padded": int(frames[1]),
        "frames_unlabelled": int(frames[2]),
        "frames_avsbench": total,
        "classes_present": int(present.sum()),
        "objects_present": int(objects.sum()),
    })
    per_class = []
    for k in range(NUM_CLASSES):
        entry = {"index": k}
        if class_names is not None:
            entry["name"] = str(class_names[k])
        entry.update({
            "present": bool(present[k]),
            "frames_gt": int(row["frames_gt"][k]),
            "frames_union": int(row["frames_union"][k]),
            "pixels_gt": int(ngt[k]),
            "pixels_pred": int(npred[k]),
            "pixels_inter": int(inter[k]),
            "iou_avsbench": float(ref["iou"][k]),
            "f_avsbench": float(ref["f"][k]),
        })
        for level, (iou, f) in per.items():
            entry[f"iou_{level}"] = _or_none(float(iou[k]))
            entry[f"f_{level}"] = _or_none(float(f[k]))
        per_class.append(entry)
    out["per_class"] = per_class
    return out


class SemanticEvaluator:
    """Streams batches of AVSS frames into a fixed-size, summable state; ``result`` gives the figures.

    ``update(pred, target, frame_exists, mask_valid)`` (shapes in the module docstring)
    adds one batch; it works on the inputs' device (the state moves there on the first
    update) and syncs with the host only to check the inputs. The state is two int64
    tensors (``state_dict``), summed by ``merge`` or across ranks by ``result(group)`` /
    ``reduced_state(group)`` (``all_reduce`` SUM; a gloo group reduces on the CPU). Every
    figure, the reference's included, is a sum over frames, so the result does not depend
    on the batch size, the order of frames or their split across ranks, to the last bit.
    Each frame must be given to exactly one rank once: the caller shards videos, and
    ``frames_avsbench`` in the result lets it check the total.
    """

    def __init__(self, device=None):
        self._state = empty_state(device)

    def update(self, pred: torch.Tensor, target: torch.Tensor, frame_exists: torch.Tensor,
               mask_valid: torch.Tensor) -> None:
        batch = batch_state(pred, target, frame_exists, mask_valid)
        if self._state["classes"].device != batch["classes"].device:
            self._state = {k: v.to(batch[k].device) for k, v in self._state.items()}
        for k in self._state:
            self._state[k] += batch[k]

    def add_padding(self, frames: int) -> None:
        """Count `frames` padded frames the batches did not hold (``padding_state``)."""
        self.merge(padding_state(frames, self._state["classes"].device))  # built where the state is: no copy

    def state_dict(self) -> dict:
        """This process's state as CPU tensors: ``classes`` [10,71] and ``frames`` [3], int64."""
        return {k: v.detach().cpu().clone() for k, v in self._state.items()}

    def load_state_dict(self, state: dict) -> None:
        want = empty_state()
        for k, v in want.items():
            if k not in state or tuple(state[k].shape) != tuple(v.shape) or state[k].dtype != v.dtype:
                got = tuple(state[k].shape) if k in state else None
                raise ValueError(f"state['{k}'] must be int64 {tuple(v.shape)}, got {got}")
        dev = self._state["classes"].device
        self._state = {k: state[k].to(dev).clone() for k in want}

    def merge(self, other: "SemanticEvaluator | dict") -> None:
        """Add another evaluator's state (or a ``state_dict``) to this one."""
        state = other.state_dict() if isinstance(other, SemanticEvaluator) else other
        for k in self._state:
            self._state[k] += state[k].to(self._state[k].device)

    def reduced_state(self, group=None) -> dict:
        """The state summed over the ranks of `group` (a copy, CPU tensors); this process's
        own when torch.distributed is not initialized. Every rank of `group` must call it."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.state_dict()
        if dist.get_backend(group) == "gloo":
            device = torch.device("cpu")
        elif self._state["classes"].is_cuda:
            device = self._state["classes"].device
        else:
            device = torch.device("cuda", torch.cuda.current_device())
        out = {}
        for k, v in self._state.items():
            t = v.detach().to(device).clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
            out[k] = t.cpu()
        return out

    def result(self, group=None, class_names: list[str] | None = None) -> dict:
        """``summarize`` of the state summed over `group`'s ranks (when torch.distributed is
        initialized, every rank of `group` must call it, as with metrics.StreamingEvaluator)."""
        return summarize(self.reduced_state(group), class_names)


def semantic_metrics(pred, target, frame_exists, mask_valid, class_names=None) -> dict:
    """Every figure of ``summarize`` for one set of frames (shapes in the module docstring)."""
    return summarize(batch_state(pred, target, frame_exists, mask_valid), class_names)


def miou_avsbench(pred, target, frame_exists, mask_valid) -> float:
    """The reference's AVSS mIoU of these frames (padded frames scored as it scores them)."""
    return semantic_metrics(pred, target, frame_exists, mask_valid)["miou_avsbench"]


def f_avsbench(pred, target, frame_exists, mask_valid) -> float:
    """The reference's AVSS F-measure (beta^2 = 0.3) of these frames."""
    return semantic_metrics(pred, target, frame_exists, mask_valid)["f_avsbench"]
