"""AVSS metrics: equal to a transcription of the reference, hand-computed cases, exact merging."""
import math
import os

import pytest
import torch

from avs_dist.avss.metrics import (
    BACKGROUND,
    CLASS_ROWS,
    FRAME_ROWS,
    NUM_CLASSES,
    SemanticEvaluator,
    class_indices,
    f_avsbench,
    miou_avsbench,
    semantic_metrics,
)
from avs_dist.avss.report import format_per_class
from avs_dist.distributed import free_port

T = 10  # frames per padded clip

# ---- the oracle ----
# A faithful transcription of OpenNLPLab/AVSBench avs_scripts/avss/utils/compute_color_metrics.py
# (_batch_miou_fscore, calc_color_miou_fscore) and of the accumulation and final reduction in
# avs_scripts/avss/test.py, commit 35d0b425f409bebac5eeb9073a9c78f4b476cf05. The one change:
# test.py unpacks three of the four values the function returns (a crash as released); here the
# fourth is taken and ignored.


def _ref_batch_miou_fscore(output, target, nclass, T, beta2=0.3):
    mini = 1
    maxi = nclass
    nbins = nclass
    predict = torch.argmax(output, 1) + 1
    target = target.float() + 1
    predict = predict.float() * (target > 0).float()
    intersection = predict * (predict == target).float()
    batch_size = target.shape[0] // T  # noqa: F841 (unused in the reference too)
    cls_count = torch.zeros(nclass).float()
    ious = torch.zeros(nclass).float()
    fscores = torch.zeros(nclass).float()
    vid_miou_list = []
    for i in range(target.shape[0]):
        area_inter = torch.histc(intersection[i].cpu(), bins=nbins, min=mini, max=maxi)
        area_pred = torch.histc(predict[i].cpu(), bins=nbins, min=mini, max=maxi)
        area_lab = torch.histc(target[i].cpu(), bins=nbins, min=mini, max=maxi)
        area_union = area_pred + area_lab - area_inter
        assert torch.sum(area_inter > area_union).item() == 0
        iou = 1.0 * area_inter.float() / (2.220446049250313e-16 + area_union.float())
        ious += iou
        cls_count[torch.nonzero(area_union).squeeze(-1)] += 1
        precision = area_inter / area_pred
        recall = area_inter / area_lab
        fscore = (1 + beta2) * precision * recall / (beta2 * precision + recall)
        fscore[torch.isnan(fscore)] = 0.
        fscores += fscore
        vid_miou_list.append(torch.sum(iou) / (torch.sum(iou != 0).float()))
    return ious, fscores, cls_count, vid_miou_list


def _ref_calc_color_miou_fscore(pred, target, T=10):
    nclass = pred.shape[1]
    pred = torch.softmax(pred, dim=1)
    miou, fscore, cls_count, vid_miou_list = _ref_batch_miou_fscore(pred, target, nclass, T)
    return miou, fscore, cls_count, vid_miou_list


def _ref_test(batches):
    """test.py's metric loop over (output, mask) batches -> (miou, miou_noBg, F, F_noBg, miou_pc, f_pc)."""
    miou_pc = torch.zeros((NUM_CLASSES))
    Fs_pc = torch.zeros((NUM_CLASSES))
    cls_pc = torch.zeros((NUM_CLASSES))
    for output, mask in batches:
        _miou_pc, _fscore_pc, _cls_pc, _ = _ref_calc_color_miou_fscore(output, mask,)
        miou_pc += _miou_pc
        cls_pc += _cls_pc
        Fs_pc += _fscore_pc
    miou_pc = miou_pc / cls_pc
    miou_pc[torch.isnan(miou_pc)] = 0
    miou = torch.mean(miou_pc).item()
    miou_noBg = torch.mean(miou_pc[:-1]).item()
    f_score_pc = Fs_pc / cls_pc
    f_score_pc[torch.isnan(f_score_pc)] = 0
    f_score = torch.mean(f_score_pc).item()
    f_score_noBg = torch.mean(f_score_pc[:-1]).item()
    return miou, miou_noBg, f_score, f_score_noBg, miou_pc, f_score_pc


