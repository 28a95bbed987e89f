"""Evaluation loop, audio gap, checkpoint loading and the `avs-dist eval` command."""
import json

import pytest
import torch
from torch import nn

from avs_dist.evaluation import AudioBank, evaluate, load_for_inference

T, S = 5, 8  # frames per video, pixels per side


class AudioOnly(nn.Module):
    """Foreground = left half when the frame's audio is positive, right half otherwise."""

    def forward(self, frames, audio, crops=None):
        b = frames.shape[0]
        sign = audio.reshape(b, T, -1).mean(-1).reshape(b * T, 1, 1, 1)
        left = torch.zeros(1, 1, S, S, device=audio.device)
        left[..., : S // 2] = 1
        pattern = torch.where(sign > 0, left, 1 - left)
        return {"logits": (pattern - 0.5) * 20}


class VisualOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, frames, audio, crops=None):
        return {"logits": self.conv(frames.flatten(0, 1))}


def make_batches(n_videos, batch_videos, seed=0):
    """Videos whose mask is the left half for positive audio, right half for negative."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, n_videos, batch_videos):
        b = min(batch_videos, n_videos - start)
        label = torch.arange(start, start + b) % 2  # sign of the audio = class
        audio = (label.float() * 2 - 1).view(b, 1, 1, 1, 1) * torch.rand(b, T, 1, 96, 64, generator=g).add(0.1)
        left = torch.zeros(S, S)
        left[:, : S // 2] = 1
        masks = torch.where((label > 0).view(b, 1, 1, 1), left, 1 - left).expand(b, T, S, S).clone()
        batches.append({
            "frames": torch.randn(b, T, 3, S, S, generator=g),
            "audio": audio,
            "masks": masks,
            "mask_valid": torch.ones(b, T, dtype=torch.bool),
            "label": label,
            "index": torch.arange(start, start + b),
            "name": [f"v{i}" for i in range(start, start + b)],
        })
    return batches


def test_audio_bank_partners_are_of_another_class():
    bank = AudioBank(per_class=2)
    labels = [5, 5, 5, 2, 2, 9]
    audio = torch.arange(6.0).view(6, 1).expand(6, 3).clone()  # row value = video index
    bank.add(audio[3:], labels[3:], [3, 4, 5])  # ranks / batches in any order
    bank.add(audio[:3], labels[:3], [0, 1, 2])
    assert bank.freeze("cpu") == 5  # class 5 keeps its first two videos only
    rows = bank.partner_rows(labels, list(range(6)))
    got = bank.audio[torch.tensor(rows), 0].long().tolist()
    # class 5 -> the next class, 9 (video 5); class 2 -> class 5, videos [0, 1][index % 2];
    # class 9 wraps around to class 2, videos [3, 4][5 % 2]
    assert got == [5, 5, 5, 1, 0, 4]


def test_audio_bank_without_classes_and_single_class():
    bank = AudioBank(per_class=3)
    bank.add(torch.arange(4.0).view(4, 1), [-1] * 4, [0, 1, 2, 3])
    bank.freeze("cpu")
    rows = bank.partner_rows([-1] * 4, [0, 1, 2, 3])
    partners = bank.audio[torch.tensor(rows), 0].long().tolist()
    assert all(p != i for i, p in enumerate(partners)) and set(partners) <= {0, 1, 2}
    one = AudioBank()
    one.add(torch.arange(2.0).view(2, 1), [7, 7], [0, 1])
    one.freeze("cpu")
    assert one.audio[torch.tensor(one.partner_rows([7, 7], [0, 1])), 0].tolist() == [1.0, 0.0]


def test_audio_gap_nonzero_for_audio_model():
    res = evaluate(AudioOnly(), make_batches(6, 4), "cpu", batch_videos=4)
    assert res["miou"] == pytest.approx(1.0, abs=1e-6)
    # every partner is of the other class, so of the other sign: the mirrored half, IoU 0
    assert res["miou_mismatched"] == pytest.approx(0.0, abs=1e-6)
    assert res["audio_gap"] == pytest.approx(1.0, abs=1e-6)
    # the partners do not depend on the batching
    again = evaluate(AudioOnly(), make_batches(6, 1), "cpu", batch_videos=4)
    assert again == pytest.approx(res)
    assert res["videos"] == 6 and res["frames"] == 30


class LeftOrAll(nn.Module):
    """Left half for positive audio, the whole frame otherwise: IoU 1 / 0.5 with its own audio,
    0 / 0.5 with the other class's, so a gap of 0.5 in each class."""

    def forward(self, frames, audio, crops=None):
        b = frames.shape[0]
        sign = audio.reshape(b, T, -1).mean(-1).reshape(b * T, 1, 1, 1)
        left = torch.zeros(1, 1, S, S)
        left[..., : S // 2] = 1
        return {"logits": (torch.where(sign > 0, left, torch.ones_like(left)) - 0.5) * 20}


def test_audio_gap_per_class():
    from avs_dist.data.classes import S4_CLASSES

    two = [S4_CLASSES[0], S4_CLASSES[1]]
    res = evaluate(AudioOnly(), make_batches(6, 4), "cpu", per_class=True)
    assert list(res["audio_gap_per_class"]) == two and "miou_per_class" not in res
    assert res["audio_gap_per_class"] == pytest.approx({two[0]: 1.0, two[1]: 1.0}, abs=1e-6)
    res = evaluate(LeftOrAll(), make_batches(6, 2), "cpu", per_class=True)
    assert res["audio_gap_per_class"] == pytest.approx({two[0]: 0.5, two[1]: 0.5}, abs=1e-6)
    assert res["audio_gap"] == pytest.approx(0.5, abs=1e-6)
    res = evaluate(VisualOnly(), make_batches(6, 2), "cpu", per_class=True)
    assert res["audio_gap_per_class"] == {two[0]: 0.0, two[1]: 0.0}
    assert "audio_gap_per_class" not in evaluate(AudioOnly(), make_batches(6, 4), "cpu")  # training's evals


def test_audio_gap_zero_for_visual_model():
    model = VisualOnly()
    res = evaluate(model, lambda: iter(make_batches(5, 2)), "cpu", batch_videos=2)
    assert res["audio_gap"] == 0.0
    assert res["miou_mismatched"] == res["miou"]
    assert model.training  # evaluate restores the mode it found


def test_audio_gap_needs_two_videos_and_a_reiterable_loader():
    res = evaluate(AudioOnly(), make_batches(1, 4), "cpu")
    assert res["audio_gap"] is None and res["frames"] == 5
    with pytest.raises(TypeError, match="twice"):
        evaluate(AudioOnly(), iter(make_batches(2, 2)), "cpu")


def test_evaluate_without_gap():
    res = evaluate(AudioOnly(), make_batches(3, 2), "cpu", audio_gap=False)
    assert "audio_gap" not in res and res["miou"] == pytest.approx(1.0, abs=1e-6)


def test_load_for_inference_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_for_inference(tmp_path / "missing.pt")
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_for_inference(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="neither an avs-dist checkpoint"):
        load_for_inference(other)
    with pytest.raises(FileNotFoundError, match="no model.pt"):
        load_for_inference(tmp_path)
    from avs_dist.config import load_config, to_dict

    wrong = tmp_path / "wrong" / "model.pt"
    wrong.parent.mkdir()
    torch.save({"model": {"avs.nope": torch.zeros(1)}, "config": to_dict(load_config("tiny"))}, wrong)
    with pytest.raises(ValueError, match="do not fit"):
        load_for_inference(wrong)
    with pytest.raises(ValueError, match="not a valid checkpoint"):  # a folder must be a whole checkpoint
        load_for_inference(wrong.parent)


# ---- with the real model, loader and shards ----

TINY = ["data.num_workers=0"]


def save_checkpoint(folder, cfg, model):
    """A checkpoint folder of our format (train/checkpoint.py): model.pt and COMPLETE.json."""
    from avs_dist.config import to_dict
    from avs_dist.train import checkpoint as ckpt

    folder.mkdir(parents=True, exist_ok=True)
    ckpt.write_model_folder(folder, model.state_dict(), to_dict(cfg), 0, 0, {})
    ckpt.write_complete(folder, {"step": 0, "epoch": 0})
    return folder


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from avs_dist.config import load_config
    from avs_dist.models.system import build_model

    torch.manual_seed(0)
    cfg = load_config("tiny")
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "step_00000000", cfg, build_model(cfg.model))


