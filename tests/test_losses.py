"""Losses: hand-computed values, masking, and which parameters the terms reach."""
import math

import pytest
import torch
import torch.nn.functional as F

from avs_dist.config import LossConfig, ModelConfig
from avs_dist.losses import (avm_loss, avm_loss_ms3, avm_loss_s4, bce_loss, compute_losses, crop_audio_loss,
                             crop_ce_loss, crop_pair_loss)
from avs_dist.models import build_model

ALL_ON = LossConfig(bce_weight=1.0, avm=True, avm_weight=0.5, avm_stages=[0, 1, 2, 3], crop_ce=True,
                    crop_ce_weight=0.7, crop_pair=True, crop_pair_weight=0.2, crop_audio=True, crop_audio_weight=0.3)


def _bce(x, y):
    p = 1 / (1 + math.exp(-x))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_bce_masked_mean_by_hand():
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0, -3.0, 1.5, 0.2, -0.7]).reshape(4, 1, 1, 2)  # B=2, T=2, 1x2
    masks = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]).reshape(2, 2, 1, 2)
    valid = torch.tensor([[True, False], [True, True]])
    px = [(0.5, 1), (-1.0, 0), (-3.0, 0), (1.5, 0), (0.2, 1), (-0.7, 0)]  # frames 0, 2, 3
    expected = sum(_bce(x, y) for x, y in px) / len(px)
    assert bce_loss(logits, masks, valid).item() == pytest.approx(expected, rel=1e-6)
    # first-frame-only (S4 train) equals the reference's BCELoss on frame 0 alone
    s4 = torch.tensor([[True, False], [True, False]])
    ref = torch.nn.BCELoss()(torch.sigmoid(logits.reshape(2, 2, 1, 2)[:, 0]), masks[:, 0])
    assert bce_loss(logits, masks, s4).item() == pytest.approx(ref.item(), rel=1e-6)
    assert bce_loss(logits, masks, torch.zeros(2, 2, dtype=torch.bool)).item() == 0.0  # not NaN


def test_avm_by_hand():
    # B=1, T=2, C=2. Stage 0 is 2x2: frame 0's predicted mask covers pixel (0, 0) only,
    # frame 1's mask is empty. Stage 1 is 1x1: frame 0's pooled probability is 0.25 -> empty.
    logits = torch.full((2, 1, 4, 4), -20.0)
    logits[0, 0, :2, :2] = 20.0
    v0 = torch.full((2, 2, 2, 2), 5.0)
    v0[0, :, 0, 0] = torch.tensor([1.0, 0.0])
    v0[0, :, 1, 1] = torch.tensor([0.0, -7.0])
    a0 = torch.tensor([[[1.0, 1.0], [3.0, -1.0]]])
    v1, a1 = torch.rand(2, 2, 1, 1), torch.rand(1, 2, 2)
    avm = [(0, v0, a0), (1, v1, a1)]
    empty = -math.log(1e-6)
    stage0 = (-math.log(1 / math.sqrt(2) + 1e-6) + empty) / 2
    assert avm_loss(logits, avm, [0]).item() == pytest.approx(stage0, rel=1e-5)
    assert avm_loss_s4(logits, avm, [0]).item() == pytest.approx(stage0, rel=1e-5)
    assert avm_loss(logits, avm, [0, 1]).item() == pytest.approx((stage0 + empty) / 2, rel=1e-5)
    # a negative cosine counts like an empty mask: relu(cos) = 0
    a_neg = torch.tensor([[[-1.0, -1.0], [3.0, -1.0]]])
    assert avm_loss(logits, [(0, v0, a_neg)], [0]).item() == pytest.approx(empty, rel=1e-5)
    with pytest.raises(ValueError, match="stages \\[2\\]"):
        avm_loss(logits, avm, [2])


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _kl(p, q):
    """sum_c p_c log(p_c / q_c): what kl_div(q.log(), p, reduction='sum') computes for one frame."""
    return sum(pc * math.log(pc / qc) for pc, qc in zip(p, q))


