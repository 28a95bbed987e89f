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
