"""Run configuration: dataclasses, TOML presets shipped in the package, dotted overrides.

A config is data. ``load_config("tiny", ["optim.lr=3e-4"])`` starts from the dataclass
defaults, applies the preset TOML (a name in ``avs_dist/configs`` or a path), then the
overrides, and validates the result, so a typo or an impossible value fails before any
process starts.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from avs_dist.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(UserError, ValueError):
    """A config key that does not exist or a value that cannot work."""


@dataclass
class DataConfig:
    shards: str = "shards"  # shard set written by `avs-dist pack`
    image_size: int = 224  # frames and masks are resized to this (square) when smaller than stored
    crop_size: int = 224  # crops are resized to this (S4's packed ones; AVSS object crops are cut at it)
    # The global batch: videos per optimizer step over all ranks, which fixes the data order
    # (data/loader.py) whatever the number of nodes, ranks or workers. 0: batch_videos x
    # ranks x optim.grad_accum. When set, the per-rank batch is derived from it (global_batch).
    global_batch_videos: int = 0
    batch_videos: int = 4  # videos per rank per micro-step (5 frames each); unused with global_batch_videos
    eval_batch_videos: int = 4  # AVSBench test batch: 4 videos = 20 frames
    num_workers: int = 2  # loader processes per rank
    hflip: bool = True  # same horizontal flip for a video's frames, masks and crops
    prefetch_factor: int = 2
    # AVSBench-semantic (5- and 10-frame clips): "bucket" = each global batch holds clips of
    # one length (5-frame batches run at T = 5); "pad" = clips mixed as drawn, each rank's
    # micro-batch padded to its longest clip (the reference's batch composition): at 4 clips
    # per rank 20.7% of the frames it runs are padding, 1.19x bucket's CPU time per epoch and
    # 1.26x its FLOPs (docs/perf/NOTES.md "AVSS batching"). Both keep the order a function of
    # (seed, epoch, global batch): data/loader.py. S4 / MS3 ignore it.
    avss_batching: str = "bucket"


BACKBONES = ("resnet18", "resnet34", "resnet50", *(f"pvt_v2_b{i}" for i in range(6)))
# The mask head's channels each subset needs: one sigmoid logit per pixel (S4, MS3), or a logit
# per AVSBench-semantic class (71: background, index 0, and 70 objects; label2idx.json).
SUBSET_MASK_CLASSES = {"s4": 1, "ms3": 1, "avss": 71}
# An AVSS batch may hold a single object crop (S4 always has 5 per video): at data.crop_size <= 32
# the crop ResNet's stride-32 map is 1x1, so its BatchNorm sees one value per channel (an error in
# torch) or, with few crops, very few (gradient norms of 1e7 measured at 16 px on tiny_avss).
AVSS_MIN_CROP = 64


@dataclass
class ModelConfig:
    # Image encoder: a torchvision ResNet or timm's PVT-v2 (AVSBench's two models: resnet50,
    # pvt_v2_b5). Replaces the former `depth` (model.depth = 50 reads as backbone "resnet50").
    backbone: str = "resnet50"
    drop_path: float = 0.1  # PVT-v2 stochastic depth, rising from 0 to this over the blocks; ResNets have none
    decoder_channels: int = 256
    tpavi_stages: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    tpavi_mode: str = "dot"  # "dot" (audio-visual) or "self" (visual-only ablation)
    tpavi_impl: str = "factorized"  # "factorized" (exact, fast) or "reference" (quadratic oracle)
    audio_input: str = "logmel"  # "logmel" runs the frozen VGGish; "embedding" takes 128-d
    # The seed's second ResNet on the sounding-object crops: S4's 5 packed crops per video, or
    # on AVSS one per labelled object and frame, cut from the frames (models/system.py)
    crop_branch: bool = False
    crop_depth: int = 50  # the crop branch is a ResNet whatever the main backbone
    crop_hidden: int = 512
    crop_relu: str = "between"  # "between" the two linears (sane), "end" (the seed's), "none"
    num_classes: int = 23  # crop classes: S4's 23 categories; 71 on AVSS (its class indices)
    # ImageNet weights of the encoder (local file): a torchvision ResNet state dict, or for
    # PVT-v2 the release's pvt_v2_b*.pth or a timm state dict (classifier keys ignored)
    pretrained_backbone: str = ""
    pretrained_crop_backbone: str = ""
    vggish_weights: str = ""  # vggish-10086976.pth (local file); random init when empty
    init_from: str = ""  # our checkpoint or an AVSBench reference checkpoint to start from
    channels_last: bool = True  # used on GPU only
    upsample: str = "interpolate"  # decoder 2x bilinear: "interpolate" or "matmul" (same map; perf notes)
    # Channels of the mask head: 1 = one sigmoid logit per pixel (S4, MS3); 71 = a logit per
    # AVSBench-semantic class (subset "avss"). Must match the subset (SUBSET_MASK_CLASSES).
    mask_classes: int = 1
    # TPAVI attends over the clip's frames in groups of this many (models/tpavi.py): 0 = the whole
    # clip; 5 = the AVSS reference, which attends a 10-frame clip as two 5-frame halves.
    tpavi_frames_per_group: int = 0
    # TPAVI's audio projection has a bias (S4 / MS3 reference) or none (AVSS reference: the zeroed
    # audio of padded seconds then projects to zero).
    tpavi_audio_bias: bool = True


@dataclass
class LossConfig:
    # Per-pixel BCE of the one-channel mask head (model.mask_classes = 1). S4: first frame
    # only; MS3: all frames (the masks present).
    bce: bool = True
    bce_weight: float = 1.0
    # Per-pixel cross-entropy of the class logits (model.mask_classes > 1, AVSS): the mean per
    # frame, then over the labelled frames (the AVSS reference's F10_IoU_BCELoss).
    ce: bool = False
    ce_weight: float = 1.0
    avm: bool = False
    avm_weight: float = 0.0  # lambda_1 in AVSBench
    avm_stages: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    # The reference's AVM losses (avsbench-format.md §3 "Base losses" and "AVSBench-semantic",
    # losses.py): "s4" thresholded mask, normalised features, -log cos; "ms3" soft mask from
    # pooled logits, KL divergence summed over frames and channels (the MS3 recipe's --kl_flag);
    # for class logits (AVSS), the mask "argmax is not background" pooled to the stage, KL per
    # frame averaged over labelled frames: "avss" (background = class 0) or "avss_avsbench"
    # (the reference's code, whose "background" is the last class, 70 = "woman").
    avm_variant: str = "s4"
    # The MS3 variant's sum is rescaled to this many videos (the reference's batch of 4 on one
    # GPU), so its weight does not depend on how a global batch is split over ranks.
    avm_sum_videos: int = 4
    crop_ce: bool = False
    crop_ce_weight: float = 1.0
    crop_pair: bool = False
    crop_pair_weight: float = 1.0
    crop_audio: bool = False
    crop_audio_weight: float = 1.0


@dataclass
class OptimConfig:
    name: str = "adam"  # "adam" or "adamw"
    lr: float = 1e-4
    # The TPAVI blocks' learning rate is lr x this. Their output BatchNorm starts at zero (as
    # in the reference), so the audio path opens only as fast as that weight grows; short
    # runs (the tiny preset) need it faster. 1.0 is the reference recipe.
    tpavi_lr_mult: float = 1.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "constant"  # "constant" or "cosine" (after warm-up)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 disables clipping
    grad_accum: int = 1  # micro-steps per optimizer step
    # torch's Adam kernel: "default" (torch picks), "foreach" (multi-tensor) or "fused" (one
    # kernel per dtype and device; CUDA and CPU). The same update; bench model times them (_fadam).
    impl: str = "default"


@dataclass
class TrainConfig:
    epochs: int = 15
    max_steps: int = 0  # optimizer steps; 0 means `epochs` full epochs
    seed: int = 123
    strategy: str = "ddp"  # "ddp", "zero1", "zero2", "zero3"
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "fp32", "bf16", "fp16"
    sync_bn: bool = False  # SyncBatchNorm; otherwise BN buffers are averaged before eval/ckpt
    eval_every_epochs: int = 1
    eval_every_steps: int = 0  # 0: only at epoch ends
    ckpt_every_steps: int = 200
    keep_last: int = 3
    log_every_steps: int = 10  # terminal lines; metrics.jsonl gets every step
    image_every_steps: int = 200  # TensorBoard overlay grids
    audio_gap_eval: bool = True  # also evaluate with mismatched audio at the end
    record_videos: bool = False  # every rank writes the names of the videos of each step to run_dir/videos/
    # Seconds the ranks wait for each other before training (the store at MASTER_ADDR:PORT, every
    # rank's arrival); a stop signal ends the wait at once. A world of one does not wait.
    rendezvous_timeout_s: float = 300.0
    # Optimizer steps in a row whose loss or gradient is NaN/inf that are skipped (no update);
    # one more stops the run ("failed"), naming the step, the term and the checkpoint to resume
    # from. fp16's loss-scale overflows are its own rule and do not count (train/strategy.py).
    max_nonfinite_steps: int = 10
    # The run's config and final figures as a TensorBoard HParams session (tb/hparams). A study
    # turns it off and writes one per run with its own keys (arm, seed, what the arms change),
    # so that every session of the study's HParams tab has the same columns.
    tb_hparams: bool = True


@dataclass
class Config:
    name: str = "custom"
    subset: str = "s4"  # "s4", "ms3" or "avss" (AVSBench-semantic)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# Keys that no longer exist, with what to write instead. A preset or override that sets one
# fails with that message; a saved config (checkpoint, run dir) that has one still loads.
RETIRED = {
    "data.shuffle_buffer": "nothing: the train order is a permutation of the whole split per epoch "
                           "(data/loader.py), no shuffle buffer is involved",
}

_CHOICES = {
    "subset": tuple(SUBSET_MASK_CLASSES),
    "data.avss_batching": ("bucket", "pad"),
    "model.backbone": BACKBONES,
    "model.crop_depth": (18, 34, 50),
    "model.tpavi_mode": ("dot", "self"),
    "model.tpavi_impl": ("factorized", "reference"),
    "model.audio_input": ("logmel", "embedding"),
    "model.crop_relu": ("between", "end", "none"),
    "model.upsample": ("interpolate", "matmul"),
    "loss.avm_variant": ("s4", "ms3", "avss", "avss_avsbench"),
    "optim.name": ("adam", "adamw"),
    "optim.schedule": ("constant", "cosine"),
    "optim.impl": ("default", "foreach", "fused"),
    "train.strategy": ("ddp", "zero1", "zero2", "zero3"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
}


def _coerce(path: str, value, hint):
    """Check `value` against the dataclass field type; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"{path}: expected {hint.__name__}, got {value!r}")
    return value