def _reference_view(logits, target, exists, valid):
    """What the reference pipeline hands its metric: its model multiplies the output by the
    frame-exists flag (PVT_AVSModel / ResNet_AVSModel forward), its loader pads the labels of
    frames without a mask with zeros (color_dataloader.py)."""
    return logits * exists.float().view(-1, 1, 1, 1), torch.where(valid.view(-1, 1, 1), target, 0)


def _ref_figures(logits, target, exists, valid, batch_clips=4):
    out, lab = _reference_view(logits, target, exists, valid)
    step = batch_clips * T  # the reference's test batch: 4 clips of 10 frames
    return _ref_test([(out[i:i + step], lab[i:i + step]) for i in range(0, out.shape[0], step)])


# ---- random AVSS-like frames ----

def random_case(n_clips, seed, size=12, lengths=(5, 10), pool=None, unlabelled=False):
    """Clips of 5 or 10 frames padded to 10: logits [N,71,H,W], target, frame_exists, mask_valid.

    Object classes come from a small pool (so most classes are absent; class 70 is in the
    default pool), some frames are empty (all background), predictions are the labels
    corrupted by noise and by blocks of wrong classes; padded frames hold garbage in both.
    `unlabelled`: some clips are labelled in their first frame only (like v1s train).
    """
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(pool or [3, 9, 17, 40, 41, 70])
    n = n_clips * T
    target = torch.zeros(n, size, size, dtype=torch.int64)
    exists = torch.zeros(n, dtype=torch.bool)
    valid = torch.zeros(n, dtype=torch.bool)
    for c in range(n_clips):
        length = lengths[int(torch.randint(len(lengths), (1,), generator=g))]
        exists[c * T:c * T + length] = True
        first_only = unlabelled and bool(torch.rand(1, generator=g) < 0.5)
        valid[c * T:c * T + (1 if first_only else length)] = True
        objects = pool[torch.randperm(len(pool), generator=g)[:int(torch.randint(0, 4, (1,), generator=g))]]
        for f in range(c * T, c * T + length):
            if torch.rand(1, generator=g) < 0.15:
                continue  # an empty frame
            for cls in objects.tolist():
                y, x = torch.randint(0, size - 3, (2,), generator=g).tolist()
                hh, ww = torch.randint(2, size // 2, (2,), generator=g).tolist()
                target[f, y:y + hh, x:x + ww] = cls
    # padded frames: garbage labels, which the metrics must not read
    target[~exists] = torch.randint(0, NUM_CLASSES, (int((~exists).sum()), size, size), generator=g)
    noisy = target.clone()
    flip = torch.rand(target.shape, generator=g) < 0.2
    noisy[flip] = pool[torch.randint(len(pool), (int(flip.sum()),), generator=g)]
    for f in range(n):  # a block of a wrong class in some frames
        if torch.rand(1, generator=g) < 0.3:
            y, x = torch.randint(0, size - 4, (2,), generator=g).tolist()
            noisy[f, y:y + 4, x:x + 4] = int(torch.randint(0, NUM_CLASSES, (1,), generator=g))
    logits = 4.0 * torch.nn.functional.one_hot(noisy, NUM_CLASSES).permute(0, 3, 1, 2).float()
    logits += torch.randn(logits.shape, generator=g)
    return logits, target, exists, valid


CASES = [  # (clips, seed, kwargs)
    (6, 0, {}),
    (9, 1, {}),
    (8, 2, {"lengths": (5,)}),
    (7, 3, {"lengths": (10,)}),
    (10, 4, {"unlabelled": True}),
    (5, 5, {"pool": [1, 2, 70]}),
    (9, 6, {"pool": list(range(1, 71)), "size": 16}),
]


@pytest.mark.parametrize("n_clips,seed,kw", CASES)
def test_avsbench_figures_equal_the_reference(n_clips, seed, kw):
    logits, target, exists, valid = random_case(n_clips, seed, **kw)
    miou, miou_nobg, f, f_nobg, miou_pc, f_pc = _ref_figures(logits, target, exists, valid)
    res = semantic_metrics(logits, target, exists, valid)
    # float32 sums in the reference, exact sums here
    assert res["miou_avsbench"] == pytest.approx(miou, abs=1e-6)
    assert res["f_avsbench"] == pytest.approx(f, abs=1e-6)
    assert res["miou_nobg_avsbench"] == pytest.approx(miou_nobg, abs=1e-6)
    assert res["f_nobg_avsbench"] == pytest.approx(f_nobg, abs=1e-6)
    assert miou_avsbench(logits, target, exists, valid) == res["miou_avsbench"]
    assert f_avsbench(logits, target, exists, valid) == res["f_avsbench"]
    per = res["per_class"]
    assert torch.allclose(torch.tensor([p["iou_avsbench"] for p in per], dtype=torch.float64), miou_pc.double(), atol=1e-6, rtol=0)
    assert torch.allclose(torch.tensor([p["f_avsbench"] for p in per], dtype=torch.float64), f_pc.double(), atol=1e-6, rtol=0)
    assert res["frames_avsbench"] == n_clips * T
    assert res["frames_padded"] == int((~exists).sum())
    assert 0 < res["miou_avsbench"] < 1
    # the reference's figure is the frame-level one over all 71 classes, but for the frames it adds
    all_scored = bool((exists & valid).all())
    assert (res["miou_avsbench"] == res["miou_frame_all71"]) == all_scored


def test_reference_figure_does_not_depend_on_batch_size():
    logits, target, exists, valid = random_case(8, 11)
    one = _ref_figures(logits, target, exists, valid, batch_clips=1)
    four = _ref_figures(logits, target, exists, valid, batch_clips=4)
    for a, b in zip(one[:4], four[:4]):
        assert a == pytest.approx(b, abs=1e-6)


def test_indices_give_what_logits_give():
    logits, target, exists, valid = random_case(6, 12)
    a = semantic_metrics(logits, target, exists, valid)
    b = semantic_metrics(class_indices(logits), target, exists, valid)
    assert a == b


def test_logits_become_indices_through_softmax_as_in_the_reference():
    # logits 1e-8 apart tie after float32 softmax; the reference's argmax then takes the first
    logits = torch.full((1, NUM_CLASSES, 1, 1), -5.0)
    logits[0, 7] = 1e-8
    logits[0, 3] = 0.0
    assert int(logits.argmax(1)) == 7
    assert int(class_indices(logits)) == 3
    assert int(torch.softmax(logits, 1).argmax(1)) == 3


def test_padded_frames_scored_as_the_reference_whatever_pred_holds():
    logits, target, exists, valid = random_case(6, 13)
    zeroed = logits * exists.float().view(-1, 1, 1, 1)
    a = semantic_metrics(logits, target, exists, valid)
    b = semantic_metrics(zeroed, torch.where(exists.view(-1, 1, 1), target, 0), exists, valid)
    assert a == b
    # dropping the padded frames altogether changes only the reference's figures
    keep = exists
    c = semantic_metrics(logits[keep], target[keep], exists[keep], valid[keep])
    for key in ("miou_frame_objects", "miou_dataset_all71", "f_frame_present", "iou_frame_background"):
        assert c[key] == a[key]
    assert c["miou_avsbench"] != a["miou_avsbench"]
    # each padded frame is a perfect background frame to the reference: background gains
    assert a["per_class"][BACKGROUND]["iou_avsbench"] > c["per_class"][BACKGROUND]["iou_avsbench"]


# ---- hand-computed ----

def _hand_case():
    """Two scored 4x4 frames and one padded frame (whose content must not matter)."""
    target = torch.tensor([
        [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [2, 2, 0, 0]],
        [[0, 0, 0, 0]] * 4,
        [[5, 5, 5, 5]] * 4,
    ])
    pred = torch.tensor([
        [[0, 0, 1, 1], [0, 0, 1, 0], [0, 0, 0, 0], [2, 0, 0, 3]],
        [[1, 0, 0, 0]] + [[0, 0, 0, 0]] * 3,
        [[7, 7, 7, 7]] * 4,
    ])
    flags = torch.tensor([True, True, False])
    return pred, target, flags, flags.clone()


def test_hand_computed_figures():
    res = semantic_metrics(*_hand_case())
    f_ = lambda i, p, g: 1.3 * i / (0.3 * g + p)  # noqa: E731  F from counts, (1+b2) I / (b2 Gt + Pr)
    # frame 1: background I=9 Pr=11 Gt=10 (U=12); class 1 I=3 Pr=3 Gt=4; class 2 I=1 Pr=1 Gt=2;
    # class 3 predicted once, never labelled. Frame 2: background I=15 Pr=15 Gt=16; class 1 Pr=1.
    bg_frames = [9 / 12, 15 / 16]
    bg_f = [f_(9, 11, 10), f_(15, 15, 16)]
    c1 = [3 / 4, 0.0]
    c1_f = [f_(3, 3, 4), 0.0]
    c2, c2_f = 1 / 2, f_(1, 1, 2)
    ap = lambda x: pytest.approx(x, abs=1e-12)  # noqa: E731
    # frame level: per class the mean over the frames whose union holds it
    assert res["iou_frame_background"] == ap(sum(bg_frames) / 2)
    assert res["f_frame_background"] == ap(sum(bg_f) / 2)
    assert res["miou_frame_objects"] == ap((sum(c1) / 2 + c2) / 2)
    assert res["f_frame_objects"] == ap((sum(c1_f) / 2 + c2_f) / 2)
    assert res["miou_frame_present"] == ap((sum(bg_frames) / 2 + sum(c1) / 2 + c2) / 3)
    assert res["miou_frame_all71"] == ap((sum(bg_frames) / 2 + sum(c1) / 2 + c2 + 0.0) / 71)
    assert res["miou_frame_objects_all70"] == ap((sum(c1) / 2 + c2) / 70)
    # dataset level: sums first. background I=24 Pr=26 Gt=26; class 1 I=3 Pr=4 Gt=4
    assert res["iou_dataset_background"] == ap(24 / 28)
    assert res["f_dataset_background"] == ap(f_(24, 26, 26))
    assert res["miou_dataset_objects"] == ap((3 / 5 + 1 / 2) / 2)
    assert res["f_dataset_objects"] == ap((f_(3, 4, 4) + f_(1, 1, 2)) / 2)
    assert res["miou_dataset_present"] == ap((24 / 28 + 3 / 5 + 1 / 2) / 3)
    assert res["miou_dataset_all71"] == ap((24 / 28 + 3 / 5 + 1 / 2) / 71)
    # the reference adds the padded frame as a perfect background frame
    assert res["miou_avsbench"] == ap(((sum(bg_frames) + 1) / 3 + sum(c1) / 2 + c2) / 71)
    assert res["f_avsbench"] == ap(((sum(bg_f) + 1) / 3 + sum(c1_f) / 2 + c2_f) / 71)
    assert (res["frames_scored"], res["frames_padded"], res["frames_avsbench"]) == (2, 1, 3)
    assert (res["classes_present"], res["objects_present"]) == (3, 2)
    c3 = res["per_class"][3]  # predicted, never labelled: scored 0, not in the present means
    assert (c3["present"], c3["iou_frame"], c3["iou_dataset"], c3["frames_union"]) == (False, 0.0, 0.0, 1)
    assert res["per_class"][4]["iou_frame"] is None and res["per_class"][4]["iou_avsbench"] == 0.0
    assert res["per_class"][1]["frames_gt"] == 1 and res["per_class"][1]["frames_union"] == 2


def test_no_background_variant_drops_the_last_class_not_background():
    # background half right, class 70 ("woman") perfect, class 5 perfect
    target = torch.zeros(2, 4, 4, dtype=torch.int64)
    target[0, :2] = 70
    target[1, :2] = 5
    pred = target.clone()
    pred[:, 3] = 9  # four of the eight background pixels of each frame predicted as class 9
    flags = torch.ones(2, dtype=torch.bool)
    res = semantic_metrics(pred, target, flags, flags)
    iou = torch.tensor([p["iou_avsbench"] for p in res["per_class"]], dtype=torch.float64)
    assert iou[70] == 1.0 and iou[5] == 1.0 and iou[BACKGROUND] == pytest.approx(0.5)
    assert res["miou_nobg_avsbench"] == pytest.approx(float(iou[:70].mean()), abs=1e-15)  # what it is
    assert res["miou_nobg_avsbench"] == pytest.approx((0.5 + 1.0) / 70, abs=1e-15)
    assert res["miou_nobg_avsbench"] != pytest.approx(float(iou[1:].mean()))  # what its name says
    assert res["miou_frame_objects"] == 1.0 and res["iou_frame_background"] == pytest.approx(0.5)


def test_no_scored_frames_give_nan_means_not_errors():
    target = torch.zeros(3, 4, 4, dtype=torch.int64)
    none = torch.zeros(3, dtype=torch.bool)
    res = semantic_metrics(target, target, none, none)
    assert math.isnan(res["miou_frame_objects"]) and math.isnan(res["iou_dataset_background"])
    assert res["miou_avsbench"] == pytest.approx(1 / 71)  # three perfect background frames
    empty = semantic_metrics(torch.zeros(0, 4, 4, dtype=torch.int64), torch.zeros(0, 4, 4, dtype=torch.int64),
                             torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool))
    assert empty["frames_avsbench"] == 0 and empty["miou_avsbench"] == 0.0


