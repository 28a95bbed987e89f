"""TPAVI: temporal pixel-wise audio-visual interaction (avsbench-format.md §3).

One module, one set of parameters (named as in the AVSBench reference: g, theta, phi,
W_z = conv + BatchNorm3d, align_channel, norm_layer), two forward paths:

- "reference": the published quadratic form. f = theta^T phi / N is a [THW, THW] matrix per
  video (15680^2 at stage 0 for 224 px input); y = f g^T. Kept as the test oracle.
- "factorized" (default): f has rank <= C', so y = theta^T (phi g^T) / N with the [C', C']
  matrix M = phi g^T. In 'dot' mode phi is constant over H, W within a frame, so
  M = sum_t P_t G_t^T with P = phi(a') [T, C'] and G_t the sum of g over frame t's pixels,
  and G_t = W_g (sum of x over the frame) + HW b_g needs no full-resolution g at all.
  W_z's 1x1 conv is folded into the same per-video matrix (K = M W_z^T / N, [C', C]).
  Exact in real arithmetic; cost O(THW C^2) instead of O((THW)^2 C).

Both take and return frames as a batch [B*T, C, H, W] (channels_last friendly; the output
keeps the input's dtype, so under bf16 autocast the fp32 LayerNorm result does not promote
the whole decoder to fp32) and return
the projected audio a' = align_channel(audio) [B, T, C] for the AVM loss ('dot' mode) or None.

Which frames attend to which (AVSBench-semantic's clips of 5 or 10 frames, avsbench-format.md
"AVSBench-semantic"):
- `frames_per_group` = 0: a clip's T frames attend to each other (S4 / MS3: T = 5).
- `frames_per_group` = g > 0: the clip is cut into consecutive groups of g frames, each
  attended on its own, BatchNorm over all groups together: the AVSS reference's TPAVI, whose
  `pre_reshape_for_tpavi` reshapes [B*T, ...] to [B*T/5, C, 5, H, W], so a 10-frame clip is
  two 5-frame halves. Exactly its computation, padded frames included (they are zeros
  there, and a 5-frame clip's second half is all padding).
- `frame_exists` [B, T] (whole-clip mode only): frames that do not exist are left out of
  the attention: they add nothing to the sums over frames, and N counts the existing frames'
  pixels only. Their own outputs are still computed (the caller zeroes them); they do enter
  the BatchNorm's batch statistics in training, as in the reference.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

AUDIO_DIM = 128


def _w2d(conv: nn.Conv3d) -> torch.Tensor:
    """A 1x1x1 Conv3d weight [out, in, 1, 1, 1] as a 1x1 Conv2d weight [out, in, 1, 1]."""
    return conv.weight.reshape(conv.weight.shape[0], conv.weight.shape[1], 1, 1)


def _wlin(conv: nn.Conv3d) -> torch.Tensor:
    """A 1x1x1 Conv3d weight as a Linear weight [out, in]."""
    return conv.weight.reshape(conv.weight.shape[0], conv.weight.shape[1])


def _tokens(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[B*T, C, H, W] -> [B, T*H*W, C] (tokens in (t, h, w) order, free for channels_last)."""
    return x.permute(0, 2, 3, 1).reshape(batch, -1, x.shape[1])