def _softmax(x):
    e = [math.exp(v) for v in x]
    return [v / sum(e) for v in e]


def _ms3_case():
    # B=1, T=2, C=2, stage 2x2, logits 4x4. Frame 0: logit 2 on the top-left 2x2 block, 0
    # elsewhere -> pooled logits [[2, 0], [0, 0]] -> soft mask [[s(2), .5], [.5, .5]]; frame 1
    # all 0 -> mask 0.5 everywhere.
    logits = torch.zeros(2, 1, 4, 4)
    logits[0, 0, :2, :2] = 2.0
    v = torch.zeros(2, 2, 2, 2)
    v[0, 0, 0, 0] = 1.0  # channel 0: 1 at the top-left pixel
    v[0, 1, 1, 1] = 4.0  # channel 1: 4 at the bottom-right pixel
    v[1] = 2.0
    a = torch.tensor([[[0.0, 1.0], [3.0, 3.0]]])
    # pooled = mean over the 4 pixels of v * mask
    pooled0 = [_sigmoid(2.0) / 4, 4 * 0.5 / 4]
    pooled1 = [1.0, 1.0]
    expected = _kl(_softmax(a[0, 0].tolist()), _softmax(pooled0)) + _kl(_softmax(a[0, 1].tolist()), _softmax(pooled1))
    return logits, v, a, expected


def test_avm_ms3_by_hand():
    """The MS3 recipe's AVM loss: soft mask from pooled logits, no threshold, no normalisation,
    KL divergence summed over frames and channels (avs_ms3/loss.py with kl_flag). (rel 1e-5:
    a KL of 0.056 is a difference of float32 logs of order 1.)"""
    logits, v, a, expected = _ms3_case()
    assert expected > 0.01  # frame 1 contributes 0 (both uniform), frame 0 does not
    assert avm_loss_ms3(logits, [(0, v, a)], [0]).item() == pytest.approx(expected, rel=1e-5)
    assert avm_loss(logits, [(0, v, a)], [0], "ms3").item() == pytest.approx(expected, rel=1e-5)
    # summed, not averaged: the same frames twice give twice the loss
    twice = avm_loss_ms3(torch.cat([logits, logits]), [(0, torch.cat([v, v]), torch.cat([a, a]))], [0])
    assert twice.item() == pytest.approx(2 * expected, rel=1e-5)
    # ... unless rescaled to a fixed number of frames (the reference's batch): then a batch cut
    # in two halves (two ranks) has the loss of the whole
    assert avm_loss_ms3(logits, [(0, v, a)], [0], sum_frames=20).item() == pytest.approx(10 * expected, rel=1e-5)
    doubled = [(0, torch.cat([v, v]), torch.cat([a, a]))]
    assert avm_loss_ms3(torch.cat([logits, logits]), doubled, [0], sum_frames=20).item() == pytest.approx(
        10 * expected, rel=1e-5)
    # averaged over stages: a second stage of 1x1 maps
    v1, a1 = torch.tensor([[[[2.0]], [[0.0]]], [[[0.0]], [[0.0]]]]), torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    m1 = [_sigmoid(0.5), _sigmoid(0.0)]  # pooled logits of the frames: 0.5 (4 of 16 pixels at 2), 0
    stage1 = (_kl(_softmax([1.0, 0.0]), _softmax([2 * m1[0], 0.0])) + _kl([0.5, 0.5], [0.5, 0.5]))
    both = avm_loss_ms3(logits, [(0, v, a), (1, v1, a1)], [0, 1]).item()
    assert both == pytest.approx((expected + stage1) / 2, rel=1e-5)


