"""AVSModel: ResNet or PVT-v2 encoder, ASPP heads, TPAVI, fusion decoder (avsbench-format.md §3).

Submodule names follow the AVSBench reference `Pred_endecoder` (ResNet and PVT variants) so
that its checkpoints map onto ours with few renames (models/weights.py): resnet (ResNet
encoders) or encoder_backbone (PVT-v2, timm's layout inside), conv1..conv4 (.conv2d_list),
tpavi_b1..tpavi_b4, path1..path4 (.resConfUnit1/2), output_conv.{0,2,4}. Everything after
the encoder is the same for both encoders; only the ASPP heads' input widths differ.

Two facts of the reference that the outputs depend on, reproduced here:
- Its residual conv unit applies an in-place ReLU to its input, so the residual added back
  is relu(x), not x; and because the TPAVI outputs are those inputs, the visual maps the
  reference's AVM loss sees are relu(TPAVI output). We return the same maps in `avm`.
- path4 is called with one input, so its resConfUnit1 is never used; we do not create it
  (the reference checkpoint's path4.resConfUnit1.* keys are reported as unused).

Widths: every decoder map has cfg.decoder_channels (C) channels; the output head narrows to
C/2 and C/8 (the reference's 128 and 32 at C = 256) so small presets run the same code.

Clips of T frames (S4 / MS3: 5; AVSBench-semantic: 10, the 5-second clips padded with zero
frames). The output head has `mask_classes` channels: 1 (a sigmoid logit per pixel, S4 /
MS3) or 71 (class logits, AVSS). Given `frame_exists` [B, T], the AVSS reference's
`Pred_endecoder.forward` (avs_scripts/avss/model/*_AVSModel.py) is followed: the ASPP maps,
each TPAVI output, each fusion block's output and the logits are multiplied by the flag, so a
frame that does not exist contributes zeros downstream and its logits are 0. (The encoder
still runs on the zero frames; a ResNet's BatchNorm, and TPAVI's, count them in their batch
statistics, as in the reference.)
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .pvt import PVTEncoder
from .resnet import ResNetEncoder
from .tpavi import TPAVI

DILATIONS = (3, 6, 12, 18)
STRIDE = 32  # input sides must be multiples of the encoder's total stride


class ASPPHead(nn.Module):
    """Sum of four dilated 3x3 convs (the reference's Classifier_Module)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=d, dilation=d, bias=True)
            for d in DILATIONS
        )
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:]:
            out = out + conv(x)
        return out


class ResidualConvUnit(nn.Module):
    """relu -> conv3x3 -> relu -> conv3x3, plus relu(x) (see the module docstring)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = F.relu(x)
        return self.conv2(F.relu(self.conv1(r))) + r


@functools.lru_cache(maxsize=64)
def bilinear_matrix(n_in: int, n_out: int, align_corners: bool, device=None, dtype=None) -> torch.Tensor:
    """[n_out, n_in] weights of 1-D bilinear resampling with F.interpolate's source coordinates.
    Cached: a forward asks for the same few matrices every time (no rebuild, no host-to-device
    copy per call); callers must not modify the result."""
    dst = torch.arange(n_out, dtype=torch.float64)
    if align_corners:
        src = dst * ((n_in - 1) / (n_out - 1)) if n_out > 1 else torch.zeros_like(dst)
    else:
        src = ((dst + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = src - i0
    a = torch.zeros(n_out, n_in, dtype=torch.float64)
    a.index_put_((torch.arange(n_out), i0), 1 - w1, accumulate=True)
    a.index_put_((torch.arange(n_out), i1), w1, accumulate=True)
    return a.to(device=device, dtype=dtype)


def upsample2x(x: torch.Tensor, align_corners: bool, impl: str = "interpolate") -> torch.Tensor:
    """2x bilinear upsampling. impl="matmul" computes the same map as two small matrix products
    (rows, then columns), whose backward is again matrix products: the native NHWC upsample's
    backward scatters with atomics, one of the largest items of the GPU profile (perf notes)."""
    if impl == "interpolate":
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=align_corners)
    n, c, h, w = x.shape
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    a_h = bilinear_matrix(h, 2 * h, align_corners, x.device, dtype)
    a_w = bilinear_matrix(w, 2 * w, align_corners, x.device, dtype)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        nhwc = x.permute(0, 2, 3, 1)  # a view: [N, H, W, C] contiguous
        t = torch.matmul(a_w, nhwc)  # [N, H, 2W, C]
        y = torch.matmul(a_h, t.reshape(n, h, 2 * w * c)).reshape(n, 2 * h, 2 * w, c)
        return y.permute(0, 3, 1, 2)  # channels_last strides, NCHW shape
    return torch.matmul(torch.matmul(a_h, x), a_w.t())


class FeatureFusionBlock(nn.Module):
    """(running map + RCU(skip)) -> RCU -> 2x bilinear upsample (align_corners=True)."""

    def __init__(self, channels: int, has_skip: bool = True, upsample: str = "interpolate"):
        super().__init__()
        if has_skip:
            self.resConfUnit1 = ResidualConvUnit(channels)
        self.resConfUnit2 = ResidualConvUnit(channels)
        self.upsample = upsample

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        return upsample2x(x, align_corners=True, impl=self.upsample)


class Interpolate(nn.Module):
    """Parameter-free 2x upsample kept as a module so output_conv's indices match the reference."""

    def __init__(self, align_corners: bool = False, impl: str = "interpolate"):
        super().__init__()
        self.align_corners, self.impl = align_corners, impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample2x(x, self.align_corners, self.impl)