# ---- streaming and merging ----

def _feed(ev, logits, target, exists, valid, idx, batch):
    for i in range(0, len(idx), batch):
        j = idx[i:i + batch]
        ev.update(logits[j], target[j], exists[j], valid[j])


def test_batch_size_and_splits_do_not_change_a_bit():
    logits, target, exists, valid = random_case(6, 21, unlabelled=True)
    n = target.shape[0]
    whole = SemanticEvaluator()
    whole.update(logits, target, exists, valid)
    expected = whole.state_dict()
    for batch in (1, 7, 40):
        ev = SemanticEvaluator()
        _feed(ev, logits, target, exists, valid, torch.arange(n), batch)
        assert all(torch.equal(ev.state_dict()[k], expected[k]) for k in expected)
    # three uneven parts in a shuffled order, merged
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    parts = [perm[:13], perm[13:35], perm[35:]]
    evs = []
    for p, batch in zip(parts, (4, 10, 3)):
        ev = SemanticEvaluator()
        _feed(ev, logits, target, exists, valid, p, batch)
        evs.append(ev)
    merged = SemanticEvaluator()
    for ev in evs:
        merged.merge(ev)
    merged.merge(SemanticEvaluator().state_dict())  # an idle rank adds nothing
    assert all(torch.equal(merged.state_dict()[k], expected[k]) for k in expected)
    assert merged.result() == whole.result() == semantic_metrics(logits, target, exists, valid)


