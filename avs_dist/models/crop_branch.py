"""The seed's crop branch: a second ResNet on the sounding-object crops: the 5 packed crops of
each S4 video, or on AVSBench-semantic one crop per labelled object and frame (cut from the
frames by models/system.py, avss/objects.py).

ResNet (conv1..layer4, torchvision names) -> global average pool -> fc1 (feat -> crop_hidden)
-> [ReLU] -> fc2 (crop_hidden -> num_classes). cfg.crop_relu places the ReLU: "between" the
linears (default, the sane reading), "end" after fc2 (what the seed wrote), or "none".

The crop embedding is fc1's output (before any ReLU), used by the pairwise loss. For the
crop-audio cosine, two learned linears bring the crop embedding and a VGGish embedding to one
space of PROJ_DIM = 128 dimensions: crop_proj [B*5, D] and audio_proj [B, D] of the video's mean
embedding (S4: one object sounds through the video), or on AVSS crop_proj [N, D] and
audio_proj [N, D] of each object's own frame (second) of audio (losses.py crop_audio_loss_objects
says why).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..avss.objects import ObjectBoxes
from .resnet import ResNetEncoder
from .vggish import EMBED_DIM

PROJ_DIM = 128


class CropBranch(nn.Module):
    # output -> the submodules whose parameters it depends on (losses.unreached_parameters)
    OUTPUT_PARAMS = {"crop_logits": ("resnet", "fc1", "fc2"), "crop_embed": ("resnet", "fc1"),
                     "crop_proj": ("resnet", "fc1", "crop_proj"), "audio_proj": ("audio_proj",)}

    def __init__(self, depth: int = 50, hidden: int = 512, num_classes: int = 23, relu: str = "between"):
        super().__init__()
        if relu not in ("between", "end", "none"):
            raise ValueError(f"crop_relu must be 'between', 'end' or 'none', got {relu!r}")
        self.relu_at = relu
        self.resnet = ResNetEncoder(depth)
        self.fc1 = nn.Linear(self.resnet.channels[-1], hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.crop_proj = nn.Linear(hidden, PROJ_DIM)
        self.audio_proj = nn.Linear(EMBED_DIM, PROJ_DIM)

    def forward(self, crops: torch.Tensor, audio_embed: torch.Tensor | None, channels_last: bool = False,
                objects: ObjectBoxes | None = None) -> dict:
        """crops [B, T, 3, c, c] (packed, S4), or [N, 3, c, c] with `objects` (their N clips and
        frames, AVSS; N may be 0: the outputs are then empty [0, ...] tensors that still depend
        on every parameter, so a sum over them backpropagates zeros to all of them); audio_embed
        [B, T, 128] or None. -> crop_logits [B*T | N, num_classes], crop_embed [., hidden],
        crop_proj [., PROJ_DIM], audio_proj [B, PROJ_DIM] (clip mean) or with objects [N,
        PROJ_DIM] (the object's frame), or None without audio. ValueError on other shapes."""
        if objects is None and (crops.dim() != 5 or crops.shape[2] != 3):
            raise ValueError(f"crops must be [B, T, 3, c, c], got {tuple(crops.shape)}")
        if objects is not None and (crops.dim() != 4 or crops.shape[1] != 3 or crops.shape[0] != len(objects)):
            raise ValueError(f"object crops must be [N={len(objects)}, 3, c, c], got {tuple(crops.shape)}")
        x = crops.reshape(-1, *crops.shape[-3:])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feat = self.resnet(x)[-1].mean(dim=(2, 3))  # global average pool
        embed = self.fc1(feat)
        logits = self.fc2(F.relu(embed) if self.relu_at == "between" else embed)
        if self.relu_at == "end":
            logits = F.relu(logits)
        if audio_embed is None:
            audio_proj = None
        elif objects is None:
            audio_proj = self.audio_proj(audio_embed.mean(dim=1))
        else:
            dev = audio_embed.device
            audio_proj = self.audio_proj(audio_embed[objects.clip.to(dev), objects.frame.to(dev)])
        return {"crop_logits": logits, "crop_embed": embed, "crop_proj": self.crop_proj(embed),
                "audio_proj": audio_proj}