def test_load_for_inference_roundtrip(tiny_checkpoint):
    # through the parent folder: its latest valid step
    model, cfg = load_for_inference(tiny_checkpoint.parent, config_overrides=["data.image_size=32"])
    assert not model.training and cfg.model.backbone == "resnet18" and cfg.data.image_size == 32
    saved = torch.load(tiny_checkpoint / "model.pt", weights_only=True)["model"]
    assert model.state_dict().keys() == saved.keys()
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in model.vggish.parameters())  # frozen stays frozen


def test_checkpoint_from_before_model_backbone_loads(tiny_checkpoint, tmp_path):
    """A checkpoint whose saved config says model.depth (before model.backbone) still loads."""
    obj = torch.load(tiny_checkpoint / "model.pt", weights_only=True)
    del obj["config"]["model"]["backbone"], obj["config"]["model"]["drop_path"]
    obj["config"]["model"]["depth"] = 18
    torch.save(obj, tmp_path / "old.pt")
    model, cfg = load_for_inference(tmp_path / "old.pt")
    assert cfg.model.backbone == "resnet18"
    assert all(torch.equal(v, obj["model"][k]) for k, v in model.state_dict().items())


def test_reference_checkpoint_encoder_read_from_keys(tmp_path):
    """No override says which ResNet or how wide: the keys do."""
    from avs_dist.config import load_config
    from avs_dist.models.system import build_model

    cfg = load_config("s4_avsbench", ["model.backbone=resnet18", "model.decoder_channels=16", "model.tpavi_stages=[1,3]"])
    model = build_model(cfg.model)
    torch.save(_reference_state_dict(model), tmp_path / "S4_best.pth")
    _, lcfg = load_for_inference(tmp_path / "S4_best.pth")
    assert (lcfg.model.backbone, lcfg.model.decoder_channels, lcfg.model.tpavi_stages) == ("resnet18", 16, [1, 3])


