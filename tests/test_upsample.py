"""The matmul upsample computes the same map as F.interpolate (float64), in both layouts."""
import pytest
import torch
import torch.nn.functional as F

from avs_dist.config import ModelConfig
from avs_dist.models import build_model
from avs_dist.models.avsmodel import upsample2x


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("hw", [(7, 7), (5, 9), (1, 4)])
def test_matmul_upsample_equals_interpolate(align_corners, channels_last, hw):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, *hw, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    ref = F.interpolate(x1, scale_factor=2, mode="bilinear", align_corners=align_corners)
    out = upsample2x(x2, align_corners, impl="matmul")
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (ref * w).sum().backward()
    (out * w).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-12, atol=1e-12)


def test_model_outputs_equal_with_either_upsample():
    cfg = ModelConfig(backbone="resnet18", decoder_channels=16, crop_branch=False, audio_input="embedding")
    torch.manual_seed(0)
    a = build_model(cfg, load_weights=False).double().eval()
    b = build_model(ModelConfig(**{**cfg.__dict__, "upsample": "matmul"}), load_weights=False).double().eval()
    b.load_state_dict(a.state_dict())
    frames = torch.randn(1, 5, 3, 64, 64, dtype=torch.float64)
    audio = torch.randn(1, 5, 128, dtype=torch.float64)
    torch.testing.assert_close(b(frames, audio)["logits"], a(frames, audio)["logits"], rtol=1e-10, atol=1e-12)
