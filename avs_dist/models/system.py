"""The whole trainable system as one nn.Module: frozen VGGish + AVSModel (+ crop branch).

The AVSModel's encoder is cfg.backbone (a ResNet or PVT-v2); the crop branch is always a
ResNet (cfg.crop_depth), as in the seed.

`build_model(cfg.model, crop_size=...)` returns it; `model(frames, audio, crops=None,
frame_exists=None, masks=None, mask_valid=None)` returns the dict that architecture.md ("Model")
specifies. On AVSS (class-index masks, model.mask_classes > 1) the crop branch's crops are not
packed: the training forward cuts one per labelled object and frame from its own frames
(avss/objects.py: object_boxes of the masks, crops_from_boxes at `crop_size`, the run's
data.crop_size, as the loader resizes S4's packed crops to it).

With cfg.channels_last, CUDA inputs are converted to channels_last here; convert the parameters
too with `to_channels_last(model)` (the trainer and `avs-dist bench model` do) so that
convolutions need no layout copies. (`model.to(memory_format=
torch.channels_last)` fails on the TPAVI's 5-d Conv3d weights.)
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..avss.objects import ObjectBoxes, crops_from_boxes, object_boxes
from ..config import DataConfig, ModelConfig
from .avsmodel import AVSModel
from .crop_branch import CropBranch
from .vggish import EMBED_DIM, VGGish


class AVSSystem(nn.Module):
    """VGGish is frozen and fully determined by the config (the `model.vggish_weights` file, or
    its seeded random init), so its 72M weights stay out of the state dict: checkpoints are
    ~290 MB smaller and load without them (see `state_dict` / the load hook below)."""

    def __init__(self, cfg: ModelConfig, crop_size: int = DataConfig.crop_size):
        super().__init__()
        self.cfg = cfg
        self.crop_size = crop_size  # side of the AVSS object crops (data.crop_size)
        self.channels_last = cfg.channels_last
        # Precomputed embeddings make VGGish (72M frozen parameters) unnecessary.
        self.vggish = VGGish() if cfg.audio_input == "logmel" else None
        self.avs = AVSModel(backbone=cfg.backbone, channels=cfg.decoder_channels, tpavi_stages=cfg.tpavi_stages,
                            tpavi_mode=cfg.tpavi_mode, tpavi_impl=cfg.tpavi_impl,
                            upsample=cfg.upsample, drop_path=cfg.drop_path, mask_classes=cfg.mask_classes,
                            tpavi_frames_per_group=cfg.tpavi_frames_per_group,
                            tpavi_audio_bias=cfg.tpavi_audio_bias)
        self.crop = (CropBranch(cfg.crop_depth, cfg.crop_hidden, cfg.num_classes, cfg.crop_relu)
                     if cfg.crop_branch else None)
        self.register_load_state_dict_post_hook(_vggish_not_missing)

    def output_params(self) -> dict[str, tuple[str, ...]]:
        """Each output of `forward` -> the parameter-name prefixes it depends on (VGGish is
        frozen). losses.unreached_parameters reads this to tell DDP whether some parameters
        get no gradient; a new output or submodule must be declared here."""
        table = {"logits": ("avs.",), "avm": ("avs.",), "audio_embed": ()}
        if self.crop is not None:
            table.update({k: tuple(f"crop.{m}." for m in mods) for k, mods in self.crop.OUTPUT_PARAMS.items()})
            table["crop_objects"] = ()  # boxes and classes from the masks: no parameter
        return table

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        sd = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in sd if k.startswith(prefix + "vggish.")]:
            del sd[key]
        return sd

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """log-mel [B, T, 1, 96, 64] (or embeddings [B, T, 128]) -> [B, T, 128]."""
        if self.vggish is None:
            if audio.dim() != 3 or audio.shape[-1] != EMBED_DIM:
                raise ValueError(f"audio_input='embedding' expects [B, T, {EMBED_DIM}], got {tuple(audio.shape)}")
            return audio
        if audio.dim() != 5 or tuple(audio.shape[2:]) != (1, 96, 64):
            raise ValueError(f"audio_input='logmel' expects [B, T, 1, 96, 64], got {tuple(audio.shape)}")
        return self.vggish.embed_videos(audio)

    def forward(self, frames: torch.Tensor, audio: torch.Tensor | None, crops: torch.Tensor | None = None,
                frame_exists: torch.Tensor | None = None, masks: torch.Tensor | None = None,
                mask_valid: torch.Tensor | None = None) -> dict:
        """frames [B, T, 3, H, W] (any T), audio [B, T, 1, 96, 64] / [B, T, 128] or None, crops
        [B, T, 3, c, c] or None, frame_exists bool [B, T] or None (every frame exists), masks
        int64 [B, T, H, W] and mask_valid bool [B, T] (the batch's; read only to cut AVSS object
        crops) -> the dict of architecture.md "Model". Frames that do not exist (AVSS clips
        padded to 10) get zero audio embeddings, as the reference zeroes them before TPAVI, and
        zero logits (models/avsmodel.py).

        The crop branch runs on `crops` when given; else, in training, with class-index masks
        (model.mask_classes > 1: AVSS), on the crops `cut_object_crops` cuts from `frames`
        (out["crop_objects"] says whose they are); evaluation without crops skips it. ValueError
        on shapes that do not fit, or a training forward of the crop branch with neither."""
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"frames must be [B, T, 3, H, W], got {tuple(frames.shape)}")
        b, t = frames.shape[:2]
        if frame_exists is not None and tuple(frame_exists.shape) != (b, t):
            raise ValueError(f"frame_exists must be [B, T] = {(b, t)}, got {tuple(frame_exists.shape)}")
        cl = self.channels_last and frames.is_cuda
        x = frames.reshape(b * t, *frames.shape[2:])
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        if audio is None and (self.cfg.tpavi_mode == "dot" and self.cfg.tpavi_stages):
            raise ValueError("audio is required: TPAVI runs in 'dot' (audio-visual) mode")
        audio_embed = None if audio is None else self.embed_audio(audio)
        if audio_embed is not None and audio_embed.shape[:2] != (b, t):
            raise ValueError(f"audio has {tuple(audio_embed.shape[:2])} (videos, frames); frames have {(b, t)}")
        if audio_embed is not None and frame_exists is not None:
            audio_embed = audio_embed * frame_exists[..., None].to(audio_embed.dtype)
        tpavi_audio = audio_embed if self.cfg.tpavi_mode == "dot" else None
        logits, avm = self.avs(x, tpavi_audio, t, frame_exists)
        out = {"logits": logits, "audio_embed": audio_embed, "avm": avm, "crop_logits": None, "crop_embed": None,
               "crop_proj": None, "audio_proj": None, "crop_objects": None}
        # Evaluation without crops skips the branch: it feeds training losses, never the masks.
        if self.crop is not None and (crops is not None or self.training):
            objects = None
            if crops is None:
                if masks is None or self.cfg.mask_classes == 1:
                    raise ValueError("the crop branch is on (model.crop_branch=true) but no crops were given "
                                     "(packed crops, or AVSS class masks to cut them from)")
                objects, crops = self.cut_object_crops(frames, masks, mask_valid)
            out.update(self.crop(crops, audio_embed, channels_last=cl, objects=objects), crop_objects=objects)
        return out

    def cut_object_crops(self, frames: torch.Tensor, masks: torch.Tensor,
                         mask_valid: torch.Tensor | None) -> tuple[ObjectBoxes, torch.Tensor]:
        """frames [B, T, 3, H, W], masks int64 [B, T, H, W] class indices < model.mask_classes,
        mask_valid bool [B, T] -> (the N objects: one per labelled frame and class > 0 present,
        ordered by clip, frame, class; their crops [N, 3, crop_size, crop_size] in frames'
        dtype, no gradient to the frames). Two host synchronisations (object_boxes: the class range, the objects' count).
        ValueError when the masks do not cover the frames' pixels."""
        if masks.shape != (*frames.shape[:2], *frames.shape[-2:]) or mask_valid is None:
            raise ValueError(f"AVSS object crops need masks [B, T, H, W] = {(*frames.shape[:2], *frames.shape[-2:])} "
                             f"and mask_valid [B, T], got {tuple(masks.shape)} and "
                             f"{None if mask_valid is None else tuple(mask_valid.shape)}")
        with torch.no_grad():
            objects = object_boxes(masks, mask_valid, self.cfg.mask_classes)
            return objects, crops_from_boxes(frames, objects, self.crop_size)


def _vggish_not_missing(module: nn.Module, incompatible) -> None:
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if ".vggish." not in f".{k}"]


def build_model(cfg: ModelConfig, load_weights: bool = True, crop_size: int = DataConfig.crop_size) -> AVSSystem:
    """The model for `cfg`. With load_weights, the local files the config names are loaded
    (pretrained_backbone, pretrained_crop_backbone, vggish_weights, then init_from); pass
    False when a checkpoint will supply every weight (evaluation on another machine).
    `crop_size`: the side of the AVSS object crops the training forward cuts (pass the run's
    data.crop_size; evaluation cuts none)."""
    model = AVSSystem(cfg, crop_size)
    if load_weights:
        from .weights import load_configured_weights
        load_configured_weights(model, cfg)
    return model


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store every Conv2d weight channels_last (in place; call before building the optimizer
    or DDP). The 1x1x1 Conv3d weights of TPAVI stay as they are: they are used as matrices."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    return model
