"""PVT-v2 feature encoder from timm, with timm's parameter names (avsbench-format.md §3).

Built from timm's own constructors (pretrained=False, num_classes=0: no download, no
classifier) so that a timm PVT-v2 state dict loads key for key; only `patch_embed` and
`stages` are kept, because no part of avs-dist uses the classifier (unused parameters would
also break DDP without find_unused_parameters).

The four stage outputs, each after its stage's final LayerNorm, are returned as
[N, C, H, W] maps at strides 4, 8, 16, 32: for pvt_v2_b5 at 224 px, 64@56, 128@28, 320@14,
512@7. Stochastic depth rises linearly from 0 to `drop_path` over all blocks, as in the
PVT release and the AVSBench reference (0.1); it draws from torch's RNG, which the trainer
seeds per rank and saves in checkpoints.
"""
from __future__ import annotations

import torch
import torch.nn as nn

# Per variant (Wang et al., PVT v2, Table 1; timm's pvt_v2_b*): blocks per stage and widths.
ARCHS = {
    "pvt_v2_b0": {"depths": (2, 2, 2, 2), "embed_dims": (32, 64, 160, 256)},
    "pvt_v2_b1": {"depths": (2, 2, 2, 2), "embed_dims": (64, 128, 320, 512)},
    "pvt_v2_b2": {"depths": (3, 4, 6, 3), "embed_dims": (64, 128, 320, 512)},
    "pvt_v2_b3": {"depths": (3, 4, 18, 3), "embed_dims": (64, 128, 320, 512)},
    "pvt_v2_b4": {"depths": (3, 8, 27, 3), "embed_dims": (64, 128, 320, 512)},
    "pvt_v2_b5": {"depths": (3, 6, 40, 3), "embed_dims": (64, 128, 320, 512)},
}

# keys of timm's PVT-v2 and of the PVT release's files that this encoder does not have
HEAD_PREFIX = "head."


def _timm_pvt_v2():
    try:
        import timm.models.pvt_v2 as pvt_v2
    except ImportError as e:  # a dependency in pyproject.toml, but say what is missing
        raise ImportError(f"the PVT-v2 backbones need timm (pip install 'timm>=0.9'): {e}") from None
    return pvt_v2


def release_to_timm(state_dict: dict) -> dict:
    """PVT release key layout (patch_embed1, block1.0, norm1, mlp.dwconv.dwconv) -> timm's
    (patch_embed, stages.0.blocks.0, stages.0.norm, mlp.dwconv), by timm's own converter.
    A state dict already in timm's layout comes back unchanged."""
    pvt_v2 = _timm_pvt_v2()
    # renamed from _checkpoint_filter_fn in timm 1.0
    convert = getattr(pvt_v2, "checkpoint_filter_fn", None) or getattr(pvt_v2, "_checkpoint_filter_fn")
    return convert(state_dict, None)


class PVTEncoder(nn.Module):
    """patch_embed and stages of timm's PVT-v2; forward returns the four stage outputs."""

    def __init__(self, name: str = "pvt_v2_b5", drop_path: float = 0.1):
        super().__init__()
        if name not in ARCHS:
            raise ValueError(f"PVT-v2 variant must be one of {sorted(ARCHS)}, got {name!r}")
        net = getattr(_timm_pvt_v2(), name)(pretrained=False, num_classes=0, drop_path_rate=drop_path)
        self.name = name
        self.channels = ARCHS[name]["embed_dims"]
        self.patch_embed, self.stages = net.patch_embed, net.stages

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [N, 3, H, W] -> four maps [N, C_i, H / 2^(i+2), W / 2^(i+2)] (sides rounded up)."""
        x = self.patch_embed(x)  # [N, H/4, W/4, C0]: stage 0 takes it without a downsample
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs
