"""Weights from local files: torchvision ResNets, PVT-v2, VGGish, AVSBench reference checkpoints.

Every loader compares the file's keys and shapes with the module before touching it, and
fails with a WeightsError that names the file and lists the missing, unexpected and
mis-shaped keys. Keys a file is known to carry but we do not use (a torchvision classifier
head, the reference's unused second ResNet branch) are skipped and reported.

AVSBench reference checkpoints (`Pred_endecoder` state dicts such as S4_best.pth, optionally
with DataParallel's `module.` prefix) use the same submodule names as our AVSModel except:
- resnet.layer3_1 / resnet.layer4_1 are torchvision's layer3 / layer4 (renamed here);
- resnet.layer3_2 / resnet.layer4_2 are a second branch the reference never uses (skipped);
- path4.resConfUnit1 is never called by the reference (skipped; we do not build it);
- tpavi_b*.align_channel exists in 'self' mode checkpoints but has no use there (skipped).
AVSBench PVT checkpoints hold `encoder_backbone.` + the PVT release's key layout
(patch_embed1, block1.0, norm1, ...) and the same decoder keys; the encoder part is converted
to timm's layout by timm's own converter (models/pvt.py). Which encoder a checkpoint holds
(resnet18/34/50, pvt_v2_b0..b5) is read from its keys (`reference_backbone`), so loading it
needs no flag and a checkpoint of another encoder fails with what to set.

PVT-v2 ImageNet weights: the release's pvt_v2_b*.pth (its layout, converted) or a timm
state dict; the classifier `head.*` is skipped.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

from . import pvt
from ..errors import UserError
from .pvt import PVTEncoder
from .resnet import TORCHVISION_HEAD_KEYS, ResNetEncoder

_REFERENCE_MARKERS = ("resnet.conv1.weight", "output_conv.0.weight")
_REFERENCE_UNUSED = re.compile(r"^resnet\.layer[34]_2\.|^path4\.resConfUnit1\.")
_REFERENCE_RENAME = re.compile(r"^resnet\.layer([34])_1\.")
_PVT_PREFIX = "encoder_backbone."
# one key per stage and block in each PVT-v2 layout: stage index, block index
_PVT_BLOCK = {"release": re.compile(r"^block(\d)\.(\d+)\.norm1\.weight$"),
              "timm": re.compile(r"^stages\.(\d)\.blocks\.(\d+)\.norm1\.weight$")}
_PVT_EMBED = {"release": lambda i: f"patch_embed{i + 1}.proj.weight",
              "timm": lambda i: "patch_embed.proj.weight" if i == 0 else f"stages.{i}.downsample.proj.weight"}


class WeightsError(UserError, ValueError):
    """A weight file that is missing or does not fit the model."""


def _short(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def strip_prefix(state_dict: dict, prefix: str = "module.") -> dict:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def read_state_dict(path: str | Path, what: str) -> dict:
    """torch.load a state dict (tensors only) from a local file; unwraps {'state_dict': ...}
    / {'model': ...} and DataParallel's 'module.' prefix."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what}: file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or non-torch file
        raise WeightsError(f"{what}: cannot read {path}: {e}") from None
    return unwrap_state_dict(obj, what, path)