def test_avm_variants_differ_in_gradient_and_value():
    logits, v, a, expected = _ms3_case()
    logits.requires_grad_(True)
    avm_loss_ms3(logits, [(0, v, a)], [0]).backward()
    assert logits.grad.abs().sum() > 0  # the soft mask passes gradient to the predicted mask
    logits.grad = None
    s4 = avm_loss_s4(logits, [(0, v.requires_grad_(True), a)], [0])
    # S4 on the same tensors: frame 0's thresholded mask keeps pixel (0, 0) only (s(2) > .5,
    # the others are exactly .5, not > .5) -> pooled [1, 0], cos with [0, 1] = 0; frame 1's mask is empty
    empty = -math.log(1e-6)
    assert s4.item() == pytest.approx(empty, rel=1e-5) and s4.item() != pytest.approx(expected)
    assert torch.autograd.grad(s4, logits, allow_unused=True)[0] is None  # thresholded: no gradient to the mask
    with pytest.raises(ValueError, match="variant must be one of"):
        avm_loss(logits, [(0, v, a)], [0], "kl")


def test_compute_losses_uses_the_configured_variant():
    logits, v, a, expected = _ms3_case()
    batch = {"masks": torch.zeros(1, 2, 4, 4), "mask_valid": torch.ones(1, 2, dtype=torch.bool)}
    out = {"logits": logits, "avm": [(0, v, a)]}
    # ms3: the sum over this batch's 2 frames rescaled to loss.avm_sum_videos=4 videos of 2 frames
    for variant, value in (("ms3", 4 * expected), ("s4", -math.log(1e-6))):
        cfg = LossConfig(avm=True, avm_weight=0.5, avm_stages=[0], avm_variant=variant)
        total, terms = compute_losses(out, batch, cfg)
        assert terms["avm"].item() == pytest.approx(value, rel=1e-5)
        assert total.item() == pytest.approx(terms["bce"].item() + 0.5 * value, rel=1e-5)


def test_crop_terms_by_hand():
    e = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])  # one video, 3 crops
    assert crop_pair_loss(e, frames=3).item() == pytest.approx((5 + 10 + 5) / 3, rel=1e-5)
    proj, audio = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 0.0]])
    assert crop_audio_loss(proj, audio).item() == pytest.approx(0.5, rel=1e-6)
    logits = torch.randn(4, 5)
    label = torch.tensor([1, -1])  # frames=2: crops 0, 1 are class 1; crops 2, 3 are ignored
    expected = torch.nn.functional.cross_entropy(logits[:2], torch.tensor([1, 1]))
    assert crop_ce_loss(logits, label, frames=2).item() == pytest.approx(expected.item(), rel=1e-6)
    assert crop_ce_loss(logits, torch.tensor([-1, -1]), frames=2).item() == 0.0


def _setup(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone="resnet18", decoder_channels=16, crop_depth=18, crop_hidden=32, crop_branch=True)
    model = build_model(cfg).train()
    with torch.no_grad():  # the BN after W_z starts at zero, which would cut TPAVI off from the loss
        for name, m in model.named_modules():
            if name.endswith("W_z.1"):
                m.weight.normal_()
    b, s = 2, 32
    valid = torch.zeros(b, 5, dtype=torch.bool)
    valid[:, 0] = True
    batch = {"frames": torch.randn(b, 5, 3, s, s), "audio": torch.randn(b, 5, 1, 96, 64),
             "crops": torch.randn(b, 5, 3, 32, 32), "masks": (torch.rand(b, 5, s, s) > 0.5).float(),
             "mask_valid": valid, "label": torch.tensor([3, 11])}
    return model, batch


def _nonzero(p):
    return p.grad is not None and bool(p.grad.abs().sum() > 0)


