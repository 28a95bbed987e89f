"""The PVT-v2 AVSModel: timm encoder, weight layouts, AVSBench PVT checkpoints, exactness.

The exactness tests rebuild the whole PVT AVSModel forward here, in float64, from the PVT
release's key layout (avsbench-format.md §3: overlapping patch embeddings, spatial-reduction
attention, MLP with a depthwise 3x3 conv, per-stage LayerNorm), without timm, and compare
with our model (timm inside) loaded from the same weights: to 1e-9 in eval and train mode.
"""
import re

import pytest
import torch
import torch.nn.functional as F

from avs_dist.config import ModelConfig, load_config, to_dict
from avs_dist.models import build_model, to_channels_last
from avs_dist.models.pvt import ARCHS, PVTEncoder
from avs_dist.models.weights import (WeightsError, is_reference_checkpoint, load_init_from, load_pvt,
                                     load_reference_checkpoint, pvt_variant, reference_backbone,
                                     reference_model_overrides)
from test_weights import T, reference_decoder_forward, reference_decoder_state_dict

C, B, S = 16, 2, 64
# PVT-v2-b0 (Wang et al., Table 1), written out here rather than read from our code
B0 = dict(depths=(2, 2, 2, 2), dims=(32, 64, 160, 256), heads=(1, 2, 5, 8), mlp=(8, 8, 4, 4), sr=(8, 4, 2, 1))