def test_eval_cli_writes_json(s4_shards, tiny_checkpoint, tmp_path):
    from avs_dist.evaluate import main

    out = tmp_path / "eval.json"
    assert main(["--checkpoint", str(tiny_checkpoint), "--shards", str(s4_shards), "--split", "test",
                 "--batch-videos", "2", "--out", str(out), "--device", "cpu", *TINY]) == 0
    res = json.loads(out.read_text())
    for key in ("miou_avsbench", "f_avsbench", "miou", "f", "audio_gap", "miou_mismatched", "videos", "frames",
                "batch_videos", "checkpoint"):
        assert key in res, key
    assert res["batch_videos"] == 2 and res["videos"] >= 1 and res["frames"] == 5 * res["videos"]
    # issue 18: the figures say which weights they are of
    assert res["source"] == {"kind": "step", "step": 0, "epoch": 0,
                             "checkpoint": str((tiny_checkpoint / "model.pt").resolve())}
    assert 0.0 <= res["miou"] <= 1.0 and 0.0 <= res["f"] <= 1.0
    # the per-class audio gap: in the JSON, and drawn beside it (test videos of >= 1 class)
    gaps = res["audio_gap_per_class"]
    assert gaps and all(-1.0 <= v <= 1.0 for v in gaps.values())
    assert (tmp_path / "eval_audio_gap.png").stat().st_size > 1000


def _reference_state_dict(model):
    """Our AVSModel weights under the AVSBench reference's key names (layer3/4 -> layer3_1/4_1)."""
    import re

    return {re.sub(r"^resnet\.layer([34])\.", r"resnet.layer\1_1.", k): v for k, v in model.avs.state_dict().items()}


def test_reference_checkpoint_accepted(s4_shards, tmp_path):
    from avs_dist.config import load_config
    from avs_dist.evaluate import main
    from avs_dist.models.system import build_model

    # the s4_avsbench preset, made small by overrides (the same ones go to the CLI)
    small = ["model.backbone=resnet18", "model.decoder_channels=32", "data.image_size=64"]
    cfg = load_config("s4_avsbench", small)
    torch.manual_seed(1)
    model = build_model(cfg.model)
    path = tmp_path / "S4_best.pth"
    torch.save({"module." + k: v for k, v in _reference_state_dict(model).items()}, path)
    loaded, lcfg = load_for_inference(path, config_overrides=small)
    assert lcfg.name == "s4_avsbench" and lcfg.model.backbone == "resnet18" and not lcfg.model.crop_branch
    assert torch.equal(loaded.avs.state_dict()["output_conv.0.weight"], model.avs.state_dict()["output_conv.0.weight"])
    out = tmp_path / "ref.json"
    assert main(["--checkpoint", str(path), "--shards", str(s4_shards), "--out", str(out), "--no-audio-gap",
                 "--device", "cpu", *TINY, *small]) == 0
    res = json.loads(out.read_text())
    assert "audio_gap" not in res and res["videos"] >= 1