def test_all_terms_reach_every_trainable_parameter():
    model, batch = _setup()
    out = model(batch["frames"], batch["audio"], batch["crops"])
    total, terms = compute_losses(out, batch, ALL_ON)
    assert set(terms) == {"bce", "avm", "crop_ce", "crop_pair", "crop_audio"}
    weights = {"bce": 1.0, "avm": 0.5, "crop_ce": 0.7, "crop_pair": 0.2, "crop_audio": 0.3}
    assert total.item() == pytest.approx(sum(weights[k] * v.item() for k, v in terms.items()), rel=1e-6)
    assert all(v.requires_grad for v in terms.values())
    total.backward()
    silent = []
    for name, p in model.named_parameters():
        if name.startswith("vggish."):
            assert not p.requires_grad and p.grad is None
        elif name.endswith("W_z.0.bias"):
            # A conv bias right before train-mode BatchNorm is subtracted out by the batch mean:
            # its gradient is zero in exact arithmetic (in the reference too).
            assert p.grad.abs().max() < 1e-6
        elif not _nonzero(p):
            silent.append(name)
    assert not silent, f"parameters without gradient: {silent}"


def test_crop_terms_off_leave_crop_branch_alone():
    model, batch = _setup()
    out = model(batch["frames"], batch["audio"], batch["crops"])
    cfg = LossConfig(avm=True, avm_weight=0.5)
    total, terms = compute_losses(out, batch, cfg)
    assert set(terms) == {"bce", "avm"}
    total.backward()
    assert all(p.grad is None for p in model.crop.parameters())
    assert _nonzero(model.avs.conv1.conv2d_list[0].weight)


def test_crop_terms_need_crop_outputs():
    batch = {"masks": torch.zeros(1, 5, 32, 32), "mask_valid": torch.ones(1, 5, dtype=torch.bool),
             "label": torch.tensor([0])}
    out = {"logits": torch.zeros(5, 1, 32, 32), "avm": [], "crop_logits": None, "crop_embed": None,
           "crop_proj": None, "audio_proj": None}
    with pytest.raises(ValueError, match="crop branch"):
        compute_losses(out, batch, LossConfig(crop_ce=True))
    out.update(crop_logits=torch.zeros(5, 23), crop_proj=torch.zeros(5, 128))
    with pytest.raises(ValueError, match="audio_proj"):
        compute_losses(out, batch, LossConfig(crop_audio=True))


def test_unreached_parameters_match_the_real_gradients():
    # What DDP is told (train/strategy.py _find_unused) comes from the terms' declared reads and
    # the model's output_params: a term or an output declared wrongly fails here.
    from avs_dist.losses import TERMS, unreached_parameters

    torch.manual_seed(0)
    # embeddings instead of log-mels: the frozen VGGish is not what this test is about, and costs most
    model = build_model(ModelConfig(backbone="resnet18", decoder_channels=8, crop_depth=18, crop_hidden=16,
                                    crop_branch=True, audio_input="embedding")).train()
    with torch.no_grad():  # the BN after W_z starts at zero, which would cut TPAVI off from the loss
        for name, m in model.named_modules():
            if name.endswith("W_z.1"):
                m.weight.normal_()
    valid = torch.zeros(2, 5, dtype=torch.bool)
    valid[:, 0] = True
    batch = {"frames": torch.randn(2, 5, 3, 32, 32), "audio": torch.randn(2, 5, 128), "crops": torch.randn(2, 5, 3, 32, 32),
             "masks": (torch.rand(2, 5, 32, 32) > 0.5).float(), "mask_valid": valid, "label": torch.tensor([3, 11])}
    table = model.output_params()
    crop = {n for n, _ in model.named_parameters() if n.startswith("crop.")}
    expected = {(): crop, ("crop_pair",): {f"crop.{m}.{k}" for m in ("fc2", "crop_proj", "audio_proj")
                                           for k in ("weight", "bias")}, ("crop_ce", "crop_audio"): set()}
    for switches, unused in expected.items():  # crop_pair alone leaves fc2 unused: the old name list missed it
        model.zero_grad(set_to_none=True)
        cfg = LossConfig(**{s: True for s in switches})
        out = model(batch["frames"], batch["audio"], batch["crops"])
        assert set(table) == set(out), "AVSSystem.output_params must name every output of forward"
        assert all(set(t.reads) <= set(out) for t in TERMS.values())
        compute_losses(out, batch, cfg)[0].backward()
        no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert unreached_parameters(model, cfg) == no_grad
        assert set(no_grad) == unused, switches
    prefixes = tuple(p for v in table.values() for p in v)
    assert not [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(prefixes)]