class TPAVI(nn.Module):
    """audio_bias: align_channel has a bias (AVSBench's S4 / MS3 TPAVI) or none (its AVSS
    TPAVI, so that the zeroed audio of padded seconds projects to a' = 0)."""

    def __init__(self, channels: int, mode: str = "dot", impl: str = "factorized", frames_per_group: int = 0,
                 audio_bias: bool = True):
        super().__init__()
        if mode not in ("dot", "self"):
            raise ValueError(f"TPAVI mode must be 'dot' or 'self', got {mode!r}")
        if impl not in ("factorized", "reference"):
            raise ValueError(f"TPAVI impl must be 'factorized' or 'reference', got {impl!r}")
        if frames_per_group < 0:
            raise ValueError(f"TPAVI frames_per_group must be >= 0 (0: the whole clip), got {frames_per_group}")
        self.mode, self.impl = mode, impl
        self.frames_per_group = frames_per_group
        self.channels = channels
        self.inter_channels = max(channels // 2, 1)
        ci = self.inter_channels
        # 'self' mode has no audio, so no align_channel (it would be an unused parameter).
        if mode == "dot":
            self.align_channel = nn.Linear(AUDIO_DIM, channels, bias=audio_bias)
        self.norm_layer = nn.LayerNorm(channels)
        self.g = nn.Conv3d(channels, ci, kernel_size=1)
        self.theta = nn.Conv3d(channels, ci, kernel_size=1)
        self.phi = nn.Conv3d(channels, ci, kernel_size=1)
        self.W_z = nn.Sequential(nn.Conv3d(ci, channels, kernel_size=1), nn.BatchNorm3d(channels))
        # The block starts as an identity map plus LayerNorm, as in the reference.
        nn.init.zeros_(self.W_z[1].weight)
        nn.init.zeros_(self.W_z[1].bias)

    def forward(self, x: torch.Tensor, audio: torch.Tensor | None, frames: int,
                frame_exists: torch.Tensor | None = None):
        """x [B*T, C, H, W], audio [B, T, 128] ('dot') or None ('self'), frame_exists bool
        [B, T] or None (every frame exists) -> (z [B*T, C, H, W], a' [B, T, C] or None).

        ValueError when B*T is not a multiple of `frames`, or T of frames_per_group."""
        if x.shape[0] % frames:
            raise ValueError(f"TPAVI: batch {x.shape[0]} is not a multiple of {frames} frames")
        if self.mode == "dot":
            if audio is None:
                raise ValueError("TPAVI in 'dot' mode needs audio features [B, T, 128]")
            a = self.align_channel(audio)  # [B, T, C]
        else:
            a = None
        group = self.frames_per_group or frames
        if frames % group:
            raise ValueError(f"TPAVI: clips of {frames} frames do not split into groups of {group} "
                             "(model.tpavi_frames_per_group)")
        if group != frames:
            # The reference's grouping: each run of `group` frames is a clip of its own.
            frame_exists = None
            a_grouped = None if a is None else a.reshape(-1, group, a.shape[-1])
        else:
            a_grouped = a
        exists = None
        if frame_exists is not None:
            if tuple(frame_exists.shape) != (x.shape[0] // frames, frames):
                raise ValueError(f"TPAVI: frame_exists {tuple(frame_exists.shape)} is not "
                                 f"[B, T] = {(x.shape[0] // frames, frames)}")
            exists = frame_exists.reshape(-1)
        if self.impl == "reference":
            return self._reference(x, a_grouped, group, exists), a
        return self._factorized(x, a_grouped, group, exists), a

    def _batch_norm(self, y: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
        """BatchNorm3d over the [B, C, T, H, W] view of a [B*T, C, H, W] map (no copy)."""
        y5 = y.unflatten(0, (batch, frames)).transpose(1, 2)
        return self.W_z[1](y5).transpose(1, 2).flatten(0, 1)

    @staticmethod
    def _positions(exists: torch.Tensor | None, b: int, frames: int, h: int, w: int):
        """N of f / N per clip: T*H*W, or the existing frames' pixels ([B, 1, 1], at least 1)."""
        if exists is None:
            return frames * h * w
        return (exists.reshape(b, frames).sum(dim=1).clamp_min(1) * (h * w))[:, None, None]

    def _factorized(self, x: torch.Tensor, a: torch.Tensor | None, frames: int,
                    exists: torch.Tensor | None = None) -> torch.Tensor:
        bt, c, h, w = x.shape
        b = bt // frames
        n = self._positions(exists, b, frames, h, w)
        theta = _tokens(F.conv2d(x, _w2d(self.theta), self.theta.bias), b)  # [B, THW, C']
        if a is not None:
            p = F.linear(a, _wlin(self.phi), self.phi.bias)  # [B, T, C']
            g_sum = F.linear(x.sum(dim=(2, 3)), _wlin(self.g)) + (h * w) * self.g.bias  # [B*T, C']
            if exists is not None:  # a frame that does not exist adds nothing to the sum over frames
                g_sum = g_sum * exists[:, None].to(g_sum.dtype)
            m = p.transpose(1, 2) @ g_sum.reshape(b, frames, -1)  # [B, C', C']
        else:
            phi = _tokens(F.conv2d(x, _w2d(self.phi), self.phi.bias), b)
            g = F.conv2d(x, _w2d(self.g), self.g.bias)
            if exists is not None:
                g = g * exists[:, None, None, None].to(g.dtype)
            m = phi.transpose(1, 2) @ _tokens(g, b)
        k = (m @ _wlin(self.W_z[0]).t()) / n  # [B, C', C]
        wy = torch.baddbmm(self.W_z[0].bias.to(k.dtype).expand(b, 1, c), theta, k)  # [B, THW, C]
        wy = wy.reshape(bt, h, w, c).permute(0, 3, 1, 2)  # [B*T, C, H, W], channels_last strides
        z = self._batch_norm(wy, b, frames) + x
        return self.norm_layer(z.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).to(x.dtype)

    def _reference(self, x: torch.Tensor, a: torch.Tensor | None, frames: int,
                   exists: torch.Tensor | None = None) -> torch.Tensor:
        bt, c, h, w = x.shape
        b = bt // frames
        ci = self.inter_channels
        x5 = x.reshape(b, frames, c, h, w).permute(0, 2, 1, 3, 4)  # [B, C, T, H, W]
        src = x5 if a is None else a.transpose(1, 2)[..., None, None].expand(b, c, frames, h, w)
        g = self.g(x5)  # [B, C', T, H, W]
        if exists is not None:  # the rows of f g^T's sum that belong to frames that do not exist
            g = g * exists.reshape(b, 1, frames, 1, 1).to(g.dtype)
        g = g.reshape(b, ci, -1).transpose(1, 2)  # [B, THW, C']
        theta = self.theta(x5).reshape(b, ci, -1).transpose(1, 2)  # [B, THW, C']
        phi = self.phi(src).reshape(b, ci, -1)  # [B, C', THW]
        f = theta @ phi
        f = f / (f.shape[-1] if exists is None else self._positions(exists, b, frames, h, w))  # [B, THW, THW]
        y = (f @ g).transpose(1, 2).reshape(b, ci, frames, h, w)
        z = self.W_z(y) + x5
        z = self.norm_layer(z.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)  # [B, C, T, H, W]
        return z.transpose(1, 2).reshape(bt, c, h, w).to(x.dtype)