def release_state_dict(seed=0, arch=B0, head=True) -> dict:
    """Random PVT-v2 weights under the PVT release's key names (pvt_v2_b*.pth)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, base=0.0, scale=0.1):
        return base + torch.randn(shape, generator=g) * scale

    sd, cin = {}, 3
    for i in range(4):
        c, hid, k = arch["dims"][i], arch["dims"][i] * arch["mlp"][i], 7 if i == 0 else 3
        p = f"patch_embed{i + 1}."
        sd[p + "proj.weight"], sd[p + "proj.bias"] = r(c, cin, k, k, scale=0.3), r(c)
        sd[p + "norm.weight"], sd[p + "norm.bias"] = r(c, base=1.0), r(c)
        for j in range(arch["depths"][i]):
            p = f"block{i + 1}.{j}."
            for norm in ("norm1", "norm2"):
                sd[f"{p}{norm}.weight"], sd[f"{p}{norm}.bias"] = r(c, base=1.0), r(c)
            sd[p + "attn.q.weight"], sd[p + "attn.q.bias"] = r(c, c), r(c)
            sd[p + "attn.kv.weight"], sd[p + "attn.kv.bias"] = r(2 * c, c), r(2 * c)
            if arch["sr"][i] > 1:
                sr = arch["sr"][i]
                sd[p + "attn.sr.weight"], sd[p + "attn.sr.bias"] = r(c, c, sr, sr, scale=0.02), r(c)
                sd[p + "attn.norm.weight"], sd[p + "attn.norm.bias"] = r(c, base=1.0), r(c)
            sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = r(c, c), r(c)
            sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = r(hid, c), r(hid)
            sd[p + "mlp.dwconv.dwconv.weight"], sd[p + "mlp.dwconv.dwconv.bias"] = r(hid, 1, 3, 3, scale=0.3), r(hid)
            sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = r(c, hid), r(c)
        sd[f"norm{i + 1}.weight"], sd[f"norm{i + 1}.bias"] = r(c, base=1.0), r(c)
        cin = c
    if head:
        sd["head.weight"], sd["head.bias"] = r(1000, cin), r(1000)
    return sd


def release_forward(sd, x, arch=B0) -> list:
    """PVT-v2 forward from release-layout weights: the four stage maps [N, C, H, W]."""
    outs = []
    for i in range(4):
        p, k = f"patch_embed{i + 1}.", 7 if i == 0 else 3
        x = F.conv2d(x, sd[p + "proj.weight"], sd[p + "proj.bias"], stride=4 if i == 0 else 2, padding=k // 2)
        n, c, h, w = x.shape
        t = F.layer_norm(x.flatten(2).transpose(1, 2), (c,), sd[p + "norm.weight"], sd[p + "norm.bias"], eps=1e-5)
        for j in range(arch["depths"][i]):
            p = f"block{i + 1}.{j}."
            y = F.layer_norm(t, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
            t = t + _attention(sd, p + "attn.", y, h, w, arch["heads"][i], arch["sr"][i])
            y = F.layer_norm(t, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
            t = t + _mlp(sd, p + "mlp.", y, h, w)
        t = F.layer_norm(t, (c,), sd[f"norm{i + 1}.weight"], sd[f"norm{i + 1}.bias"], eps=1e-6)
        x = t.reshape(n, h, w, c).permute(0, 3, 1, 2)
        outs.append(x)
    return outs


def _attention(sd, p, y, h, w, heads, sr):
    n, tokens, c = y.shape
    d = c // heads
    q = F.linear(y, sd[p + "q.weight"], sd[p + "q.bias"]).reshape(n, tokens, heads, d).transpose(1, 2)
    src = y
    if sr > 1:  # spatial reduction: a stride-sr conv on the token map, then LayerNorm
        z = F.conv2d(y.transpose(1, 2).reshape(n, c, h, w), sd[p + "sr.weight"], sd[p + "sr.bias"], stride=sr)
        src = F.layer_norm(z.flatten(2).transpose(1, 2), (c,), sd[p + "norm.weight"], sd[p + "norm.bias"], eps=1e-5)
    kv = F.linear(src, sd[p + "kv.weight"], sd[p + "kv.bias"]).reshape(n, -1, 2, heads, d)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    attn = torch.softmax(q @ k.transpose(-2, -1) / d ** 0.5, dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(n, tokens, c)
    return F.linear(out, sd[p + "proj.weight"], sd[p + "proj.bias"])


def _mlp(sd, p, y, h, w):
    n = y.shape[0]
    z = F.linear(y, sd[p + "fc1.weight"], sd[p + "fc1.bias"])
    hid = z.shape[-1]
    z = F.conv2d(z.transpose(1, 2).reshape(n, hid, h, w), sd[p + "dwconv.dwconv.weight"], sd[p + "dwconv.dwconv.bias"],
                 padding=1, groups=hid)
    z = F.gelu(z.flatten(2).transpose(1, 2))
    return F.linear(z, sd[p + "fc2.weight"], sd[p + "fc2.bias"])


def avsbench_pvt_state_dict(seed=0) -> dict:
    """An AVSBench PVT `Pred_endecoder` state dict: encoder_backbone. + release keys, then the decoder."""
    sd = {"encoder_backbone." + k: v for k, v in release_state_dict(seed, head=False).items()}
    sd.update(reference_decoder_state_dict(torch.Generator().manual_seed(seed + 1), B0["dims"], C))
    return sd


def timm_to_release(key: str) -> str:
    """timm's PVT-v2 key -> the release's, written out here (the inverse of timm's converter)."""
    key = re.sub(r"^patch_embed\.", "patch_embed1.", key)
    key = re.sub(r"^stages\.(\d)\.downsample\.", lambda m: f"patch_embed{int(m.group(1)) + 1}.", key)
    key = re.sub(r"^stages\.(\d)\.blocks\.(\d+)\.", lambda m: f"block{int(m.group(1)) + 1}.{m.group(2)}.", key)
    key = re.sub(r"^stages\.(\d)\.norm\.", lambda m: f"norm{int(m.group(1)) + 1}.", key)
    return key.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")


def small_cfg(**kw) -> ModelConfig:
    base = dict(backbone="pvt_v2_b0", decoder_channels=C, audio_input="embedding", drop_path=0.0)
    return ModelConfig(**{**base, **kw})


def inputs(seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, 3, S, S, generator=g, dtype=dtype), torch.randn(B, T, 128, generator=g, dtype=dtype))


def _double(sd):
    return {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}


# ---- the encoder

@pytest.mark.parametrize("name", sorted(ARCHS))
def test_encoder_widths_and_variant_from_keys(name):
    enc = PVTEncoder(name, drop_path=0.1).eval()
    assert all(not k.startswith("head.") for k in enc.state_dict())
    assert pvt_variant(enc.state_dict()) == name  # timm layout
    if name == "pvt_v2_b0":
        with torch.no_grad():
            maps = enc(torch.randn(1, 3, 224, 224))
        assert [tuple(m.shape[1:]) for m in maps] == [(32, 56, 56), (64, 28, 28), (160, 14, 14), (256, 7, 7)]
    assert enc.channels == ARCHS[name]["embed_dims"]


