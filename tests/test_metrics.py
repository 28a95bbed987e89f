"""AVSBench metrics: hand-computed cases, a loop re-implementation of the reference, streaming."""
import os

import numpy as np
import pytest
import torch

from avs_dist.distributed import free_port
from avs_dist.metrics import (
    NUM_THRESHOLDS,
    StreamingEvaluator,
    avsbench_fscore,
    avsbench_miou,
    f_thresholds,
    frame_stats,
)

BIG = 30.0  # sigmoid(30) == 1.0 in float32, sigmoid(-30) ~ 1e-13


def _logits_from_mask(mask):
    """A confident prediction of `mask` (1 -> foreground)."""
    return torch.where(torch.as_tensor(mask) > 0, torch.tensor(BIG), torch.tensor(-BIG))


def _logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p)).float()


# ---- a straightforward loop re-implementation of the reference (numpy, per frame) ----

def ref_mask_iou(logits, masks):
    logits = np.asarray(logits, dtype=np.float32)
    masks = np.asarray(masks, dtype=np.float32)
    n = logits.shape[0]
    total = 0.0
    for i in range(n):
        prob = 1.0 / (1.0 + np.exp(-logits[i].astype(np.float64)))
        pred = (prob > 0.5).astype(np.float64)
        gt = masks[i].astype(np.float64)
        if gt.sum() == 0:
            inter = ((1 - pred) * (1 - gt)).sum()
            union = gt.size
        else:
            inter = (pred * gt).sum()
            union = np.maximum(pred, gt).sum()
        total += inter / (union + 1e-7)
    return total / n


def ref_fmeasure(logits, masks, num=255):
    prob = torch.sigmoid(torch.as_tensor(np.asarray(logits), dtype=torch.float32)).numpy()
    masks = np.asarray(masks, dtype=np.float64)
    thresholds = torch.linspace(0, 1 - 1e-10, num).numpy()  # float32, like the reference
    avg, count = np.zeros(num), 0
    for i in range(prob.shape[0]):
        gt = masks[i]
        if gt.mean() == 0:
            continue
        prec, rec = np.zeros(num), np.zeros(num)
        for j in range(num):
            binary = (prob[i] >= thresholds[j]).astype(np.float64)
            tp = (binary * gt).sum()
            prec[j] = tp / (binary.sum() + 1e-20)
            rec[j] = tp / (gt.sum() + 1e-20)
        with np.errstate(invalid="ignore", divide="ignore"):
            f = 1.3 * prec * rec / (0.3 * prec + rec)
        f[np.isnan(f)] = 0
        avg += f
        count += 1
    return (avg / count).max() if count else 0.0


def ref_test_loop(logits, masks, batch_videos, t=5):
    """The reference test loop: consecutive batches of `batch_videos` videos, mean of batch values."""
    n_videos = logits.shape[0] // t
    ious, fs = [], []
    for v in range(0, n_videos, batch_videos):
        sl = slice(v * t, min(v + batch_videos, n_videos) * t)
        ious.append(ref_mask_iou(logits[sl], masks[sl]))
        fs.append(ref_fmeasure(logits[sl], masks[sl]))
    return float(np.mean(ious)), float(np.mean(fs))


def random_case(n_videos, t=5, h=12, w=10, seed=0, empty_every=4):
    g = torch.Generator().manual_seed(seed)
    masks = (torch.rand(n_videos * t, h, w, generator=g) > 0.6).float()
    masks[::empty_every] = 0  # empty-GT frames in most batches
    logits = torch.randn(n_videos * t, h, w, generator=g) * 3 + (masks - 0.5) * 2
    # exact threshold values and saturated sigmoids exercise the >= boundary and the 1.0 threshold
    th = f_thresholds()
    logits.view(-1)[:40] = _logit(th[100:140].double().clamp(1e-6, 1 - 1e-6))
    logits.view(-1)[40:50] = 40.0
    return logits, masks


# ---- mIoU rules ----

def test_iou_simple_shapes_by_hand():
    gt = torch.zeros(1, 4, 4)
    gt[0, :2, :] = 1  # 8 pixels
    pred = torch.zeros(1, 4, 4)
    pred[0, 1:3, :] = 1  # 8 pixels, overlap 4, union 12
    assert avsbench_miou(_logits_from_mask(pred), gt).item() == pytest.approx(4 / 12, abs=1e-6)


def test_iou_empty_gt_uses_background_agreement():
    gt = torch.zeros(1, 4, 5)
    pred = torch.zeros(1, 4, 5)
    pred[0, 0, :3] = 1  # 3 false positives of 20 pixels
    assert avsbench_miou(_logits_from_mask(pred), gt).item() == pytest.approx(17 / 20, abs=1e-6)
    # empty prediction on an empty GT is a perfect frame, not 0/0
    assert avsbench_miou(_logits_from_mask(torch.zeros(1, 4, 5)), gt).item() == pytest.approx(1.0, abs=1e-6)