def test_loss_term_names_live_only_where_the_architecture_doc_says():
    # docs/architecture.md "Adding a loss term": losses.py (TERMS) and config.py (LossConfig)
    # are the only places; anything else that lists term names is a hidden coupling.
    import re
    from pathlib import Path

    import avs_dist
    from avs_dist.losses import TERMS

    allowed = {"losses.py", "config.py"}
    names = [t for t in TERMS if t != "bce"]
    outputs = {"avm"}  # also a model output's name (architecture.md "Model"): only its switch counts
    switch = re.compile(r"\bloss\.(" + "|".join(names) + r")\b")  # cfg.loss.crop_ce, loss.avm=true
    quoted = re.compile(r"[\"'](" + "|".join(n for n in names if n not in outputs) + r")[\"']")
    root = Path(avs_dist.__file__).parent
    found = [f"{p.relative_to(root)}:{i}: {line.strip()}" for p in root.rglob("*.py") if p.name not in allowed
             for i, line in enumerate(p.read_text().splitlines(), 1) if switch.search(line) or quoted.search(line)]
    assert not found, f"loss term names outside losses.py / config.py: {found}"


# ---- AVSBench-semantic: class cross-entropy and the AVSS AVM loss, against the reference ----

from avss_reference import A_MaskedV_SimmLoss, F10_IoU_BCELoss  # noqa: E402

from avs_dist.losses import avm_loss_avss, ce_loss  # noqa: E402

K10, T10 = 71, 10


