"""Weight files: torchvision ResNet, VGGish, AVSBench reference checkpoints, clear errors.

The reference checkpoint here is built from key names written out in this file (the
`Pred_endecoder` layout), and its outputs are checked against an independent functional
re-implementation of the reference forward, in-place ReLU quirk included.
"""
import pytest
import torch
import torch.nn.functional as F
import torchvision

from avs_dist.config import ModelConfig
from avs_dist.models import build_model
from avs_dist.models.resnet import ResNetEncoder
from avs_dist.models.vggish import VGGish
from avs_dist.models.weights import (WeightsError, is_reference_checkpoint,
                                     load_reference_checkpoint, load_torchvision_resnet, load_vggish)

C, B, T, S = 16, 1, 5, 32
STAGE_IN = (64, 128, 256, 512)  # ResNet-18


def reference_decoder_state_dict(g: torch.Generator, stage_in=STAGE_IN, c: int = C) -> dict:
    """Random weights for everything after the encoder, under the reference's key names."""
    def r(*shape):
        return torch.randn(shape, generator=g) * 0.1

    sd = {}
    for i, cin in enumerate(stage_in, start=1):
        for k in range(4):
            sd[f"conv{i}.conv2d_list.{k}.weight"], sd[f"conv{i}.conv2d_list.{k}.bias"] = r(c, cin, 3, 3), r(c)
        for u in (1, 2):
            for cv in (1, 2):
                sd[f"path{i}.resConfUnit{u}.conv{cv}.weight"] = r(c, c, 3, 3)
                sd[f"path{i}.resConfUnit{u}.conv{cv}.bias"] = r(c)
        p = f"tpavi_b{i}."
        for name in ("g", "theta", "phi"):
            sd[p + name + ".weight"], sd[p + name + ".bias"] = r(c // 2, c, 1, 1, 1), r(c // 2)
        sd[p + "W_z.0.weight"], sd[p + "W_z.0.bias"] = r(c, c // 2, 1, 1, 1), r(c)
        sd[p + "W_z.1.weight"], sd[p + "W_z.1.bias"] = 1 + r(c), r(c)
        sd[p + "W_z.1.running_mean"], sd[p + "W_z.1.running_var"] = r(c), 1 + r(c).abs()
        sd[p + "W_z.1.num_batches_tracked"] = torch.tensor(100)
        sd[p + "align_channel.weight"], sd[p + "align_channel.bias"] = r(c, 128), r(c)
        sd[p + "norm_layer.weight"], sd[p + "norm_layer.bias"] = 1 + r(c), r(c)
    sd["output_conv.0.weight"], sd["output_conv.0.bias"] = r(c // 2, c, 3, 3), r(c // 2)
    sd["output_conv.2.weight"], sd["output_conv.2.bias"] = r(c // 8, c // 2, 3, 3), r(c // 8)
    sd["output_conv.4.weight"], sd["output_conv.4.bias"] = r(1, c // 8, 1, 1), r(1)
    return sd


def reference_state_dict(seed=0) -> dict:
    """Random weights under the AVSBench reference's key names (ResNet-18 encoder, C=16)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    tv = torchvision.models.resnet18(weights=None).state_dict()
    for k, v in tv.items():
        if k.startswith("fc."):
            continue
        v = v.clone() if k.endswith("num_batches_tracked") else (
            torch.randn(v.shape, generator=g) * 0.1 + (1.0 if k.endswith("running_var") else 0))
        for layer in ("layer3", "layer4"):
            if k.startswith(layer + "."):
                sd[f"resnet.{layer}_1.{k[len(layer) + 1:]}"] = v
                sd[f"resnet.{layer}_2.{k[len(layer) + 1:]}"] = v.clone()  # the unused branch
                break
        else:
            sd[f"resnet.{k}"] = v
    sd.update(reference_decoder_state_dict(g))
    return sd


def reference_forward(sd, frames, audio):
    """The reference Pred_endecoder forward in eval mode, written functionally from `sd`."""
    enc = torchvision.models.resnet18(weights=None).double()
    enc_sd = {k[len("resnet."):].replace("layer3_1", "layer3").replace("layer4_1", "layer4"): v
              for k, v in sd.items() if k.startswith("resnet.") and "_2." not in k}
    enc.load_state_dict(enc_sd, strict=False)
    enc.eval()
    x = enc.maxpool(enc.relu(enc.bn1(enc.conv1(frames))))
    xs = [enc.layer1(x)]
    for layer in (enc.layer2, enc.layer3, enc.layer4):
        xs.append(layer(xs[-1]))
    return reference_decoder_forward(sd, xs, audio)


def reference_decoder_forward(sd, xs, audio, training=False):
    """The reference's ASPP heads, TPAVI ('dot') and decoder on the four encoder maps `xs`,
    written functionally from `sd`; training=True: TPAVI's BatchNorm uses batch statistics."""
    feats = [sum(F.conv2d(xi, sd[f"conv{i}.conv2d_list.{k}.weight"], sd[f"conv{i}.conv2d_list.{k}.bias"],
                          padding=d, dilation=d) for k, d in enumerate((3, 6, 12, 18)))
             for i, xi in enumerate(xs, start=1)]
    audios = []
    for i in range(4):
        p = f"tpavi_b{i + 1}."
        bt, c, h, w = feats[i].shape
        b = bt // T
        x5 = feats[i].reshape(b, T, c, h, w).permute(0, 2, 1, 3, 4)
        a = F.linear(audio, sd[p + "align_channel.weight"], sd[p + "align_channel.bias"])
        au = a.permute(0, 2, 1)[..., None, None].repeat(1, 1, 1, h, w)
        gx = F.conv3d(x5, sd[p + "g.weight"], sd[p + "g.bias"]).reshape(b, c // 2, -1).permute(0, 2, 1)
        th = F.conv3d(x5, sd[p + "theta.weight"], sd[p + "theta.bias"]).reshape(b, c // 2, -1).permute(0, 2, 1)
        ph = F.conv3d(au, sd[p + "phi.weight"], sd[p + "phi.bias"]).reshape(b, c // 2, -1)
        f = th @ ph
        y = (f / f.shape[-1] @ gx).permute(0, 2, 1).reshape(b, c // 2, T, h, w)
        stats = (None, None) if training else (sd[p + "W_z.1.running_mean"], sd[p + "W_z.1.running_var"])
        wy = F.batch_norm(F.conv3d(y, sd[p + "W_z.0.weight"], sd[p + "W_z.0.bias"]), *stats,
                          sd[p + "W_z.1.weight"], sd[p + "W_z.1.bias"], training=training)
        z = F.layer_norm((wy + x5).permute(0, 2, 3, 4, 1), (c,), sd[p + "norm_layer.weight"], sd[p + "norm_layer.bias"])
        feats[i] = z.permute(0, 4, 1, 2, 3).permute(0, 2, 1, 3, 4).reshape(bt, c, h, w)
        audios.append(a)

    def rcu(p, x):  # the reference's ResidualConvUnit: nn.ReLU(inplace=True) on its input
        out = F.relu(x, inplace=True)
        out = F.conv2d(out, sd[p + "conv1.weight"], sd[p + "conv1.bias"], padding=1)
        out = F.relu(out, inplace=True)
        out = F.conv2d(out, sd[p + "conv2.weight"], sd[p + "conv2.bias"], padding=1)
        return out + x

    def fusion(p, *xs):
        out = xs[0]
        if len(xs) == 2:
            out += rcu(p + "resConfUnit1.", xs[1])
        out = rcu(p + "resConfUnit2.", out)
        return F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=True)

    d = fusion("path4.", feats[3])
    d = fusion("path3.", d, feats[2])
    d = fusion("path2.", d, feats[1])
    d = fusion("path1.", d, feats[0])
    out = F.conv2d(d, sd["output_conv.0.weight"], sd["output_conv.0.bias"], padding=1)
    out = F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=False)
    out = F.relu(F.conv2d(out, sd["output_conv.2.weight"], sd["output_conv.2.bias"], padding=1))
    out = F.conv2d(out, sd["output_conv.4.weight"], sd["output_conv.4.bias"])
    return out, feats, audios  # feats were ReLU'd in place by the decoder, as in the reference


def small_cfg(**kw):
    return ModelConfig(backbone="resnet18", decoder_channels=C, audio_input="embedding", **kw)


def test_reference_checkpoint_matches_reference_forward(tmp_path):
    sd = reference_state_dict()
    path = tmp_path / "S4_best.pth"
    torch.save({"module." + k: v for k, v in sd.items()}, path)  # as saved through DataParallel
    assert is_reference_checkpoint(torch.load(path)) and is_reference_checkpoint(sd)
    model = build_model(small_cfg(), load_weights=False)
    report = load_reference_checkpoint(model, path)
    assert any(k.startswith("resnet.layer3_2.") for k in report["skipped"])
    assert any(k.startswith("resnet.layer4_2.") for k in report["skipped"])
    assert any(k.startswith("path4.resConfUnit1.") for k in report["skipped"])
    assert not any(k.startswith("resnet.layer3_1") for k in report["skipped"])
    assert torch.equal(model.avs.resnet.layer3[0].conv1.weight, sd["resnet.layer3_1.0.conv1.weight"])

    model = model.double().eval()
    g = torch.Generator().manual_seed(1)
    frames = torch.randn(B, T, 3, S, S, generator=g, dtype=torch.float64)
    audio = torch.randn(B, T, 128, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out = model(frames, audio)
        ref_logits, ref_feats, ref_audio = reference_forward({k: v.double() if v.is_floating_point() else v
                                                              for k, v in sd.items()}, frames.reshape(B * T, 3, S, S), audio)
    torch.testing.assert_close(out["logits"], ref_logits, rtol=1e-9, atol=1e-12)
    for (stage, visual, a), rv, ra in zip(out["avm"], ref_feats, ref_audio):
        torch.testing.assert_close(visual, rv, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(a, ra)
    # the factorized default and the quadratic oracle agree on the loaded weights too
    model.avs.set_tpavi_impl("reference")
    with torch.no_grad():
        torch.testing.assert_close(model(frames, audio)["logits"], ref_logits, rtol=1e-9, atol=1e-12)


def test_reference_checkpoint_errors(tmp_path):
    model = build_model(small_cfg(), load_weights=False)
    sd = reference_state_dict()
    bad = dict(sd)
    bad["conv2.conv2d_list.0.weight"] = torch.zeros(C, 999, 3, 3)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(WeightsError, match=r"shape mismatches.*conv2\.conv2d_list\.0\.weight"):
        load_reference_checkpoint(model, tmp_path / "shape.pth")
    extra = dict(sd, **{"tpavi_b1.extra.weight": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(WeightsError, match=r"unexpected keys.*tpavi_b1\.extra\.weight"):
        load_reference_checkpoint(model, tmp_path / "extra.pth")
    missing = {k: v for k, v in sd.items() if not k.startswith("tpavi_b4.")}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match=r"missing keys.*tpavi_b4\.theta\.weight"):
        load_reference_checkpoint(model, tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match="does not exist"):
        load_reference_checkpoint(model, tmp_path / "nope.pth")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "tv.pth")
    with pytest.raises(WeightsError, match="not an AVSBench reference checkpoint"):
        load_reference_checkpoint(model, tmp_path / "tv.pth")
    # the model is untouched by failed loads
    assert not torch.equal(model.avs.conv2.conv2d_list[1].weight, sd["conv2.conv2d_list.1.weight"])


def test_self_mode_skips_align_channel(tmp_path):
    torch.save(reference_state_dict(), tmp_path / "ref.pth")
    model = build_model(small_cfg(tpavi_mode="self"), load_weights=False)
    report = load_reference_checkpoint(model, tmp_path / "ref.pth")
    assert "tpavi_b1.align_channel.weight" in report["skipped"]


def test_torchvision_resnet(tmp_path):
    tv = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    enc = ResNetEncoder(18).eval()
    report = load_torchvision_resnet(enc, path)
    assert report["skipped"] == ["fc.bias", "fc.weight"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        torch.testing.assert_close(enc(x)[-1], expected)
    with pytest.raises(WeightsError, match=r"(?s)missing keys \(\d+\): layer1\.0\.bn3\.bias.*shape mismatches"):
        load_torchvision_resnet(ResNetEncoder(50), path)
    # through the config: both ResNets of the two-branch model
    cfg = small_cfg(crop_branch=True, crop_depth=18, crop_hidden=8, pretrained_backbone=str(path),
                    pretrained_crop_backbone=str(path))
    model = build_model(cfg)
    for enc in (model.avs.resnet, model.crop.resnet):
        assert torch.equal(enc.layer2[1].conv2.weight, tv.layer2[1].conv2.weight)
    with pytest.raises(WeightsError, match="does not exist"):
        build_model(small_cfg(pretrained_backbone=str(tmp_path / "missing.pth")))


def test_vggish_weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    shapes = {"features.0": (64, 1, 3, 3), "features.3": (128, 64, 3, 3), "features.6": (256, 128, 3, 3),
              "features.8": (256, 256, 3, 3), "features.11": (512, 256, 3, 3), "features.13": (512, 512, 3, 3),
              "embeddings.0": (4096, 12288), "embeddings.2": (4096, 4096), "embeddings.4": (128, 4096)}
    sd = {}
    for name, shape in shapes.items():
        sd[name + ".weight"] = torch.randn(*shape, generator=g) * 0.01
        sd[name + ".bias"] = torch.randn(shape[0], generator=g) * 0.01
    path = tmp_path / "vggish-10086976.pth"
    torch.save(sd, path)
    v = VGGish()
    assert load_vggish(v, path)["loaded"] == 18
    assert torch.equal(v.embeddings[4].weight, sd["embeddings.4.weight"])
    sd["embeddings.4.weight"] = torch.zeros(64, 4096)
    torch.save(sd, path)
    with pytest.raises(WeightsError, match=r"embeddings\.4\.weight \(file \(64, 4096\), model \(128, 4096\)\)"):
        load_vggish(v, path)


def test_init_from_our_checkpoint(tmp_path):
    src = build_model(small_cfg(), load_weights=False)
    step = tmp_path / "step_00000010"
    step.mkdir()
    torch.save({"model": src.state_dict(), "config": {"name": "x"}, "step": 10}, step / "model.pt")
    dst = build_model(small_cfg(init_from=str(step)))
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