def unwrap_state_dict(obj, what: str, source) -> dict:
    """A loaded file -> its state dict: unwraps {'state_dict': ...} / {'model': ...} and
    DataParallel's 'module.' prefix."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{what}: {source} does not hold a state dict of tensors")
    return strip_prefix(obj)


def load_checked(module: nn.Module, state_dict: dict, source: str, skip=()) -> dict:
    """Load `state_dict` into `module` after checking keys and shapes; `skip` keys are
    dropped and reported. Returns {'source', 'loaded', 'skipped'}."""
    skipped = sorted(k for k in state_dict if k in skip)
    sd = {k: v for k, v in state_dict.items() if k not in skip}
    own = module.state_dict()
    # BatchNorm fills in num_batches_tracked itself when an older file lacks it.
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k} (file {tuple(sd[k].shape)}, model {tuple(own[k].shape)})"
                  for k in sd if k in own and sd[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_short(mismatched)}")
    if problems:
        raise WeightsError(f"{source} does not fit {type(module).__name__}:\n  " + "\n  ".join(problems))
    module.load_state_dict(sd, strict=False)  # strict checks done above, bar num_batches_tracked
    return {"source": source, "loaded": len(sd), "skipped": skipped}


def load_torchvision_resnet(encoder: ResNetEncoder, path: str | Path) -> dict:
    """A torchvision ResNet state dict (e.g. resnet50-0676ba61.pth); fc.* is skipped."""
    return load_checked(encoder, read_state_dict(path, "torchvision ResNet weights"), str(path),
                        skip=TORCHVISION_HEAD_KEYS)


def pvt_layout(state_dict: dict) -> str | None:
    """'release' (patch_embed1.*, block1.0.*), 'timm' (patch_embed.*, stages.0.*) or None."""
    if "patch_embed1.proj.weight" in state_dict:
        return "release"
    if "patch_embed.proj.weight" in state_dict:
        return "timm"
    return None


def pvt_variant(state_dict: dict) -> str | None:
    """The PVT-v2 variant (pvt_v2_b0..b5) whose blocks per stage and widths a state dict in
    either layout holds, or None when they match none of them."""
    layout = pvt_layout(state_dict)
    if layout is None:
        return None
    blocks: dict[int, set] = {}
    for key in state_dict:
        m = _PVT_BLOCK[layout].match(key)
        if m:
            blocks.setdefault(int(m.group(1)) - (layout == "release"), set()).add(int(m.group(2)))
    depths = tuple(len(blocks.get(i, ())) for i in range(4))
    try:
        dims = tuple(state_dict[_PVT_EMBED[layout](i)].shape[0] for i in range(4))
    except KeyError:
        return None
    for name, arch in pvt.ARCHS.items():
        if arch["depths"] == depths and arch["embed_dims"] == dims:
            return name
    return None


def load_pvt(encoder: PVTEncoder, path: str | Path) -> dict:
    """PVT-v2 ImageNet weights: the release's pvt_v2_b*.pth or a timm state dict; head.* is
    skipped. A file of another variant fails with both names."""
    sd = read_state_dict(path, "PVT-v2 weights")
    found = pvt_variant(sd)
    if found is not None and found != encoder.name:
        raise WeightsError(f"{path} holds {found} weights; the model's encoder is {encoder.name} "
                           f"(model.backbone={found} would fit)")
    if pvt_layout(sd) == "release":
        sd = pvt.release_to_timm(sd)
    return load_checked(encoder, sd, str(path), skip=[k for k in sd if k.startswith(pvt.HEAD_PREFIX)])


def load_backbone(encoder: nn.Module, path: str | Path) -> dict:
    """model.pretrained_backbone: torchvision weights for a ResNet, PVT-v2 weights for PVT."""
    if isinstance(encoder, PVTEncoder):
        return load_pvt(encoder, path)
    return load_torchvision_resnet(encoder, path)


def load_vggish(vggish: nn.Module, path: str | Path) -> dict:
    """vggish-10086976.pth: features.{0,3,6,8,11,13}.*, embeddings.{0,2,4}.*."""
    return load_checked(vggish, read_state_dict(path, "VGGish weights"), str(path))


def is_reference_checkpoint(state_dict: dict) -> bool:
    """True for an AVSBench `Pred_endecoder` state dict, ResNet or PVT (with or without `module.`)."""
    keys = strip_prefix(state_dict).keys()
    if "output_conv.0.weight" not in keys:
        return False
    resnet = all(k in keys for k in _REFERENCE_MARKERS) and any(_REFERENCE_RENAME.match(k) for k in keys)
    return resnet or _PVT_PREFIX + "patch_embed1.proj.weight" in keys


def _reference_resnet(keys) -> str | None:
    blocks = {k.split(".")[2] for k in keys if k.startswith("resnet.layer3_1.")}
    bottleneck = "resnet.layer1.0.conv3.weight" in keys
    return {(True, 6): "resnet50", (False, 6): "resnet34", (False, 2): "resnet18"}.get((bottleneck, len(blocks)))


def reference_backbone(state_dict: dict, source="checkpoint") -> str:
    """The encoder of an AVSBench reference checkpoint, read from its keys: resnet18|34|50
    or pvt_v2_b0..b5. Raises WeightsError for anything else."""
    sd = strip_prefix(state_dict)
    if _PVT_PREFIX + "patch_embed1.proj.weight" in sd:
        found = pvt_variant({k[len(_PVT_PREFIX):]: v for k, v in sd.items() if k.startswith(_PVT_PREFIX)})
        what = "PVT-v2"
    else:
        found, what = _reference_resnet(sd.keys()), "ResNet"
    if found is None:
        raise WeightsError(f"{source}: an AVSBench {what} checkpoint whose encoder is none of "
                           f"resnet18/34/50, pvt_v2_b0..b5 (blocks per stage or widths differ)")
    return found


def reference_model_overrides(state_dict: dict, source="checkpoint") -> list[str]:
    """Config overrides that build the model an AVSBench reference checkpoint holds: its
    encoder, decoder width and TPAVI stages, all read from the keys."""
    sd = strip_prefix(state_dict)
    stages = sorted({int(m.group(1)) - 1 for k in sd if (m := re.match(r"^tpavi_b(\d)\.", k))})
    return [f"model.backbone={reference_backbone(sd, source)}",
            f"model.decoder_channels={sd['output_conv.0.weight'].shape[1]}", f"model.tpavi_stages={stages}"]


def reference_to_ours(state_dict: dict, avs: nn.Module) -> tuple[dict, list[str]]:
    """Reference keys -> our AVSModel keys; returns (mapped, unused reference keys)."""
    mapped, unused = {}, []
    has_align = {k for k in avs.state_dict() if ".align_channel." in k}
    sd = strip_prefix(state_dict)
    encoder = {k[len(_PVT_PREFIX):]: v for k, v in sd.items() if k.startswith(_PVT_PREFIX)}
    for key, value in (pvt.release_to_timm(encoder) if encoder else {}).items():
        if key.startswith(pvt.HEAD_PREFIX):
            unused.append(_PVT_PREFIX + key)
        else:
            mapped[_PVT_PREFIX + key] = value
    for key, value in sd.items():
        if key.startswith(_PVT_PREFIX):
            continue
        if _REFERENCE_UNUSED.match(key) or (".align_channel." in key and key not in has_align):
            unused.append(key)
            continue
        mapped[_REFERENCE_RENAME.sub(r"resnet.layer\1.", key)] = value
    return mapped, sorted(unused)


def _avs_of(model: nn.Module) -> nn.Module:
    return model.avs if hasattr(model, "avs") else model


def load_reference_checkpoint(model: nn.Module, path: str | Path) -> dict:
    """Load an AVSBench reference checkpoint into our AVSModel (or the AVSSystem holding it).
    Returns {'source', 'loaded', 'skipped'}: 'skipped' lists the reference's unused keys."""
    return load_reference_state_dict(model, read_state_dict(path, "AVSBench reference checkpoint"), str(path))