def build_encoder(backbone: str, drop_path: float = 0.1) -> tuple[str, nn.Module]:
    """'resnet18|34|50' or 'pvt_v2_b0..b5' -> (attribute name, encoder). Both encoders return
    four maps at strides 4, 8, 16, 32 and list their widths in `.channels`. drop_path is
    PVT-v2's stochastic depth (ResNets have none)."""
    if backbone.startswith("resnet") and backbone[6:].isdigit():
        return "resnet", ResNetEncoder(int(backbone[6:]))
    if backbone.startswith("pvt_v2_"):
        return "encoder_backbone", PVTEncoder(backbone, drop_path)
    raise ValueError(f"backbone must be resnet18|34|50 or pvt_v2_b0..b5, got {backbone!r}")


def output_widths(channels: int) -> tuple[int, int]:
    """Output-head widths: C/2 and C/8 (128 and 32 at the reference's C = 256)."""
    return max(channels // 2, 1), max(channels // 8, 1)


def _keep(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """x [B*T, ...] times the frame-exists flag [B*T, 1, 1, 1] (in x's dtype: a float32 flag
    would promote a bf16 map to float32)."""
    return x if keep is None else x * keep.to(x.dtype)


class AVSModel(nn.Module):
    """mask_classes: output channels (1 for S4 / MS3, 71 for AVSS); tpavi_frames_per_group and
    tpavi_audio_bias: see models/tpavi.py (0 and True: S4 / MS3; 5 and False: the AVSS reference)."""

    def __init__(self, backbone: str = "resnet50", channels: int = 256, tpavi_stages=(0, 1, 2, 3),
                 tpavi_mode: str = "dot", tpavi_impl: str = "factorized", upsample: str = "interpolate",
                 drop_path: float = 0.1, mask_classes: int = 1, tpavi_frames_per_group: int = 0,
                 tpavi_audio_bias: bool = True):
        super().__init__()
        if mask_classes < 1:
            raise ValueError(f"mask_classes must be >= 1, got {mask_classes}")
        self.backbone = backbone
        self.tpavi_stages = sorted(tpavi_stages)
        self.tpavi_mode = tpavi_mode
        self.mask_classes = mask_classes
        self.encoder_name, encoder = build_encoder(backbone, drop_path)
        setattr(self, self.encoder_name, encoder)
        for i, in_ch in enumerate(encoder.channels):
            setattr(self, f"conv{i + 1}", ASPPHead(in_ch, channels))
        for i in self.tpavi_stages:
            setattr(self, f"tpavi_b{i + 1}", TPAVI(channels, mode=tpavi_mode, impl=tpavi_impl,
                                                   frames_per_group=tpavi_frames_per_group,
                                                   audio_bias=tpavi_audio_bias))
        self.path4 = FeatureFusionBlock(channels, has_skip=False, upsample=upsample)
        self.path3 = FeatureFusionBlock(channels, upsample=upsample)
        self.path2 = FeatureFusionBlock(channels, upsample=upsample)
        self.path1 = FeatureFusionBlock(channels, upsample=upsample)
        mid, low = output_widths(channels)
        self.output_conv = nn.Sequential(
            nn.Conv2d(channels, mid, kernel_size=3, padding=1),
            Interpolate(align_corners=False, impl=upsample),  # align_corners=False, as the reference
            nn.Conv2d(mid, low, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(low, mask_classes, kernel_size=1),
        )

    @property
    def encoder(self) -> nn.Module:
        """The image encoder: `resnet` or `encoder_backbone` (PVT-v2)."""
        return getattr(self, self.encoder_name)

    def set_tpavi_impl(self, impl: str) -> None:
        """Switch every TPAVI block between 'factorized' and 'reference' (same parameters)."""
        if impl not in ("factorized", "reference"):
            raise ValueError(f"TPAVI impl must be 'factorized' or 'reference', got {impl!r}")
        for i in self.tpavi_stages:
            getattr(self, f"tpavi_b{i + 1}").impl = impl

    def forward(self, x: torch.Tensor, audio: torch.Tensor | None, frames: int,
                frame_exists: torch.Tensor | None = None):
        """x [B*T, 3, H, W] (T = `frames`); audio [B, T, 128] or None ('self' mode);
        frame_exists bool [B, T] or None (every frame exists).

        Returns logits [B*T, mask_classes, H, W] (0 for frames that do not exist) and the AVM
        list of (stage, relu(visual) [B*T, C, h, w], a' [B, T, C]) for each TPAVI stage in
        'dot' mode. ValueError for sides that are not multiples of 32 or a wrong frame_exists.
        """
        h, w = x.shape[-2:]
        if h % STRIDE or w % STRIDE:
            raise ValueError(f"AVSModel input {h}x{w}: both sides must be multiples of {STRIDE}")
        keep = None
        if frame_exists is not None:
            if frame_exists.dim() != 2 or frame_exists.numel() != x.shape[0] or frame_exists.shape[1] != frames:
                raise ValueError(f"frame_exists must be [B, T] with B*T = {x.shape[0]} and T = {frames}, "
                                 f"got {tuple(frame_exists.shape)}")
            keep = frame_exists.reshape(-1, 1, 1, 1)
        stages = self.encoder(x)
        feats = [_keep(getattr(self, f"conv{i + 1}")(s), keep) for i, s in enumerate(stages)]
        avm = []
        for i in self.tpavi_stages:
            z, a = getattr(self, f"tpavi_b{i + 1}")(feats[i], audio, frames, frame_exists)
            feats[i] = _keep(z, keep)
            if a is not None:
                avm.append((i, F.relu(feats[i]), a))
        d = _keep(self.path4(feats[3]), keep)
        d = _keep(self.path3(d, feats[2]), keep)
        d = _keep(self.path2(d, feats[1]), keep)
        d = _keep(self.path1(d, feats[0]), keep)
        return _keep(self.output_conv(d), keep), avm
