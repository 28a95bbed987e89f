"""ResNet-18/34/50 feature encoder with torchvision's parameter names.

Built from torchvision's own constructors (weights=None) so that a torchvision ResNet state
dict loads key for key; only `avgpool` and `fc` are dropped because no part of avs-dist uses
them (unused parameters would also break DDP without find_unused_parameters).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

_CONSTRUCTORS = {
    18: torchvision.models.resnet18,
    34: torchvision.models.resnet34,
    50: torchvision.models.resnet50,
}
STAGE_CHANNELS = {18: (64, 128, 256, 512), 34: (64, 128, 256, 512), 50: (256, 512, 1024, 2048)}

# torchvision ResNet keys that this encoder does not have (classifier head).
TORCHVISION_HEAD_KEYS = ("fc.weight", "fc.bias")


class ResNetEncoder(nn.Module):
    """conv1 .. layer4 of a torchvision ResNet; forward returns the four stage outputs
    (strides 4, 8, 16, 32)."""

    def __init__(self, depth: int):
        super().__init__()
        if depth not in _CONSTRUCTORS:
            raise ValueError(f"ResNet depth must be one of {sorted(_CONSTRUCTORS)}, got {depth}")
        net = _CONSTRUCTORS[depth](weights=None)
        self.depth = depth
        self.channels = STAGE_CHANNELS[depth]
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x1 = self.layer1(x)
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        x4 = self.layer4(x3)
        return [x1, x2, x3, x4]
