"""AVSModel / AVSSystem: shapes of the model contract, modes, VGGish layout, layouts."""
import pytest
import torch
import torchvision

from avs_dist.config import ModelConfig
from avs_dist.models import build_model, to_channels_last
from avs_dist.models.avsmodel import AVSModel
from avs_dist.models.resnet import ResNetEncoder
from avs_dist.models.vggish import VGGish

B, T, S = 2, 5, 32


def tiny(**kw) -> ModelConfig:
    base = dict(backbone="resnet18", decoder_channels=16, crop_depth=18, crop_hidden=32, audio_input="embedding")
    base.update(kw)
    return ModelConfig(**base)


def inputs(audio_input="embedding", crop=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(B, T, 3, S, S, generator=g)
    audio = (torch.randn(B, T, 128, generator=g) if audio_input == "embedding"
             else torch.randn(B, T, 1, 96, 64, generator=g))
    crops = torch.randn(B, T, 3, crop, crop, generator=g)
    return frames, audio, crops


def test_output_contract_two_branch_logmel():
    cfg = tiny(audio_input="logmel", crop_branch=True)
    model = build_model(cfg)
    frames, audio, crops = inputs("logmel")
    out = model(frames, audio, crops)
    assert out["logits"].shape == (B * T, 1, S, S)
    assert out["audio_embed"].shape == (B, T, 128)
    assert [s for s, _, _ in out["avm"]] == [0, 1, 2, 3]
    for stage, (s, v, a) in enumerate(out["avm"]):
        side = S // (4 * 2 ** stage)
        assert v.shape == (B * T, 16, side, side) and a.shape == (B, T, 16)
        assert v.min() >= 0  # relu(TPAVI output), as the reference's loss sees it
    assert out["crop_logits"].shape == (B * T, 23)
    assert out["crop_embed"].shape == (B * T, 32)
    assert out["crop_proj"].shape == (B * T, 128) and out["audio_proj"].shape == (B, 128)


def test_one_branch_and_stage_subset():
    model = build_model(tiny(tpavi_stages=[1, 3]))
    frames, audio, _ = inputs()
    out = model(frames, audio)
    assert [s for s, _, _ in out["avm"]] == [1, 3]
    assert out["crop_logits"] is None and out["crop_proj"] is None and out["audio_proj"] is None
    assert not hasattr(model.avs, "tpavi_b1") and hasattr(model.avs, "tpavi_b4")


def test_self_mode_has_no_audio_path():
    model = build_model(tiny(tpavi_mode="self"))
    frames, audio, _ = inputs()
    out = model(frames, None)
    assert out["avm"] == [] and out["audio_embed"] is None
    assert out["logits"].shape == (B * T, 1, S, S)
    assert not any("align_channel" in k for k in model.state_dict())
    # audio given in 'self' mode: embedded (the crop branch may use it), never used by TPAVI
    torch.testing.assert_close(model.eval()(frames, audio)["logits"], model(frames, None)["logits"])


def test_tpavi_impl_switch_same_logits():
    torch.manual_seed(0)
    model = build_model(tiny()).double().eval()
    for name, m in model.named_modules():  # make TPAVI matter (its BN starts at zero)
        if name.endswith("W_z.1"):
            torch.nn.init.normal_(m.weight)
    frames, audio, _ = inputs()
    frames, audio = frames.double(), audio.double()
    fac = model(frames, audio)["logits"]
    model.avs.set_tpavi_impl("reference")
    ref = model(frames, audio)["logits"]
    assert ((fac - ref).norm() / ref.norm()) < 1e-10


def test_channels_last_same_result():
    torch.manual_seed(0)
    model = build_model(tiny(crop_branch=True)).eval()
    frames, audio, crops = inputs()
    a = model(frames, audio, crops)
    to_channels_last(model)
    assert model.avs.conv1.conv2d_list[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = frames.reshape(B * T, 3, S, S).contiguous(memory_format=torch.channels_last)
    logits, _ = model.avs(x, audio, T)
    torch.testing.assert_close(logits, a["logits"], rtol=1e-4, atol=1e-5)


def test_vggish_frozen_and_eval():
    model = build_model(tiny(audio_input="logmel"))
    model.train()
    assert not model.vggish.training and model.avs.training
    assert all(not p.requires_grad for p in model.vggish.parameters())
    frames, audio, _ = inputs("logmel")
    out = model(frames, audio)
    assert not out["audio_embed"].requires_grad


def test_vggish_layout_and_hwc_flatten():
    v = VGGish()
    shapes = {k: tuple(t.shape) for k, t in v.state_dict().items()}
    expected = {"features.0.weight": (64, 1, 3, 3), "features.3.weight": (128, 64, 3, 3),
                "features.6.weight": (256, 128, 3, 3), "features.8.weight": (256, 256, 3, 3),
                "features.11.weight": (512, 256, 3, 3), "features.13.weight": (512, 512, 3, 3),
                "embeddings.0.weight": (4096, 12288), "embeddings.2.weight": (4096, 4096),
                "embeddings.4.weight": (128, 4096)}
    for k, s in expected.items():
        assert shapes[k] == s and shapes[k.replace("weight", "bias")] == (s[0],)
    assert len(shapes) == 18
    # Route one feature-map element (c, h, w) to output 0: its flat index must be (h*4 + w)*512 + c.
    c, h, w = 7, 5, 2
    with torch.no_grad():
        for i in (0, 2, 4):
            v.embeddings[i].weight.zero_(), v.embeddings[i].bias.zero_()
        v.embeddings[0].weight[0, (h * 4 + w) * 512 + c] = 1
        v.embeddings[2].weight[0, 0] = 1
        v.embeddings[4].weight[0, 0] = 1
    mel = torch.randn(3, 1, 96, 64)
    fmap = v.features(mel)
    assert fmap.shape == (3, 512, 6, 4)
    torch.testing.assert_close(v(mel)[:, 0], fmap[:, c, h, w])


def test_resnet_encoder_has_torchvision_keys():
    for depth, ctor in ((18, torchvision.models.resnet18), (50, torchvision.models.resnet50)):
        ours = set(ResNetEncoder(depth).state_dict())
        theirs = set(ctor(weights=None).state_dict())
        assert ours == theirs - {"fc.weight", "fc.bias"}


def test_aspp_init_and_head_widths():
    m = AVSModel(backbone="resnet18", channels=256, tpavi_stages=[0])
    w = torch.cat([c.weight.flatten() for c in m.conv1.conv2d_list])
    assert abs(w.std().item() - 0.01) < 1e-3 and m.conv1.conv2d_list[3].dilation == (18, 18)
    assert (m.output_conv[0].out_channels, m.output_conv[2].out_channels) == (128, 32)  # reference widths
    small = AVSModel(backbone="resnet18", channels=32, tpavi_stages=[0])
    assert (small.output_conv[0].out_channels, small.output_conv[2].out_channels) == (16, 4)
    assert not hasattr(m.path4, "resConfUnit1") and hasattr(m.path3, "resConfUnit1")


def test_bad_inputs_are_clear():
    model = build_model(tiny(crop_branch=True))
    frames, audio, crops = inputs()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(frames[..., :24, :24], audio, crops)
    with pytest.raises(ValueError, match=r"expects \[B, T, 128\]"):
        model(frames, torch.randn(B, T, 1, 96, 64), crops)
    with pytest.raises(ValueError, match="no crops"):
        model(frames, audio)
    with pytest.raises(ValueError, match="audio is required"):
        model(frames, None, crops)


def test_vggish_random_init_is_fixed_and_not_deaf():
    """Without a weights file VGGish is the same function in every process, and its
    embeddings vary with the input (PyTorch's default init gives near-constant outputs)."""
    from avs_dist.models.vggish import VGGish

    torch.manual_seed(1)
    a = VGGish()
    torch.manual_seed(2)
    b = VGGish()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    x = torch.randn(8, 1, 96, 64) * 2 - 2
    emb = a(x)
    assert emb.std(dim=0).mean() > 1e-2


def test_checkpoint_state_excludes_frozen_vggish():
    from avs_dist.config import ModelConfig
    from avs_dist.models import build_model

    cfg = ModelConfig(backbone="resnet18", decoder_channels=16, crop_branch=False)
    m = build_model(cfg, load_weights=False)
    sd = m.state_dict()
    assert sd and not any(k.startswith("vggish.") for k in sd)
    wrapped = torch.nn.Sequential(m)  # keys under a prefix too (DDP's "module.")
    assert not any(".vggish." in k for k in wrapped.state_dict())
    m2 = build_model(cfg, load_weights=False)
    m2.load_state_dict(sd)  # strict: VGGish is not reported missing
    with pytest.raises(RuntimeError, match="Missing key"):
        m2.load_state_dict({k: v for k, v in sd.items() if not k.startswith("avs.output_conv")})


def test_vggish_memo_equals_computing_each_video():
    """On CPU each video's embeddings are computed once, on their own, and looked up after: the
    same values whatever batch a video first came in, none kept across new weights, and none
    when ZeRO-3 partitions the weights (a hit on one rank would leave the others in a gather)."""
    torch.manual_seed(0)
    v = VGGish()
    audio = torch.randn(3, 5, 1, 96, 64)
    alone = torch.stack([v(a) for a in audio])
    assert torch.equal(v.embed_videos(audio[1:]), alone[1:])  # two videos computed and kept
    assert len(v._memo) == 2
    assert torch.equal(v.embed_videos(audio), alone) and len(v._memo) == 3  # one more computed
    audio[0, 2, 0, 5, 5] += 1.0  # other bytes: another key, computed
    assert torch.equal(v.embed_videos(audio)[0], v(audio[0])) and len(v._memo) == 4
    v.load_state_dict(v.state_dict())  # new weights: nothing kept
    assert len(v._memo) == 0
    next(v.parameters()).ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    v.embed_videos(audio)
    assert len(v._memo) == 0


# ---- AVSBench-semantic: 71 class logits, clips of 10 frames, frames that do not exist ----

T10, K = 10, 71


def _avss_model(group=5, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = build_model(tiny(mask_classes=K, tpavi_frames_per_group=group, tpavi_audio_bias=False)).to(dtype)
    with torch.no_grad():  # make TPAVI matter: its output BN starts at zero
        for name, m in model.named_modules():
            if name.endswith("W_z.1"):
                torch.nn.init.normal_(m.weight)
                torch.nn.init.normal_(m.bias)
    return model


def _avss_inputs(dtype=torch.float64, seed=0):
    """Clip 0: a 10-second v2 clip; clip 1: a 5-second clip padded with zeros to 10 frames."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(B, T10, 3, S, S, generator=g, dtype=dtype)
    audio = torch.randn(B, T10, 128, generator=g, dtype=dtype)
    exists = torch.ones(B, T10, dtype=torch.bool)
    exists[1, 5:] = False
    frames[1, 5:] = 0
    return frames, audio, exists


def test_avss_output_contract_and_padded_frames_are_zero():
    model = _avss_model().float()
    frames, audio, exists = _avss_inputs(torch.float32)
    out = model(frames, audio, frame_exists=exists)
    assert out["logits"].shape == (B * T10, K, S, S)
    gone = ~exists.reshape(-1)
    assert torch.count_nonzero(out["logits"][gone]) == 0 and torch.count_nonzero(out["logits"][~gone]) > 0
    assert torch.count_nonzero(out["audio_embed"][1, 5:]) == 0
    for _, v, a in out["avm"]:
        assert torch.count_nonzero(v[gone]) == 0 and a.shape == (B, T10, 16)
        assert torch.count_nonzero(a[1, 5:]) == 0  # no bias in the audio projection (the AVSS reference)
    assert model.avs.output_conv[4].out_channels == K
    with pytest.raises(ValueError, match="frame_exists"):
        model(frames, audio, frame_exists=exists[:, :5])


@pytest.mark.parametrize("train", [True, False])
def test_avss_forward_equals_the_reference_placement(train):
    """Our AVSModel with frame_exists and TPAVI in fives is the AVSS reference's Pred_endecoder
    (tests/avss_reference.py: its forward and TPAVI transcribed): the logits, the TPAVI audio and
    the stage maps its AVM loss reads, on a batch with a padded clip, train and eval mode."""
    import copy

    from avss_reference import RefTPAVIModule, ref_pred_endecoder

    model = _avss_model().train(train)
    frames, audio, exists = _avss_inputs()
    blocks = {}
    for i in model.avs.tpavi_stages:
        ours = getattr(model.avs, f"tpavi_b{i + 1}")
        blocks[i] = RefTPAVIModule(ours.channels).double()
        blocks[i].load_state_dict(ours.state_dict())
        blocks[i].train(train)
    ref_avs = copy.deepcopy(model.avs)  # the encoder's and TPAVI's BN statistics move in train mode
    out = model(frames, audio, frame_exists=exists)
    flag = exists.reshape(-1).double()
    x = frames.reshape(B * T10, 3, S, S)
    # train.py of the reference zeroes the padded seconds' audio features before the model
    pred, maps, a_list = ref_pred_endecoder(ref_avs, blocks, x, audio.reshape(-1, 128) * flag[:, None], flag)
    diff = (out["logits"] - pred).abs().max().item()
    assert diff < 1e-10, diff
    for s, v, a in out["avm"]:
        assert (v - maps[s]).abs().max().item() < 1e-10  # the reference's maps, relu'd in place by its decoder
        assert (a - a_list[s].reshape(B, T10, -1)).abs().max().item() < 1e-12


@pytest.mark.parametrize("group", [0, 5])
def test_a_padded_clip_predicts_as_the_clip_alone(group):
    """Eval mode: a 5-frame clip padded to 10 frames (frame_exists false on the padding, whatever
    the padding holds) gives its 5 frames the logits of the 5-frame clip run alone."""
    model = _avss_model(group).eval()
    frames, audio, _ = _avss_inputs()
    five = model(frames[:, :5], audio[:, :5])["logits"].reshape(B, 5, K, S, S)
    exists = torch.zeros(B, T10, dtype=torch.bool)
    exists[:, :5] = True
    padded = model(frames, audio, frame_exists=exists)["logits"].reshape(B, T10, K, S, S)
    assert (padded[:, :5] - five).abs().max().item() < 1e-10
    assert torch.count_nonzero(padded[:, 5:]) == 0