def test_state_dict_round_trip_and_shape():
    logits, target, exists, valid = random_case(3, 22)
    ev = SemanticEvaluator()
    ev.update(logits, target, exists, valid)
    state = ev.state_dict()
    assert state["classes"].shape == (len(CLASS_ROWS), NUM_CLASSES) and state["classes"].dtype == torch.int64
    assert state["frames"].shape == (len(FRAME_ROWS),)
    other = SemanticEvaluator()
    other.load_state_dict(state)
    assert other.result() == ev.result()
    with pytest.raises(ValueError, match=r"state\['classes'\] must be int64 \(10, 71\)"):
        other.load_state_dict({"classes": torch.zeros(3, 71, dtype=torch.int64), "frames": state["frames"]})


# ---- bad input ----

def _ok():
    target = torch.zeros(2, 4, 4, dtype=torch.int64)
    flags = torch.ones(2, dtype=torch.bool)
    return target, flags


@pytest.mark.parametrize("make,match", [
    (lambda t, f: (torch.zeros(2, 5, 4), t, f, f), r"pred \(2, 5, 4\) and target \(2, 4, 4\) do not match"),
    (lambda t, f: (torch.zeros(3, NUM_CLASSES, 4, 4), t, f, f), r"pred \(3, 71, 4, 4\) and target \(2, 4, 4\)"),
    (lambda t, f: (torch.zeros(2, 70, 4, 4), t, f, f), r"pred \(2, 70, 4, 4\) and target \(2, 4, 4\) do not match: expected logits \[N,71,H,W\]"),
    (lambda t, f: (t, t.float(), f, f), r"target must be int class indices \[N,H,W\], got \(2, 4, 4\) torch.float32"),
    (lambda t, f: (t, t + 71, f, f), r"target holds class indices 71..71, outside 0..70"),
    (lambda t, f: (t, t - 1, f, f), r"target holds class indices -1..-1"),
    (lambda t, f: (t + 80, t, f, f), r"pred holds class indices 80..80"),
    (lambda t, f: (t, t, torch.ones(3, dtype=torch.bool), f), r"frame_exists \(3,\) must have one entry per frame, 2"),
    (lambda t, f: (t, t, torch.tensor([True, False]), f), r"padded frame cannot have a label"),
])
def test_bad_input_is_a_clear_value_error(make, match):
    target, flags = _ok()
    with pytest.raises(ValueError, match=match):
        semantic_metrics(*make(target, flags))