def _legacy_depth(value):
    """model.depth (the ResNet depth, before model.backbone) -> ("backbone", "resnet<depth>")."""
    name = f"resnet{value}"
    if isinstance(value, bool) or not isinstance(value, int) or name not in BACKBONES:
        raise ConfigError(f"model.depth={value!r}: model.depth is replaced by model.backbone; write "
                          f"model.backbone = one of {BACKBONES}")
    return "backbone", name


# Keys of older configs (presets, checkpoints and run folders) -> (new key, value).
_RENAMED = {"model.depth": _legacy_depth}


def _apply(obj, mapping: dict, prefix: str = "", saved: bool = False) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if path in RETIRED:
            if saved:
                continue
            raise ConfigError(f"config key {path!r} no longer exists; write instead {RETIRED[path]}")
        if path in _RENAMED:
            old, (key, value) = value, _RENAMED[path](value)
            if mapping.get(key, value) != value:
                raise ConfigError(f"{path}={old!r} and {prefix}{key}={mapping[key]!r} disagree: "
                                  f"keep only {prefix}{key}")
            path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {path!r} (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} is a section; set its keys, e.g. {path}.<key>=...")
            _apply(current, value, prefix=f"{path}.", saved=saved)
        else:
            setattr(obj, key, _coerce(path, value, hints[key]))


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # bare strings need no quotes on the command line