def load_reference_state_dict(model: nn.Module, sd: dict, source: str) -> dict:
    """load_reference_checkpoint for a state dict already in memory."""
    if not is_reference_checkpoint(sd):
        raise WeightsError(f"{source} is not an AVSBench reference checkpoint (no resnet.layer3_1.* or "
                           f"encoder_backbone.patch_embed1.* keys, or no output_conv.0.weight)")
    avs = _avs_of(model)
    found = reference_backbone(sd, source)
    if found != avs.backbone:
        raise WeightsError(f"{source} is an AVSBench {found} model; this model's encoder is {avs.backbone} "
                           f"(set model.backbone={found})")
    mapped, unused = reference_to_ours(sd, avs)
    report = load_checked(avs, mapped, source)
    report["skipped"] = unused
    return report


def load_init_from(model: nn.Module, path: str | Path) -> dict:
    """cfg.model.init_from: an AVSBench reference .pth, or our checkpoint (a step folder,
    its model.pt, or a bare state dict of the whole system)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    sd = read_state_dict(path, "init_from checkpoint")
    if is_reference_checkpoint(sd):
        return load_reference_state_dict(model, sd, str(path))
    return load_checked(model, sd, str(path))


def load_configured_weights(model: nn.Module, cfg) -> list[dict]:
    """Apply the weight files a ModelConfig names, in order; returns one report per file."""
    reports = []
    if cfg.pretrained_backbone:
        reports.append(load_backbone(model.avs.encoder, cfg.pretrained_backbone))
    if cfg.pretrained_crop_backbone:
        if model.crop is None:
            raise WeightsError("model.pretrained_crop_backbone is set but model.crop_branch is false")
        reports.append(load_torchvision_resnet(model.crop.resnet, cfg.pretrained_crop_backbone))
    if cfg.vggish_weights:
        if model.vggish is None:
            raise WeightsError("model.vggish_weights is set but model.audio_input='embedding' has no VGGish")
        reports.append(load_vggish(model.vggish, cfg.vggish_weights))
    if cfg.init_from:
        reports.append(load_init_from(model, cfg.init_from))
    return reports