def test_b5_is_the_paper_encoder():
    """avsbench-format.md §3: dims 64/128/320/512, depths 3/6/40/3, heads 1/2/5/8, MLP ratio 4,
    sr 8/4/2/1, LayerNorm eps 1e-6 in the blocks, drop-path rising linearly to 0.1 over 52 blocks."""
    enc = PVTEncoder("pvt_v2_b5", drop_path=0.1)
    blocks = [b for s in enc.stages for b in s.blocks]
    assert [len(s.blocks) for s in enc.stages] == [3, 6, 40, 3] and len(blocks) == 52
    assert [s.blocks[0].attn.num_heads for s in enc.stages] == [1, 2, 5, 8]
    assert [s.blocks[0].mlp.fc1.out_features // s.blocks[0].mlp.fc1.in_features for s in enc.stages] == [4] * 4
    assert [s.blocks[0].attn.sr.stride[0] if s.blocks[0].attn.sr is not None else 1 for s in enc.stages] == [8, 4, 2, 1]
    assert all(b.norm1.eps == 1e-6 and b.norm2.eps == 1e-6 for b in blocks)
    assert all(s.norm.eps == 1e-6 for s in enc.stages)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in blocks]
    torch.testing.assert_close(torch.tensor(rates, dtype=torch.float64),
                               torch.linspace(0, 0.1, 52, dtype=torch.float64), rtol=0, atol=1e-7)
    assert all(p.requires_grad for p in enc.parameters())