def parse_overrides(overrides: list[str]) -> dict:
    """["optim.lr=3e-4", "model.tpavi_stages=[0,1]"] -> nested dict."""
    nested: dict = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _parse_value(text.strip())
    return nested


def is_config_path(name_or_path: str) -> bool:
    """A TOML file (by suffix, or any existing path) rather than a preset name."""
    path = Path(name_or_path)
    return path.suffix == ".toml" or path.exists()


def preset_names() -> list[str]:
    """The preset names (avs_dist/configs/*.toml), sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if is_config_path(name_or_path):
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    candidate = PRESET_DIR / f"{name_or_path}.toml"
    if not candidate.is_file():
        known = ", ".join(preset_names())
        raise ConfigError(f"unknown config preset {name_or_path!r} (presets: {known})")
    return candidate


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if name_or_path:
        path = preset_path(name_or_path)
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        data.setdefault("name", path.stem)
        _apply(cfg, data)
    if overrides:
        _apply(cfg, parse_overrides(overrides))
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a saved config (checkpoints, run dirs) with the same checks; retired keys are
    dropped (see RETIRED)."""
    cfg = Config()
    _apply(cfg, data, saved=True)
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _get(cfg: Config, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: Config) -> None:
    for key, allowed in _CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {allowed}")
    problems = []
    positive = ["data.image_size", "data.crop_size", "data.batch_videos", "data.eval_batch_videos",
                "model.decoder_channels", "model.crop_hidden", "model.num_classes", "model.mask_classes",
                "optim.grad_accum", "loss.avm_sum_videos",
                "train.keep_last", "train.log_every_steps", "train.ckpt_every_steps"]
    for key in positive:
        if _get(cfg, key) <= 0:
            problems.append(f"{key} must be > 0 (got {_get(cfg, key)})")
    for key in ["data.num_workers", "train.epochs", "train.max_nonfinite_steps",
                "train.max_steps", "optim.warmup_steps",
                "optim.grad_clip", "optim.weight_decay", "train.eval_every_steps", "train.eval_every_epochs",
                "train.image_every_steps", "data.global_batch_videos", "model.tpavi_frames_per_group"]:
        if _get(cfg, key) < 0:
            problems.append(f"{key} must be >= 0 (got {_get(cfg, key)})")
    if cfg.train.rendezvous_timeout_s <= 0:
        problems.append(f"train.rendezvous_timeout_s must be > 0 (got {cfg.train.rendezvous_timeout_s})")
    if cfg.train.epochs == 0 and cfg.train.max_steps == 0:
        problems.append("train.epochs and train.max_steps are both 0: nothing to train")
    if not 0 < cfg.optim.lr < 1:
        problems.append(f"optim.lr must be in (0, 1) (got {cfg.optim.lr})")
    if not 0 < cfg.optim.tpavi_lr_mult or cfg.optim.lr * cfg.optim.tpavi_lr_mult >= 1:
        problems.append(f"optim.tpavi_lr_mult must be > 0 with optim.lr x it < 1 (got {cfg.optim.tpavi_lr_mult})")
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        problems.append(f"optim.min_lr_ratio must be in [0, 1] (got {cfg.optim.min_lr_ratio})")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        problems.append(f"optim.betas must be two numbers in [0, 1) (got {cfg.optim.betas})")
    for key in ["model.tpavi_stages", "loss.avm_stages"]:
        stages = _get(cfg, key)
        if any(s not in (0, 1, 2, 3) for s in stages) or len(set(stages)) != len(stages):
            problems.append(f"{key} must be distinct stages from 0..3 (got {stages})")
    if cfg.loss.avm:
        missing = sorted(set(cfg.loss.avm_stages) - set(cfg.model.tpavi_stages))
        if missing:
            problems.append(f"loss.avm_stages {missing} have no TPAVI (model.tpavi_stages={cfg.model.tpavi_stages})")
        if cfg.model.tpavi_mode != "dot":
            problems.append("loss.avm needs model.tpavi_mode='dot' (it uses the audio features)")
    crop_terms = [t for t in ("crop_ce", "crop_pair", "crop_audio") if getattr(cfg.loss, t)]
    if crop_terms and not cfg.model.crop_branch:
        problems.append(f"loss terms {crop_terms} need model.crop_branch=true")
    if cfg.subset == "ms3" and cfg.loss.crop_ce:
        problems.append("loss.crop_ce needs categories; MS3 has none")
    if cfg.model.decoder_channels % 2:
        problems.append("model.decoder_channels must be even (TPAVI halves it)")
    problems += _mask_head_problems(cfg)
    if not 0 <= cfg.model.drop_path < 1:
        problems.append(f"model.drop_path must be in [0, 1) (got {cfg.model.drop_path})")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _mask_head_problems(cfg: Config) -> list[str]:
    """The mask head against the subset, and the mask losses against the mask head."""
    problems = []
    classes, need = cfg.model.mask_classes, SUBSET_MASK_CLASSES.get(cfg.subset)
    if need is not None and classes != need:
        problems.append(f"model.mask_classes={classes} but subset {cfg.subset!r} has "
                        f"{'one mask per frame' if need == 1 else f'{need} classes'}: set model.mask_classes={need}")
    if cfg.loss.bce and classes != 1:
        problems.append(f"loss.bce needs one sigmoid logit per pixel (model.mask_classes=1, not {classes}): "
                        "set loss.bce=false and loss.ce=true")
    if not (cfg.loss.bce or cfg.loss.ce):
        # Also what keeps the terms' declared reads exact: the AVM losses of S4 and AVSS pass no
        # gradient to the logits, so without a mask term the decoder would get none.
        problems.append(f"no mask loss: set loss.{'bce' if classes == 1 else 'ce'}=true")
    if cfg.loss.ce and classes == 1:
        problems.append("loss.ce needs class logits (model.mask_classes > 1): set loss.ce=false, or "
                        "model.mask_classes=71 for AVSS")
    if cfg.loss.avm:
        class_variant = cfg.loss.avm_variant.startswith("avss")
        if class_variant != (classes > 1):
            fits = "'avss' or 'avss_avsbench'" if classes > 1 else "'s4' or 'ms3'"
            problems.append(f"loss.avm_variant={cfg.loss.avm_variant!r} does not fit model.mask_classes={classes}: "
                            f"use {fits}")
    if cfg.subset == "avss" and cfg.model.crop_branch and cfg.model.num_classes != need:
        # AVSS crops are classified into their AVSS class index (losses.crop_ce_loss_objects)
        problems.append(f"model.num_classes={cfg.model.num_classes} but the AVSS crop branch classifies each "
                        f"object crop into the {need} AVSBench-semantic classes: set model.num_classes={need}")
    if cfg.subset == "avss" and cfg.model.crop_branch and cfg.data.crop_size <= AVSS_MIN_CROP // 2:
        problems.append(f"data.crop_size={cfg.data.crop_size} is too small for the AVSS crop branch: a batch may hold "
                        f"one object crop, whose crop-ResNet stride-32 map must have more than one pixel for "
                        f"BatchNorm: set data.crop_size >= {AVSS_MIN_CROP // 2 + 1} ({AVSS_MIN_CROP} or more advised)")
    return problems