def test_class_names_must_be_71():
    target, flags = _ok()
    with pytest.raises(ValueError, match="class_names has 2 names, expected 71"):
        semantic_metrics(target, target, flags, flags, class_names=["background", "x"])


# ---- the per-class table ----

def test_per_class_table():
    names = ["background"] + [f"class{k}" for k in range(1, NUM_CLASSES)]
    res = semantic_metrics(*_hand_case(), class_names=names)
    assert res["per_class"][2]["name"] == "class2"
    table = format_per_class(res, names)
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["idx", "class"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:] if ln.split() and ln.split()[0].isdigit()}
    assert set(rows) == {"0", "1", "2", "3"}  # the classes in some union; 3 is predicted only
    assert rows["2"][1] == "class2" and rows["1"][3] == "0.3750"  # iou_frame of class 1
    assert rows["3"][2] == "0"  # frames with the class in the label
    assert "not in any scored frame (67 classes): class4, class5," in table
    assert "miou_frame_objects" in table and "0.4375" in table
    plain = format_per_class(res)  # without names: indices only
    assert "class2" not in plain and plain.splitlines()[1].split()[0] == "0"
    with pytest.raises(ValueError, match="class_names has 1 names"):
        format_per_class(res, ["x"])


# ---- two processes over gloo ----

def _reduce_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        logits, target, exists, valid = random_case(7, 31)
        clips = [c for c in range(7) if c % world == rank]  # interleaved clips, like a sharded loader
        frames = torch.cat([torch.arange(c * T, (c + 1) * T) for c in clips])
        ev = SemanticEvaluator()
        _feed(ev, logits, target, exists, valid, frames, 6)
        torch.save(ev.result(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    from avs_dist.distributed import hard_exit  # gloo can abort at shutdown (platform notes)
    hard_exit(0)


@pytest.mark.slow
def test_two_process_all_reduce_equals_single_process(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_reduce_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = semantic_metrics(*random_case(7, 31))
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == expected