def test_iou_threshold_is_strict_half():
    gt = torch.ones(1, 2, 2)
    logits = torch.zeros(1, 2, 2)  # sigmoid = 0.5 exactly: not foreground
    assert avsbench_miou(logits, gt).item() == 0.0


def test_iou_mean_over_batch_frames():
    gt = torch.ones(2, 2, 2)
    pred = torch.stack([torch.ones(2, 2), torch.zeros(2, 2)])
    assert avsbench_miou(_logits_from_mask(pred), gt).item() == pytest.approx(0.5, abs=1e-6)


# ---- F-measure rules ----

def test_fscore_perfect_and_empty_gt_skipped():
    gt = torch.zeros(2, 4, 4)
    gt[0, :2] = 1
    logits = torch.stack([_logits_from_mask(gt[0]), _logits_from_mask(torch.ones(4, 4))])
    # frame 1 has an empty GT (and a totally wrong prediction): skipped, so F = frame 0's = 1
    assert avsbench_fscore(logits, gt) == pytest.approx(1.0, abs=1e-9)


def test_fscore_all_empty_batch_is_zero():
    gt = torch.zeros(3, 4, 4)
    assert avsbench_fscore(torch.randn(3, 4, 4), gt) == 0.0


def test_fscore_by_hand_half_precision():
    gt = torch.zeros(1, 2, 2)
    gt[0, 0, 0] = 1
    # everything confidently foreground: at every threshold P = 1/4, R = 1
    logits = torch.full((1, 2, 2), BIG)
    expected = 1.3 * 0.25 * 1 / (0.3 * 0.25 + 1)
    assert avsbench_fscore(logits, gt) == pytest.approx(expected, abs=1e-9)


def test_fscore_threshold_boundary_is_inclusive():
    th = f_thresholds()
    k = 200
    prob = th[k].item()
    logit = _logit(prob)
    assert torch.sigmoid(logit).item() == prob  # the sigmoid lands exactly on threshold k
    stats = frame_stats(logit.view(1, 1, 1), torch.ones(1, 1, 1))
    # predicted at thresholds 0..k (p >= t), not above
    assert stats["pred"][0, k].item() == 1
    assert stats["pred"][0, k + 1].item() == 0
    assert stats["tp"][0, :k + 1].tolist() == [1] * (k + 1)


def test_fscore_last_threshold_is_one():
    # 1 - 1e-10 rounds to 1.0 in float32: a saturated sigmoid still counts at the last threshold
    assert f_thresholds()[-1].item() == 1.0
    stats = frame_stats(torch.full((1, 1, 1), 40.0), torch.ones(1, 1, 1))
    assert stats["pred"][0, NUM_THRESHOLDS - 1].item() == 1


def test_histogram_counts_match_threshold_loop():
    logits, masks = random_case(4, seed=3)
    stats = frame_stats(logits, masks)
    prob = torch.sigmoid(logits)
    for i in (0, 1, 100, 254):
        binary = prob >= f_thresholds()[i]
        assert torch.equal(stats["pred"][:, i], binary.sum((1, 2)))
        assert torch.equal(stats["tp"][:, i], (binary & (masks > 0)).sum((1, 2)).double())


# ---- non-binary targets: the reference's own formulas (AVSBench utility.py) as the oracle ----
# MS3 targets are palette index / 255 (data/masks.py), so masks that are not clean 0/255 give
# values between 0 and 1; the reference then multiplies and maxes with them, never thresholds.

def torch_ref_mask_iou(pred, target, eps=1e-7):
    """AVSBench ``mask_iou``, as written there (float32, torch)."""
    n, num_pixels = pred.size(0), pred.size(-1) * pred.size(-2)
    no_obj_flag = target.sum(2).sum(1) == 0
    pred = (torch.sigmoid(pred) > 0.5).int()
    inter = (pred * target).sum(2).sum(1)
    union = torch.max(pred, target).sum(2).sum(1)
    inter_no_obj = ((1 - target) * (1 - pred)).sum(2).sum(1)
    inter[no_obj_flag] = inter_no_obj[no_obj_flag]
    union[no_obj_flag] = num_pixels
    return (torch.sum(inter / (union + eps)) / n).item()


