"""The seed's crop branch on AVSBench-semantic: object crops cut in the training forward, the
three crop terms on them, the no-object batch. The 2-process runs of tiny_avss with the branch
(DDP and ZeRO-2, every term finite and equal) are in tests/test_avss_learning.py."""
from __future__ import annotations

import math

import pytest
import torch

from avs_dist.avss.objects import ObjectBoxes, crops_from_boxes, object_boxes
from avs_dist.config import LossConfig, ModelConfig, load_config
from avs_dist.data.loader import train_loader
from avs_dist.losses import (compute_losses, crop_audio_loss_objects, crop_ce_loss_objects, crop_pair_loss,
                             crop_pair_loss_objects, unreached_parameters)
from avs_dist.models import build_model

K = 71
CROP_TERMS = ("crop_ce", "crop_pair", "crop_audio")
ON = [f"loss.{t}=true" for t in CROP_TERMS]


def _objects(clip, frame, cls) -> ObjectBoxes:
    n = len(cls)
    return ObjectBoxes(torch.tensor(clip), torch.tensor(frame), torch.tensor(cls), torch.zeros(n, 4))


def test_forward_cuts_the_crops_of_the_batch_objects(avss_shards):
    """On a real AVSS batch: the crops the branch runs on are crops_from_boxes(frames,
    object_boxes(masks, mask_valid, 71), data.crop_size), each paired with its own frame's
    audio; evaluation (no crops) skips the branch."""
    cfg = load_config("tiny_avss", ["model.crop_branch=true", *ON, "data.image_size=32", "data.crop_size=48",
                                    "data.num_workers=0", "data.batch_videos=4"])
    batch = next(iter(train_loader(avss_shards, cfg.data, 0, 1, seed=3, steps=1, crops=False)))
    assert batch["crops"] is None and batch["mask_valid"].sum() > batch["frames"].shape[0]
    torch.manual_seed(0)
    model = build_model(cfg.model, crop_size=cfg.data.crop_size).train()
    seen = {}
    model.crop.register_forward_pre_hook(lambda m, args, kwargs: seen.update(crops=args[0]), with_kwargs=True)
    out = model(batch["frames"], batch["audio"], None, batch["frame_exists"], batch["masks"], batch["mask_valid"])

    want = object_boxes(batch["masks"], batch["mask_valid"], K)
    got = out["crop_objects"]
    assert len(want) > batch["frames"].shape[0]  # several objects per clip
    for field in ("clip", "frame", "cls", "boxes"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    assert torch.equal(seen["crops"], crops_from_boxes(batch["frames"], want, 48))
    assert seen["crops"].shape == (len(want), 3, 48, 48)
    assert out["crop_logits"].shape == (len(want), K) and out["crop_proj"].shape[0] == len(want)
    own_second = model.crop.audio_proj(out["audio_embed"][want.clip, want.frame])
    torch.testing.assert_close(out["audio_proj"], own_second)
    _, terms = compute_losses(out, batch, cfg.loss)
    assert all(math.isfinite(terms[t].item()) and terms[t].item() > 0 for t in CROP_TERMS)

    model.eval()
    with torch.no_grad():
        out = model(batch["frames"], batch["audio"], None, batch["frame_exists"], batch["masks"], batch["mask_valid"])
    assert out["crop_logits"] is None and out["crop_objects"] is None


def test_object_terms_by_hand():
    # clip 0: class 3 in frames 0 and 1, class 5 in frame 1; clip 1: class 3 in frames 0 and 2
    objects = _objects([0, 0, 0, 1, 1], [0, 1, 1, 0, 2], [3, 3, 5, 3, 3])
    embed = torch.tensor([[0.0, 0.0], [3.0, 4.0], [9.0, 9.0], [1.0, 1.0], [7.0, 9.0]])
    # pairs: (0, 1) at 5 and (3, 4) at 10; class 5 is alone; clip 0's and clip 1's class 3 differ
    assert crop_pair_loss_objects(embed, objects.clip, objects.cls).item() == pytest.approx(7.5, rel=1e-5)

    logits = torch.randn(5, K)
    assert crop_ce_loss_objects(logits, objects.cls).item() == pytest.approx(
        sum(-logits[i].log_softmax(0)[c].item() for i, c in enumerate([3, 3, 5, 3, 3])) / 5, rel=1e-5)

    proj = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0], [0.0, -3.0]])
    audio = torch.tensor([[5.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    # 1 - cos: 0, 1, 0, 1, 2
    assert crop_audio_loss_objects(proj, audio).item() == pytest.approx(4 / 5, rel=1e-6)

    # compute_losses takes the object form when the model says whose crops they are
    out = {"crop_logits": logits, "crop_embed": embed, "crop_proj": proj, "audio_proj": audio,
           "crop_objects": objects}
    batch = {"mask_valid": torch.ones(2, 3, dtype=torch.bool), "label": torch.tensor([-1, -1])}
    cfg = LossConfig(bce=False, ce=False, crop_ce=True, crop_pair=True, crop_audio=True, crop_ce_weight=0.5)
    total, terms = compute_losses(out, batch, cfg)
    assert terms["crop_pair"].item() == pytest.approx(7.5, rel=1e-5)
    assert terms["crop_audio"].item() == pytest.approx(0.8, rel=1e-6)
    assert terms["crop_ce"].item() == crop_ce_loss_objects(logits, objects.cls).item()
    assert total.item() == pytest.approx(0.5 * terms["crop_ce"].item() + 7.5 + 0.8, rel=1e-5)


def test_one_object_in_every_frame_gives_the_seed_pair_term():
    """Each clip's one object in all its 5 frames: the S4 (seed) pairwise value."""
    embed = torch.randn(3 * 5, 8)
    clip = torch.arange(3).repeat_interleave(5)
    objects = _objects(clip.tolist(), list(range(5)) * 3, [7] * 5 + [2] * 5 + [7] * 5)
    got = crop_pair_loss_objects(embed, objects.clip, objects.cls)
    assert got.item() == pytest.approx(crop_pair_loss(embed, 5).item(), rel=1e-6)


def _model_and_empty_batch():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", decoder_channels=8, audio_input="embedding", mask_classes=K,
                      tpavi_frames_per_group=5, tpavi_audio_bias=False, crop_branch=True, crop_depth=18,
                      crop_hidden=16, num_classes=K)
    model = build_model(cfg, load_weights=False, crop_size=48).train()
    b, t = 2, 5
    batch = {"frames": torch.randn(b, t, 3, 32, 32), "audio": torch.randn(b, t, 128),
             "frame_exists": torch.ones(b, t, dtype=torch.bool), "masks": torch.zeros(b, t, 32, 32, dtype=torch.long),
             "mask_valid": torch.ones(b, t, dtype=torch.bool), "label": torch.full((b,), -1)}
    return model, batch


def test_a_batch_without_objects_gives_zero_terms_that_reach_the_branch():
    """All background: N = 0 crops; each term is exactly 0, and the backward still reaches every
    parameter the terms declare (zeros), as DDP without find_unused_parameters needs."""
    model, batch = _model_and_empty_batch()
    stats = {k: v.clone() for k, v in model.crop.state_dict().items() if "running" in k}
    cfg = LossConfig(bce=False, ce=True, avm=False, crop_ce=True, crop_pair=True, crop_audio=True)
    out = model(batch["frames"], batch["audio"], None, batch["frame_exists"], batch["masks"], batch["mask_valid"])
    assert len(out["crop_objects"]) == 0 and out["crop_logits"].shape == (0, K)
    total, terms = compute_losses(out, batch, cfg)
    assert all(terms[t].item() == 0.0 and terms[t].requires_grad for t in CROP_TERMS)
    assert math.isfinite(total.item())
    total.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == [] and unreached_parameters(model, cfg) == []
    branch = dict(model.crop.named_parameters())
    assert all(torch.isfinite(p.grad).all() and not p.grad.any() for p in branch.values())
    # BatchNorm on an empty batch leaves its running statistics alone
    assert all(torch.equal(v, model.crop.state_dict()[k]) for k, v in stats.items())
    # each term alone reaches what its declared reads say, no more, no less
    for term in CROP_TERMS:
        model.zero_grad(set_to_none=True)
        one = LossConfig(bce=False, ce=True, **{term: True})
        out = model(batch["frames"], batch["audio"], None, batch["frame_exists"], batch["masks"], batch["mask_valid"])
        compute_losses(out, batch, one)[0].backward()
        assert unreached_parameters(model, one) == [n for n, p in model.named_parameters()
                                                    if p.requires_grad and p.grad is None], term


def test_a_single_object_crop_trains():
    """One object in the batch (a v1s clip labelled in frame 0): BatchNorm of the crop ResNet
    still has values to normalise at data.crop_size > 32 (config.AVSS_MIN_CROP)."""
    model, batch = _model_and_empty_batch()
    batch["masks"][1, 0, 4:20, 8:12] = 17
    cfg = LossConfig(bce=False, ce=True, crop_ce=True, crop_pair=True, crop_audio=True)
    out = model(batch["frames"], batch["audio"], None, batch["frame_exists"], batch["masks"], batch["mask_valid"])
    assert out["crop_objects"].cls.tolist() == [17] and out["crop_objects"].clip.tolist() == [1]
    total, terms = compute_losses(out, batch, cfg)
    assert terms["crop_pair"].item() == 0.0 and terms["crop_ce"].item() > 0  # no pair of one crop
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.crop.parameters())


def test_training_forward_without_masks_is_refused():
    model, batch = _model_and_empty_batch()
    with pytest.raises(ValueError, match="no crops were given"):
        model(batch["frames"], batch["audio"], None, batch["frame_exists"])