# What may differ between a checkpoint's config and the run that resumes it. Each rule is
# (kind, why); a key's rule is its own entry, else its section's ("loss" for loss.avm_weight).
#   applied: read at every step, or rebuilt from the config when the run resumes (the restored
#            optimizer's groups and the lr schedule take the new values: train/optim.py reapply)
#   batch:   applied when the global batch (videos per optimizer step, which fixes the data
#            order) stays the checkpoint's, else refused; the elastic path is this rule
#   shards:  applied when the train shards are the same files (the manifest's sha256s), else refused
#   ddp:     applied under DDP, refused under ZeRO
#   avss:    refused for AVSBench-semantic (clips of 5 and 10 frames), applied for S4 / MS3 (it has no effect)
#   refused: the run stops before any process starts, naming the key, both values and what to do
# launch/args.py check_run refuses; train/session.py checks again, applies, and prints one line per change.
RESUME_RULES: dict[str, tuple[str, str]] = {
    "name": ("applied", "a label"),
    "subset": ("refused", "the checkpoint was trained on the other subset's data"),
    "data": ("refused", "the checkpoint was trained on this data"),
    "data.shards": ("shards", "the same train shards at another path"),
    "data.global_batch_videos": ("batch", "the global batch"),
    "data.batch_videos": ("batch", "the global batch"),
    "data.eval_batch_videos": ("applied", "evaluation only"),
    "data.avss_batching": ("avss", "it fixes which clips share a global batch (the data order)"),
    "data.num_workers": ("applied", "the data order does not depend on the loader processes"),
    "data.prefetch_factor": ("applied", "the data order does not depend on the loader processes"),
    "model": ("refused", "the checkpoint's weights are those of its model"),
    "model.tpavi_impl": ("applied", "the same function of the same weights"),
    "model.upsample": ("applied", "the same function of the same weights"),
    "model.channels_last": ("applied", "a memory layout"),
    "model.drop_path": ("applied", "a training-time regularisation without parameters"),
    "model.init_from": ("refused", "it starts a new run's weights; a resumed run takes them from its checkpoint"),
    "model.pretrained_backbone": ("refused", "it starts a new run's weights; a resumed run takes them from its checkpoint"),
    "model.pretrained_crop_backbone": ("refused", "it starts a new run's weights; a resumed run takes them "
                                                  "from its checkpoint"),
    "model.vggish_weights": ("refused", "the frozen VGGish is rebuilt from it (checkpoints do not store it)"),
    "loss": ("applied", "loss weights and switches change no parameter"),
    "optim": ("applied", "the restored optimizer and the lr schedule take the new value"),
    "optim.name": ("refused", "the optimizer's state belongs to its algorithm"),
    "optim.grad_accum": ("batch", "the global batch"),
    "train": ("applied", "the run's length, cadence and logging"),
    "train.seed": ("refused", "the data order and the random streams come from it"),
    "train.strategy": ("refused", "DDP and ZeRO checkpoints, and those of ZeRO stages, are not interchangeable"),
    "train.sync_bn": ("refused", "it changes the model's BatchNorm layers"),
    "train.precision": ("ddp", "DeepSpeed's checkpoint layout depends on it; under DDP it is autocast only"),
}