def torch_ref_fmeasure(pred, gt, pr_num=255):
    """AVSBench ``Eval_Fmeasure`` with its ``_eval_pr``, as written there (float32, torch)."""
    pred = torch.sigmoid(pred)
    avg_f, img_num, score = 0.0, 0, torch.zeros(pr_num)
    thlist = torch.linspace(0, 1 - 1e-10, pr_num)
    for img_id in range(pred.size(0)):
        if torch.mean(gt[img_id]) == 0.0:
            continue
        prec, recall = torch.zeros(pr_num), torch.zeros(pr_num)
        for i in range(pr_num):
            y_temp = (pred[img_id] >= thlist[i]).float()
            tp = (y_temp * gt[img_id]).sum()
            prec[i], recall[i] = tp / (y_temp.sum() + 1e-20), tp / (gt[img_id].sum() + 1e-20)
        f_score = (1 + 0.3) * prec * recall / (0.3 * prec + recall)
        f_score[f_score != f_score] = 0
        avg_f += f_score
        img_num += 1
        score = avg_f / img_num
    return score.max().item()


def soft_case(n_frames=10, h=12, w=10, seed=0):
    """Targets index / 255 as the reference's convert('P') + ToTensor gives them: 0/255 objects
    with halos and soft edges (values 1..254), some frames empty, one frame all halo."""
    from avs_dist.data.masks import mask_targets

    g = torch.Generator().manual_seed(seed)
    index = torch.where(torch.rand(n_frames, h, w, generator=g) > 0.6, 255, 0).to(torch.uint8)
    soft = torch.rand(n_frames, h, w, generator=g) < 0.25
    index[soft] = torch.randint(1, 255, (int(soft.sum()),), generator=g, dtype=torch.uint8)
    index[::4] = 0  # empty frames
    index[1] = torch.where(index[1] > 0, 3, 0).to(torch.uint8)  # only a faint halo: not empty
    target = mask_targets(index)
    logits = torch.randn(n_frames, h, w, generator=g) * 3 + (target - 0.5) * 2
    return logits, target


def test_non_binary_targets_match_the_reference_formulas():
    for seed in range(3):
        logits, target = soft_case(seed=seed)
        assert ((target > 0) & (target < 1)).any()
        assert avsbench_miou(logits, target).item() == pytest.approx(torch_ref_mask_iou(logits, target), abs=1e-6)
        assert avsbench_fscore(logits, target) == pytest.approx(torch_ref_fmeasure(logits, target), abs=1e-6)
    # the binary rule (target > 0.5) would give other values: the test can tell them apart
    logits, target = soft_case(seed=0)
    binary = (target > 0.5).float()
    assert abs(torch_ref_mask_iou(logits, binary) - torch_ref_mask_iou(logits, target)) > 1e-3
    assert abs(torch_ref_fmeasure(logits, binary) - torch_ref_fmeasure(logits, target)) > 1e-3


def test_faint_halo_only_frame_is_not_empty():
    # sum(G) > 0, so the reference uses inter / union (not background agreement) and keeps it in F
    target = torch.zeros(1, 4, 4)
    target[0, 1, 1] = 3 / 255
    logits = torch.full((1, 4, 4), -BIG)
    assert avsbench_miou(logits, target).item() == pytest.approx(torch_ref_mask_iou(logits, target), abs=1e-9)
    assert avsbench_miou(logits, target).item() == 0.0  # nothing predicted, not the empty-GT 1.0
    stats = frame_stats(logits, target)
    assert stats["gt"].item() == pytest.approx(3 / 255) and stats["tp"].dtype == torch.float64


def test_streaming_equals_reference_on_non_binary_targets():
    logits, target = soft_case(n_frames=35, seed=4)  # 7 videos
    ev = StreamingEvaluator(batch_videos=2)
    for lg, batch in _batches(logits, target, [6, 0, 3, 1, 5, 2, 4], 3):
        ev.update(lg, batch)
    res = ev.result()
    ious = [torch_ref_mask_iou(logits[s:s + 10], target[s:s + 10]) for s in range(0, 35, 10)]
    fs = [torch_ref_fmeasure(logits[s:s + 10], target[s:s + 10]) for s in range(0, 35, 10)]
    assert res["miou_avsbench"] == pytest.approx(np.mean(ious), abs=1e-6)
    assert res["f_avsbench"] == pytest.approx(np.mean(fs), abs=1e-6)
    assert res["miou"] == pytest.approx(torch_ref_mask_iou(logits, target), abs=1e-6)
    assert res["f"] == pytest.approx(torch_ref_fmeasure(logits, target), abs=1e-6)


# ---- against the loop re-implementation ----

def test_batch_metrics_match_reference_loops():
    for seed in range(3):
        logits, masks = random_case(4, seed=seed)
        assert avsbench_miou(logits, masks).item() == pytest.approx(ref_mask_iou(logits, masks), abs=1e-6)
        assert avsbench_fscore(logits, masks) == pytest.approx(ref_fmeasure(logits, masks), abs=1e-6)