def _avss_case(seed=0, b=3, side=16, c=8, dtype=torch.float64):
    """B clips of 10 frames: a 10-second clip, a v1m-like clip (5 frames, all labelled) and a
    v1s-like clip (5 frames, frame 0 labelled); logits and maps are 0 on padded frames, as the
    model makes them, masks 0 where unlabelled."""
    g = torch.Generator().manual_seed(seed)
    exists = torch.ones(b, T10, dtype=torch.bool)
    exists[1:, 5:] = False
    valid = exists.clone()
    valid[2, 1:] = False
    keep = exists.reshape(-1, 1, 1, 1).to(dtype)
    logits = torch.randn(b * T10, K10, side, side, generator=g, dtype=dtype) * 3 * keep
    logits[:, 0] += 2.0  # background wins at many pixels, so the mask is neither empty nor full
    logits = logits * keep
    masks = torch.randint(0, K10, (b, T10, side, side), generator=g) * valid[..., None, None]
    avm = []
    for s, hw in enumerate((side // 4, side // 8)):
        v = torch.rand(b * T10, c, hw, hw, generator=g, dtype=dtype) * keep * 3
        a = torch.randn(b, T10, c, generator=g, dtype=dtype) * exists[..., None]
        avm.append((s, v, a))
    return logits, masks, valid, avm


def test_ce_equals_the_avss_reference():
    logits, masks, valid, _ = _avss_case()
    lo, lr = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = ce_loss(lo, masks, valid)
    ref = F10_IoU_BCELoss(lr, masks.reshape(-1, *masks.shape[-2:]), valid.reshape(-1).double())
    assert ours.dtype == torch.float32  # computed in float32 whatever the input
    assert abs(ours.item() - ref.item()) < 1e-5 * ref.item()
    ours.backward()
    ref.backward()
    # float32 inside ce_loss: the gradients agree to float32 rounding
    torch.testing.assert_close(lo.grad, lr.grad, rtol=1e-4, atol=1e-9)
    # unlabelled frames do not count: changing their logits changes nothing
    other = logits.clone()
    other[~valid.reshape(-1)] += 5.0
    assert ce_loss(other, masks, valid).item() == ours.item()
    assert ce_loss(logits, masks, torch.zeros_like(valid)).item() == 0.0  # not the reference's NaN


@pytest.mark.parametrize("variant,bg", [("avss_avsbench", None), ("avss", 0)])
def test_avm_avss_equals_the_reference(variant, bg):
    """The AVSS recipe's AVM loss (kl_flag, avg pooling, no threshold, no normalisation) against
    the reference's A_MaskedV_SimmLoss: "avss_avsbench" is its code as published, whose mask is
    argmax != K-1 (the last class); "avss" is the same with background = class 0."""
    logits, masks, valid, avm = _avss_case()
    stages = [0, 1]
    vis = [v.clone().requires_grad_() for _, v, _ in avm]
    vis_ref = [v.clone().requires_grad_() for _, v, _ in avm]
    ours_avm = [(s, vi, a) for (s, _, a), vi in zip(avm, vis)]
    ours = avm_loss(logits, ours_avm, stages, variant, valid=valid)
    ref = A_MaskedV_SimmLoss(logits, [a for _, _, a in avm], vis_ref, valid.reshape(-1).double(), stages,
                             mask_pooling_type="avg", norm_fea=False, threshold=False, kl_flag=True, bg_idx=bg)
    assert abs(ours.item() - ref.item()) < 1e-5 * ref.item(), (ours.item(), ref.item())
    ours.backward()
    ref.backward()
    for a, b in zip(vis, vis_ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-9)
    # the two variants differ: different pixels count as the sounding object
    other = "avss" if variant == "avss_avsbench" else "avss_avsbench"
    assert abs(avm_loss(logits, avm, stages, other, valid=valid).item() - ours.item()) > 1e-3
    with pytest.raises(ValueError, match="labelled frames"):
        avm_loss(logits, avm, stages, variant)


@pytest.mark.parametrize("variant", ["ms3", "avss", "avss_avsbench"])
@pytest.mark.parametrize("side", ["visual", "audio"])
def test_avm_kl_gradient_stays_finite_when_a_probability_underflows(variant, side):
    """The KL forms work on log-probabilities (losses._kl_softmax), not the reference's
    kl_div(softmax(v).log(), softmax(a)): the same loss to rounding, but once channels of the
    pooled visual features are ~95 apart (a denormal probability: log()'s backward overflows)
    or those of the audio features ~120 apart (a probability of 0: xlogy's backward is 0/0),
    the reference's formula keeps a finite loss and gives a NaN gradient; a tiny_avss run then
    skipped every step from ~step 60 on. Ours: the same loss, a finite gradient."""
    torch.manual_seed(0)
    k = 71 if variant != "ms3" else 1
    logits = torch.randn(4, k, 8, 8) + (20.0 if variant == "ms3" else 0.0)  # ms3: sigmoid 1.0, a mask of ones
    if variant != "ms3":
        logits[:, 5] += 10.0  # every pixel an object: the mask is all ones under either variant's background
    visual = torch.rand(4, 6, 4, 4)
    audio = torch.randn(2, 2, 6)
    if side == "visual":
        visual[:, 1] += 95.0  # the other channels' softmax ~e^-95: denormal
    else:
        audio[..., 2] += 120.0  # the other channels' softmax underflows to 0
    visual.requires_grad_(True)
    audio.requires_grad_(True)
    valid = torch.ones(2, 2, dtype=torch.bool)
    loss = avm_loss(logits, [(0, visual, audio)], [0], variant, valid=valid)
    grads = torch.autograd.grad(loss, [visual, audio])
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads) and grads[0].abs().sum() > 0
    # the reference's formula: the same loss, a NaN gradient
    v2, a2 = visual.detach().clone().requires_grad_(True), audio.detach().clone().requires_grad_(True)
    bg = 0 if variant == "avss" else k - 1
    mask = (torch.sigmoid(F.adaptive_avg_pool2d(logits, (4, 4))) if variant == "ms3"
            else F.adaptive_avg_pool2d((logits.softmax(1).argmax(1, keepdim=True) != bg).float(), (4, 4)))
    pooled = (v2 * mask).mean(-1).mean(-1)
    kl = F.kl_div(pooled.softmax(dim=-1).log(), a2.reshape(-1, 6).softmax(-1), reduction="none").sum(-1)
    ref = kl.sum() if variant == "ms3" else kl.mean()
    ref_grads = torch.autograd.grad(ref, [v2, a2])
    assert ref.item() == pytest.approx(loss.item(), rel=1e-5)
    assert not all(torch.isfinite(g).all() for g in ref_grads)


def test_avm_avss_mask_passes_no_gradient_to_the_logits():
    logits, masks, valid, avm = _avss_case()
    logits.requires_grad_(True)
    avm = [(s, v.requires_grad_(True), a) for s, v, a in avm]
    loss = avm_loss_avss(logits, avm, [0], valid)
    g_logits, g_visual = torch.autograd.grad(loss, [logits, avm[0][1]], allow_unused=True)
    assert g_logits is None and g_visual.abs().sum() > 0


def test_compute_losses_avss():
    logits, masks, valid, avm = _avss_case()
    batch = {"masks": masks, "mask_valid": valid}
    cfg = LossConfig(bce=False, ce=True, ce_weight=1.0, avm=True, avm_weight=0.5, avm_stages=[0, 1],
                     avm_variant="avss")
    total, terms = compute_losses({"logits": logits, "avm": avm}, batch, cfg)
    assert set(terms) == {"ce", "avm"}
    assert terms["ce"].item() == ce_loss(logits, masks, valid).item()
    assert terms["avm"].item() == avm_loss_avss(logits, avm, [0, 1], valid).item()
    assert total.item() == pytest.approx(terms["ce"].item() + 0.5 * terms["avm"].item(), rel=1e-6)


def _avss_model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(backbone="resnet18", decoder_channels=8, audio_input="embedding", mask_classes=K10,
                                    tpavi_frames_per_group=5, tpavi_audio_bias=False)).train()
    with torch.no_grad():  # the BN after W_z starts at zero, which would cut TPAVI off from the loss
        for name, m in model.named_modules():
            if name.endswith("W_z.1"):
                m.weight.normal_()
    b = 2
    exists = torch.ones(b, T10, dtype=torch.bool)
    exists[1, 5:] = False
    valid = exists.clone()
    valid[1, 1:] = False
    batch = {"frames": torch.randn(b, T10, 3, 32, 32) * exists[..., None, None, None],
             "audio": torch.randn(b, T10, 128), "frame_exists": exists,
             "masks": torch.randint(0, K10, (b, T10, 32, 32)) * valid[..., None, None], "mask_valid": valid}
    return model, batch


# (AVM alone is not a config: validation asks for a mask term, config._mask_head_problems)
@pytest.mark.parametrize("switches", [{"ce": True}, {"ce": True, "avm": True}])
def test_avss_unreached_parameters_match_the_real_gradients(switches):
    from avs_dist.losses import unreached_parameters

    model, batch = _avss_model_and_batch()
    cfg = LossConfig(bce=False, avm_weight=0.5, avm_variant="avss", **switches)
    out = model(batch["frames"], batch["audio"], frame_exists=batch["frame_exists"])
    compute_losses(out, batch, cfg)[0].backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unreached_parameters(model, cfg) == no_grad
    if "ce" in switches:  # every trainable parameter of the AVSModel hears the cross-entropy
        assert no_grad == []
