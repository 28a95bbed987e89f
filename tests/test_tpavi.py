"""TPAVI: the factorized forward equals the quadratic reference (values and gradients)."""
import copy

import pytest
import torch

from avs_dist.models.tpavi import TPAVI

B, T, C, H, W = 2, 5, 8, 3, 4


def _randomize(m: TPAVI, seed: int = 0) -> TPAVI:
    """Random values for every parameter and BN buffer, BN weight included: at the default
    zero init the attention path would not reach the output and could not be compared."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        bn = m.W_z[1]
        bn.running_mean.copy_(torch.randn(C, generator=g, dtype=bn.running_mean.dtype))
        bn.running_var.copy_(torch.rand(C, generator=g, dtype=bn.running_var.dtype) + 0.5)
    return m


def _inputs(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B * T, C, H, W, generator=g, dtype=dtype)
    a = torch.randn(B, T, 128, generator=g, dtype=dtype)
    return x, a


def _pair(mode, dtype=torch.float64):
    fac = _randomize(TPAVI(C, mode=mode, impl="factorized")).to(dtype)
    ref = copy.deepcopy(fac)
    ref.impl = "reference"
    return fac, ref


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("mode", ["dot", "self"])
@pytest.mark.parametrize("train", [True, False])
def test_factorized_equals_reference_float64(mode, train):
    fac, ref = _pair(mode)
    fac.train(train), ref.train(train)
    x, a = _inputs(torch.float64)
    audio = a if mode == "dot" else None
    zf, af = fac(x, audio, T)
    zr, ar = ref(x, audio, T)
    assert zf.shape == (B * T, C, H, W)
    assert _rel(zf, zr) < 1e-10
    if mode == "dot":
        assert af.shape == (B, T, C) and torch.equal(af, ar)
    else:
        assert af is None and ar is None and not hasattr(fac, "align_channel")
    if train:  # both updated the BN running statistics identically
        assert _rel(fac.W_z[1].running_mean, ref.W_z[1].running_mean) < 1e-10


@pytest.mark.parametrize("mode", ["dot", "self"])
def test_gradients_match(mode):
    fac, ref = _pair(mode)
    x, a = _inputs(torch.float64)
    w = torch.randn(B * T, C, H, W, dtype=torch.float64)
    grads = []
    for m in (fac, ref):
        xi, ai = x.clone().requires_grad_(), a.clone().requires_grad_()
        z, ap = m(xi, ai if mode == "dot" else None, T)
        loss = (z * w).sum() + (ap.square().sum() if ap is not None else 0)
        loss.backward()
        grads.append([xi.grad] + ([ai.grad] if mode == "dot" else []) + [p.grad for p in m.parameters()])
    for gf, gr in zip(*grads):
        # Some gradients are exactly zero in real arithmetic (W_z's conv bias, removed by the
        # train-mode BN): compare those absolutely.
        torch.testing.assert_close(gf, gr, rtol=1e-9, atol=1e-12)


def test_channels_last_input_same_result():
    fac, ref = _pair("dot")
    x, a = _inputs(torch.float64)
    z1, _ = fac(x, a, T)
    z2, _ = fac(x.contiguous(memory_format=torch.channels_last), a, T)
    assert _rel(z2, z1) < 1e-12


@pytest.mark.parametrize("mode", ["dot", "self"])
def test_bf16_autocast_within_rounding(mode):
    fac64, _ = _pair(mode)
    x64, a64 = _inputs(torch.float64)
    oracle, _ = fac64(x64, a64 if mode == "dot" else None, T)
    fac, ref = _pair(mode, dtype=torch.float32)
    x, a = x64.float(), a64.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zf, _ = fac(x, a if mode == "dot" else None, T)
        zr, _ = ref(x, a if mode == "dot" else None, T)
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2%); a few roundings compound (measured ~2e-3).
    assert _rel(zf.double(), oracle) < 1e-2
    assert _rel(zr.double(), oracle) < 1e-2
    assert _rel(zf.double(), zr.double()) < 1e-2


def test_identity_plus_layernorm_at_init():
    m = TPAVI(C)  # default init: BN weight and bias zero
    x, a = _inputs(torch.float32)
    z, _ = m(x, a, T)
    expected = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (C,)).permute(0, 3, 1, 2)
    torch.testing.assert_close(z, expected)
    assert torch.count_nonzero(m.W_z[1].weight) == 0 and torch.count_nonzero(m.W_z[1].bias) == 0


def test_bad_inputs():
    m = TPAVI(C)
    x, a = _inputs(torch.float32)
    with pytest.raises(ValueError, match="needs audio"):
        m(x, None, T)
    with pytest.raises(ValueError, match="multiple of 5"):
        m(x[:7], a, T)


# ---- AVSBench-semantic: clips of 10 frames, the reference's grouping in fives, padded frames ----

from avss_reference import RefTPAVIModule, ref_tpavi_va  # noqa: E402

T10 = 10


def _avss_pair(impl, dtype=torch.float64, seed=0):
    ours = _randomize(TPAVI(C, mode="dot", impl=impl, frames_per_group=5, audio_bias=False), seed).to(dtype)
    ref = RefTPAVIModule(C).to(dtype)
    ref.load_state_dict(ours.state_dict())  # strict: the same parameter names and shapes
    return ours, ref


@pytest.mark.parametrize("impl", ["factorized", "reference"])
@pytest.mark.parametrize("train", [True, False])
def test_grouped_in_fives_equals_avss_reference_on_10_frames(impl, train):
    ours, ref = _avss_pair(impl)
    ours.train(train), ref.train(train)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B * T10, C, H, W, generator=g, dtype=torch.float64)
    a = torch.randn(B, T10, 128, generator=g, dtype=torch.float64)
    a[1, 5:] = 0  # a 5-second clip: its padded seconds' audio is zero, as the reference feeds it
    x[5 + T10: 2 * T10] = 0
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    z, ap = ours(xo, a, T10)
    zr, apr = ref_tpavi_va(ref, xr, a.reshape(-1, 128))
    assert z.shape == (B * T10, C, H, W) and ap.shape == (B, T10, C)
    diff = (z - zr).abs().max().item()
    assert diff < 1e-12, diff
    assert torch.equal(ap, apr.reshape(B, T10, C))
    if train:
        assert (ours.W_z[1].running_mean - ref.W_z[1].running_mean).abs().max() < 1e-12
    w = torch.randn(z.shape, generator=g, dtype=torch.float64)
    (z * w).sum().backward()
    (zr * w).sum().backward()
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-9, atol=1e-12)
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-9, atol=1e-12, msg=name)


def test_grouping_of_a_5_frame_clip_is_the_whole_clip():
    whole, _ = _pair("dot")
    grouped = copy.deepcopy(whole)
    grouped.frames_per_group = 5
    x, a = _inputs(torch.float64)
    assert torch.equal(whole(x, a, T)[0], grouped(x, a, T)[0])
    grouped.frames_per_group = 4
    with pytest.raises(ValueError, match="groups of 4"):
        grouped(x, a, T)


@pytest.mark.parametrize("mode", ["dot", "self"])
@pytest.mark.parametrize("impl", ["factorized", "reference"])
def test_frames_that_do_not_exist_are_left_out_of_the_whole_clip(mode, impl):
    """A 5-second clip padded to 10 frames, frame_exists false on the padding: its 5 frames come
    out as from the 5-frame clip alone (eval mode: BN's running statistics), whatever the padding holds."""
    m, _ = _pair(mode)
    m.impl = impl
    m.eval()
    x, a = _inputs(torch.float64)  # B clips of 5 frames
    c = x.shape[1]
    pad_x = torch.randn(B, T10 - T, c, H, W, dtype=torch.float64)  # garbage, to show it is ignored
    x10 = torch.cat([x.reshape(B, T, c, H, W), pad_x], dim=1).reshape(B * T10, c, H, W)
    a10 = torch.cat([a, torch.randn(B, T10 - T, 128, dtype=torch.float64)], dim=1)
    exists = torch.zeros(B, T10, dtype=torch.bool)
    exists[:, :T] = True
    audio5, audio10 = (a, a10) if mode == "dot" else (None, None)
    z5, _ = m(x, audio5, T)
    z10, _ = m(x10, audio10, T10, exists)
    kept = z10.reshape(B, T10, c, H, W)[:, :T].reshape(B * T, c, H, W)
    assert (kept - z5).abs().max().item() < 1e-12
    # without the flags the padding does enter the attention
    z10_all, _ = m(x10, audio10, T10)
    assert (z10_all.reshape(B, T10, c, H, W)[:, :T].reshape(B * T, c, H, W) - z5).abs().max() > 1e-3
    with pytest.raises(ValueError, match="frame_exists"):
        m(x10, audio10, T10, exists[:, :T])


def test_audio_bias_switch():
    assert TPAVI(C).align_channel.bias is not None
    assert TPAVI(C, audio_bias=False).align_channel.bias is None
    with pytest.raises(ValueError, match="frames_per_group"):
        TPAVI(C, frames_per_group=-1)