def _batches(logits, masks, order, batch_videos, t=5):
    """Feed videos in `order` (a permutation of CSV positions) as loader batches."""
    h, w = masks.shape[-2:]
    lv, mv = logits.view(-1, t, h, w), masks.view(-1, t, h, w)
    for s in range(0, len(order), batch_videos):
        idx = torch.as_tensor(order[s:s + batch_videos])
        yield lv[idx].reshape(-1, 1, h, w), {
            "masks": mv[idx], "mask_valid": torch.ones(len(idx), t, dtype=torch.bool), "index": idx}


@pytest.mark.parametrize("batch_videos", [1, 2, 4])
def test_streaming_equals_reference_test_loop(batch_videos):
    n_videos = 7  # a partial last batch for 2 and 4
    logits, masks = random_case(n_videos, seed=11)
    ev = StreamingEvaluator(batch_videos=batch_videos)
    order = list(reversed(range(n_videos)))  # arrival order != CSV order; loader batch size 3
    for lg, batch in _batches(logits, masks, order, 3):
        ev.update(lg, batch)
    res = ev.result()
    miou_ref, f_ref = ref_test_loop(logits, masks, batch_videos)
    assert res["miou_avsbench"] == pytest.approx(miou_ref, abs=1e-6)
    assert res["f_avsbench"] == pytest.approx(f_ref, abs=1e-6)
    # batch-size-free figures = the reference with the whole split as one batch
    assert res["miou"] == pytest.approx(ref_mask_iou(logits, masks), abs=1e-6)
    assert res["f"] == pytest.approx(ref_fmeasure(logits, masks), abs=1e-6)
    assert res["videos"] == n_videos and res["frames"] == n_videos * 5
    assert res["batch_videos"] == batch_videos


def test_streaming_direct_per_batch_functions():
    logits, masks = random_case(8, seed=5)
    ev = StreamingEvaluator(batch_videos=4)
    for lg, batch in _batches(logits, masks, list(range(8)), 4):
        ev.update(lg, batch)
    res = ev.result()
    per_batch = [(avsbench_miou(logits[s:s + 20], masks[s:s + 20]).item(),
                  avsbench_fscore(logits[s:s + 20], masks[s:s + 20])) for s in (0, 20)]
    assert res["miou_avsbench"] == pytest.approx(np.mean([p[0] for p in per_batch]), abs=1e-6)
    assert res["f_avsbench"] == pytest.approx(np.mean([p[1] for p in per_batch]), abs=1e-6)


def test_streaming_excludes_frames_without_mask():
    logits, masks = random_case(3, seed=2)
    valid = torch.zeros(3, 5, dtype=torch.bool)
    valid[:, 0] = True  # S4 train style: frame 1 only
    ev = StreamingEvaluator(batch_videos=2)
    ev.update(logits.view(3, 5, *logits.shape[-2:]), {"masks": masks.view(3, 5, *masks.shape[-2:]),
                                                       "mask_valid": valid, "index": torch.arange(3)})
    res = ev.result()
    first = logits[::5], masks[::5]
    assert res["frames"] == 3
    assert res["miou"] == pytest.approx(ref_mask_iou(*first), abs=1e-6)
    expected = np.mean([ref_mask_iou(first[0][:2], first[1][:2]), ref_mask_iou(first[0][2:], first[1][2:])])
    assert res["miou_avsbench"] == pytest.approx(expected, abs=1e-6)


def test_streaming_rejects_duplicate_videos():
    logits, masks = random_case(2, seed=1)
    ev = StreamingEvaluator()
    for lg, batch in _batches(logits, masks, [0, 1, 1], 1):
        ev.update(lg, batch)
    with pytest.raises(ValueError, match="more than once"):
        ev.result()


def test_streaming_rejects_mismatched_sizes():
    ev = StreamingEvaluator()
    with pytest.raises(ValueError, match="pixels"):
        ev.update(torch.zeros(5, 1, 8, 8), {"masks": torch.zeros(1, 5, 4, 4),
                                           "mask_valid": torch.ones(1, 5, dtype=torch.bool),
                                           "index": torch.tensor([0])})


# ---- two processes over gloo ----

def _gather_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        logits, masks = random_case(9, seed=7)
        mine = [v for v in range(9) if v % world == rank]  # interleaved, like a sharded loader
        ev = StreamingEvaluator(batch_videos=4)
        for lg, batch in _batches(logits, masks, mine, 2):
            ev.update(lg, batch)
        res = ev.result()
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # gloo can abort at interpreter shutdown (platform notes): leave without finalizing
    from avs_dist.distributed import hard_exit
    hard_exit(0)


@pytest.mark.slow
def test_two_process_gather_equals_single_process(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_gather_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    logits, masks = random_case(9, seed=7)
    single = StreamingEvaluator(batch_videos=4)
    for lg, batch in _batches(logits, masks, list(range(9)), 4):
        single.update(lg, batch)
    expected = single.result()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got == pytest.approx(expected, abs=1e-12)