def resume_rule(key: str) -> tuple[str, str]:
    """(kind, why) of RESUME_RULES for a dotted key: its own entry, else its section's."""
    return RESUME_RULES.get(key) or RESUME_RULES[key.split(".")[0]]


@dataclass(frozen=True)
class ResumeChange:
    """A field whose value differs between a checkpoint's config and the resuming run's."""

    key: str
    old: object
    new: object
    kind: str  # "applied" or "refused" (RESUME_RULES, once the batch / shards / ddp facts are known)
    why: str
    fact: str = ""  # what made a conditional rule apply ("the global batch stays 4 videos per step")

    def line(self) -> str:
        """'resume: optim.lr 0.002 -> 0.0001 (applied)'"""
        note = f": {self.fact}" if self.fact else ""
        return f"resume: {self.key} {toml_value(self.old)} -> {toml_value(self.new)} ({self.kind}{note})"

    def refusal(self) -> str:
        return (f"{self.key} is {toml_value(self.new)} here but {toml_value(self.old)} in the checkpoint ({self.why}): "
                f"set {self.key}={toml_value(self.old)} to resume it")


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def resume_changes(saved: Config, cfg: Config, global_batches: tuple[int, int],
                   same_shards: bool | None) -> list[ResumeChange]:
    """Every field of `cfg` that differs from `saved` (the checkpoint's config), classified by
    RESUME_RULES. `global_batches`: (the checkpoint's, this run's) videos per step;
    `same_shards`: whether the train shards are the checkpoint's (None: unknown, not refused).

    ConfigError, one line naming every refused key with both values and what to do, when a
    change cannot be applied (or the global batch differs, whichever field made it differ)."""
    old, new = _flat(to_dict(saved)), _flat(to_dict(cfg))
    changes, batch_ok = [], global_batches[0] == global_batches[1]
    for key in sorted(k for k in new if old.get(k) != new[k]):
        kind, why = resume_rule(key)
        facts = {"batch": (batch_ok, f"the global batch stays {global_batches[1]} videos per step"),
                 "shards": (same_shards is not False, "the same train shards, by sha256"),
                 "ddp": (cfg.train.strategy == "ddp", "under DDP"),
                 "avss": (cfg.subset != "avss", f"{cfg.subset} clips all have 5 frames: the order does not depend on it")}
        fact = ""
        if kind in facts:
            ok, fact = facts[kind]
            kind = "applied" if ok else "refused"
        changes.append(ResumeChange(key, old.get(key), new[key], kind, why, fact if kind == "applied" else ""))
    problems = [c.refusal() for c in changes if c.kind == "refused" and resume_rule(c.key)[0] != "batch"]
    if not batch_ok:
        problems.append(f"the global batch is {global_batches[1]} videos per step here but {global_batches[0]} in the "
                        f"checkpoint (it fixes the data order; data.batch_videos x ranks x optim.grad_accum unless "
                        f"data.global_batch_videos is set): set data.global_batch_videos={global_batches[0]} to "
                        "continue it")
    if problems:
        raise ConfigError("; ".join(problems) + "; or start a new --run-dir")
    return changes