def test_drop_path_only_in_training():
    torch.manual_seed(0)
    model = build_model(small_cfg(drop_path=0.5), load_weights=False)
    frames, audio = inputs(dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        a, b = model(frames, audio)["logits"], model(frames, audio)["logits"]
    assert torch.equal(a, b)
    enc = model.avs.encoder_backbone.train()
    x = frames.reshape(-1, 3, S, S)
    torch.manual_seed(1)
    m1 = enc(x)[-1]
    torch.manual_seed(2)
    m2 = enc(x)[-1]
    torch.manual_seed(1)
    m3 = enc(x)[-1]
    assert not torch.equal(m1, m2) and torch.equal(m1, m3)  # stochastic, from torch's (seeded) RNG


# ---- exactness against the independent float64 rebuild

@pytest.mark.parametrize("training", [False, True])
def test_avsbench_pvt_checkpoint_matches_independent_forward(tmp_path, training):
    sd = avsbench_pvt_state_dict()
    path = tmp_path / "S4_pvt_best.pth"
    torch.save({"module." + k: v for k, v in sd.items()}, path)  # as saved through DataParallel
    assert is_reference_checkpoint(sd) and reference_backbone(sd) == "pvt_v2_b0"
    model = build_model(small_cfg(), load_weights=False)
    report = load_reference_checkpoint(model, path)
    assert report["skipped"] == sorted(k for k in sd if k.startswith("path4.resConfUnit1."))
    assert torch.equal(model.avs.encoder_backbone.stages[2].blocks[1].mlp.dwconv.weight,
                       sd["encoder_backbone.block3.1.mlp.dwconv.dwconv.weight"])
    model = model.double().train(training)
    frames, audio = inputs()
    with torch.no_grad():
        out = model(frames, audio)
        ref = _double(sd)
        maps = release_forward({k[len("encoder_backbone."):]: v for k, v in ref.items()
                                if k.startswith("encoder_backbone.")}, frames.reshape(B * T, 3, S, S))
        ref_logits, ref_feats, ref_audio = reference_decoder_forward(ref, maps, audio, training=training)
    torch.testing.assert_close(out["logits"], ref_logits, rtol=1e-9, atol=1e-12)
    for (_, visual, a), rv, ra in zip(out["avm"], ref_feats, ref_audio):
        torch.testing.assert_close(visual, rv, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(a, ra)
    model.avs.set_tpavi_impl("reference")  # the quadratic TPAVI oracle agrees too
    with torch.no_grad():
        torch.testing.assert_close(model(frames, audio)["logits"], ref_logits, rtol=1e-9, atol=1e-12)


def test_release_and_timm_layouts_load_the_same_model(tmp_path):
    """ImageNet init from the release's pvt_v2_b0.pth and from timm's own layout: the same
    encoder weights, the same outputs; both equal the independent forward."""
    import timm

    torch.manual_seed(3)
    theirs = timm.create_model("pvt_v2_b0", pretrained=False).eval()  # with its classifier head
    with torch.no_grad():
        for name, p in theirs.named_parameters():  # LayerNorms away from (1, 0) make the test sharper
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    timm_sd = theirs.state_dict()
    release_sd = {timm_to_release(k): v for k, v in timm_sd.items()}
    assert "block3.1.mlp.dwconv.dwconv.weight" in release_sd and "norm4.weight" in release_sd
    torch.save(timm_sd, tmp_path / "timm_b0.pth")
    torch.save(release_sd, tmp_path / "pvt_v2_b0.pth")
    models = []
    for file in ("pvt_v2_b0.pth", "timm_b0.pth"):
        torch.manual_seed(0)
        m = build_model(small_cfg(pretrained_backbone=str(tmp_path / file)))
        models.append(m.double().eval())
    a, b = models
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    frames, audio = inputs()
    with torch.no_grad():
        torch.testing.assert_close(a(frames, audio)["logits"], b(frames, audio)["logits"], rtol=0, atol=0)
        x = frames.reshape(B * T, 3, S, S)
        for ours, ref in zip(a.avs.encoder_backbone(x), release_forward(_double(release_sd), x)):
            torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    report = load_pvt(PVTEncoder("pvt_v2_b0"), tmp_path / "pvt_v2_b0.pth")
    assert report["skipped"] == ["head.bias", "head.weight"]


# ---- checkpoints: recognised from the keys, and clear errors

def test_reference_checkpoint_recognised_without_flags(tmp_path):
    sd = avsbench_pvt_state_dict()
    assert reference_model_overrides(sd) == ["model.backbone=pvt_v2_b0", f"model.decoder_channels={C}",
                                             "model.tpavi_stages=[0, 1, 2, 3]"]
    path = tmp_path / "S4_pvt_best.pth"
    torch.save(sd, path)
    # model.init_from: the same loader
    model = build_model(small_cfg(init_from=str(path)))
    assert torch.equal(model.avs.output_conv[0].weight, sd["output_conv.0.weight"])
    # evaluation: load_for_inference builds the PVT model from the keys alone
    from avs_dist.evaluation import load_for_inference

    loaded, cfg = load_for_inference(path, config_overrides=["data.image_size=64"])
    assert cfg.name == "s4_pvt" and cfg.model.backbone == "pvt_v2_b0" and cfg.model.decoder_channels == C
    assert torch.equal(loaded.avs.encoder_backbone.patch_embed.proj.weight, sd["encoder_backbone.patch_embed1.proj.weight"])
    with pytest.raises(ValueError, match="holds a pvt_v2_b0 model.*model.backbone=resnet50"):
        load_for_inference(path, config_overrides=["model.backbone=resnet50"])


def test_checkpoint_of_another_encoder_says_what_to_set(tmp_path):
    torch.save(avsbench_pvt_state_dict(), tmp_path / "pvt.pth")
    resnet = build_model(ModelConfig(backbone="resnet18", decoder_channels=C, audio_input="embedding"),
                         load_weights=False)
    with pytest.raises(WeightsError, match=r"AVSBench pvt_v2_b0 model; this model's encoder is resnet18 "
                                           r"\(set model.backbone=pvt_v2_b0\)"):
        load_init_from(resnet, tmp_path / "pvt.pth")
    b1 = build_model(small_cfg(backbone="pvt_v2_b1"), load_weights=False)
    with pytest.raises(WeightsError, match="set model.backbone=pvt_v2_b0"):
        load_reference_checkpoint(b1, tmp_path / "pvt.pth")
    torch.save(release_state_dict(), tmp_path / "pvt_v2_b0.pth")
    with pytest.raises(WeightsError, match=r"holds pvt_v2_b0 weights; the model's encoder is pvt_v2_b1"):
        load_pvt(b1.avs.encoder_backbone, tmp_path / "pvt_v2_b0.pth")


def test_reference_checkpoint_key_errors_are_listed(tmp_path):
    model = build_model(small_cfg(), load_weights=False)
    sd = avsbench_pvt_state_dict()
    bad = dict(sd, **{"encoder_backbone.block1.0.attn.q.weight": torch.zeros(32, 7)})
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(WeightsError, match=r"shape mismatches.*encoder_backbone\.stages\.0\.blocks\.0\.attn\.q\.weight "
                                           r"\(file \(32, 7\), model \(32, 32\)\)"):
        load_reference_checkpoint(model, tmp_path / "shape.pth")
    missing = {k: v for k, v in sd.items() if not k.startswith("encoder_backbone.block2.1.mlp.")}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match=r"missing keys.*encoder_backbone\.stages\.1\.blocks\.1\.mlp\.fc1\.weight"):
        load_reference_checkpoint(model, tmp_path / "missing.pth")
    extra = dict(sd, **{"encoder_backbone.block1.0.attn.extra": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(WeightsError, match=r"unexpected keys.*encoder_backbone\.stages\.0\.blocks\.0\.attn\.extra"):
        load_reference_checkpoint(model, tmp_path / "extra.pth")
    odd = {k: v for k, v in sd.items() if not k.startswith("encoder_backbone.block3.")}  # no known variant
    torch.save(odd, tmp_path / "odd.pth")
    with pytest.raises(WeightsError, match="none of resnet18/34/50, pvt_v2_b0..b5"):
        load_reference_checkpoint(model, tmp_path / "odd.pth")
    # a failed load leaves the model as it was
    assert not torch.equal(model.avs.output_conv[0].weight, sd["output_conv.0.weight"])


def test_imagenet_file_errors(tmp_path):
    enc = PVTEncoder("pvt_v2_b0")
    sd = release_state_dict()
    del sd["block1.1.attn.kv.weight"]
    torch.save(sd, tmp_path / "pvt_v2_b0.pth")
    with pytest.raises(WeightsError, match=r"missing keys \(1\): stages\.0\.blocks\.1\.attn\.kv\.weight"):
        load_pvt(enc, tmp_path / "pvt_v2_b0.pth")
    with pytest.raises(WeightsError, match="does not exist"):
        load_pvt(enc, tmp_path / "nope.pth")


# ---- the rest of the model contract with a PVT encoder

def test_pvt_with_seed_crop_branch_and_channels_last():
    cfg = load_config("s4_seed_pvt", ["model.backbone=pvt_v2_b0", "model.decoder_channels=16", "model.crop_depth=18",
                                      "model.crop_hidden=32", "model.audio_input=embedding"]).model
    torch.manual_seed(0)
    model = build_model(cfg, load_weights=False).eval()
    assert type(model.crop.resnet).__name__ == "ResNetEncoder"  # the crop branch stays a ResNet
    frames, audio = inputs(dtype=torch.float32)
    crops = torch.randn(B, T, 3, 32, 32)
    with torch.no_grad():
        a = model(frames, audio, crops)
        to_channels_last(model)
        x = frames.reshape(B * T, 3, S, S).contiguous(memory_format=torch.channels_last)
        logits, _ = model.avs(x, audio, T)
    assert a["logits"].shape == (B * T, 1, S, S) and a["crop_logits"].shape == (B * T, 23)
    torch.testing.assert_close(logits, a["logits"], rtol=1e-4, atol=1e-5)


def test_pvt_matmul_upsample_same_logits():
    torch.manual_seed(0)
    a = build_model(small_cfg(), load_weights=False).double().eval()
    b = build_model(small_cfg(upsample="matmul"), load_weights=False).double().eval()
    b.load_state_dict(a.state_dict())
    frames, audio = inputs()
    with torch.no_grad():
        torch.testing.assert_close(b(frames, audio)["logits"], a(frames, audio)["logits"], rtol=1e-10, atol=1e-12)


def test_our_pvt_checkpoint_loads_for_inference(tmp_path):
    from avs_dist.evaluation import load_for_inference

    cfg = load_config("tiny_pvt")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    from avs_dist.train import checkpoint as ckpt

    (tmp_path / "step").mkdir()
    ckpt.write_model_folder(tmp_path / "step", model.state_dict(), to_dict(cfg), 0, 0, {})
    ckpt.write_complete(tmp_path / "step", {"step": 0, "epoch": 0})
    loaded, lcfg = load_for_inference(tmp_path / "step")
    assert lcfg.model.backbone == "pvt_v2_b0" and not loaded.training
    saved = model.state_dict()
    assert loaded.state_dict().keys() == saved.keys()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