def global_batch(data: DataConfig, world_size: int, grad_accum: int, override: int | None = None) -> tuple[int, int]:
    """(G, b): videos per optimizer step over all ranks, and per rank per micro-step.

    G is `override`, else data.global_batch_videos, else data.batch_videos x world_size x
    grad_accum; b = G / (world_size x grad_accum). ConfigError when that is not a whole
    number of videos (name the sizes that would work)."""
    g = override or data.global_batch_videos or data.batch_videos * world_size * grad_accum
    parts = world_size * grad_accum
    if g % parts:
        raise ConfigError(f"the global batch of {g} videos does not split into {world_size} ranks x "
                          f"optim.grad_accum {grad_accum}: set data.global_batch_videos to a multiple of {parts}, "
                          f"or change optim.grad_accum")
    return g, g // parts


def save_config(cfg: Config, path: str | Path) -> None:
    """Saved as JSON (lossless for these types) beside a TOML a person can re-run."""
    path = Path(path)
    path.write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    path.with_suffix(".toml").write_text(dump_toml(to_dict(cfg)))


def toml_value(v) -> str:
    """A value as TOML (and as the right-hand side of a command-line override) writes it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def dump_toml(data: dict) -> str:
    fmt = toml_value
    top = [f"{k} = {fmt(v)}" for k, v in data.items() if not isinstance(v, dict)]
    sections = []
    for k, v in data.items():
        if isinstance(v, dict):
            sections.append(f"\n[{k}]\n" + "\n".join(f"{kk} = {fmt(vv)}" for kk, vv in v.items()))
    return "\n".join(top) + "\n" + "\n".join(sections) + "\n"
