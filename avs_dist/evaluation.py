"""Evaluation: a checkpoint loaded (ours or an AVSBench .pth), AVSBench mIoU / F, batch-size-free
figures and the audio gap; `avs-dist eval` (evaluate.py), the training's validation and the
study call it.

The audio gap measures how much the model relies on the sound: every video is segmented a
second time with the audio of another video, and

    audio_gap = miou(matched audio) - miou(mismatched audio)

with the batch-size-free per-frame mIoU (metrics.py), over the same frames on both sides.
A model that ignores audio has a gap of exactly 0.

Partners (see AudioBank): a video of class c gets the audio of one of the first 4 videos
(CSV order) of the next class present in the split, so the mismatched sound is always of
another class when the split has two; videos without a class (MS3) get one of the split's
first 4 videos other than themselves. The choice depends only on the split, not on batch
size, world size or loader workers. The mismatched pass is a second pass over the loader.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from avs_dist.errors import BadFileError, MissingFileError, UserError
from avs_dist.metrics import StreamingEvaluator
from avs_dist.precision import autocast
from avs_dist.provenance import checkpoint_source

_BATCH_TENSORS = ("frames", "audio", "masks", "mask_valid", "frame_exists", "crops")


# ---- loading a model ----

def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _from_state_dict(build_model, cfg, state: dict):
    """Build on the meta device and adopt the checkpoint's tensors (skips the random init of
    ~100M parameters); a real build if something is not in the state dict."""
    from avs_dist.models.vggish import VGGish

    try:
        with torch.device("meta"):
            model = build_model(cfg.model, load_weights=False)
    except (RuntimeError, NotImplementedError):  # a constructor that reads a tensor (older timm's drop-path rates)
        model = build_model(cfg.model, load_weights=False)
    model.load_state_dict(state, assign=True)
    if model.vggish is not None:  # never in checkpoints: its seeded init (or the weights file, below)
        model.vggish = VGGish()
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):  # non-persistent buffers
        model = build_model(cfg.model, load_weights=False)
        model.load_state_dict(state)
    return model


def _refuse_nonfinite(file: Path, obj) -> None:
    """BadFileError naming `file` when its weights hold NaN/inf: their scores would mean nothing
    (a NaN model scores mIoU 0, not an error)."""
    from avs_dist.train.checkpoint import describe_nonfinite, nonfinite_tensors

    # ours hold the weights under "model", AVSBench's .pth under "state_dict" or at the top level
    state = (obj["model"] if "model" in obj else obj.get("state_dict", obj)) if isinstance(obj, dict) else {}
    bad = nonfinite_tensors(state) if isinstance(state, dict) else []
    if bad:
        raise BadFileError(f"{file}: {describe_nonfinite(bad, len(state))}; a non-finite model cannot be evaluated "
                         "(take an earlier checkpoint)")


def load_for_inference(path, device="cpu", vggish_weights: str | None = None,
                       config_overrides: list[str] | None = None):
    """-> (model in eval mode on `device`, Config): `load_with_source` without the source."""
    model, cfg, _ = load_with_source(path, device, vggish_weights, config_overrides)
    return model, cfg


def load_with_source(path, device="cpu", vggish_weights: str | None = None,
                     config_overrides: list[str] | None = None):
    """-> (model in eval mode on `device`, Config, source) from our checkpoint or an AVSBench .pth;
    source: which checkpoint it is (provenance.py: kind best/last/step/reference, step).

    `path` is a checkpoint folder (or a run / checkpoints folder: best/, else the newest
    valid step; train/checkpoint.py model_file), its model.pt, or an AVSBench reference state
    dict, ResNet or PVT: its encoder, decoder width and TPAVI stages are read from the keys and
    set on the `s4_avsbench` (ResNet) or `s4_pvt` (PVT-v2) preset; it holds no VGGish, so pass
    `vggish_weights`. Our checkpoints from before model.backbone (model.depth) load too
    (config.py reads the old key). Our checkpoints hold
    no VGGish either: it is rebuilt from the file the training config names (`vggish_weights`
    overrides that path, for another machine) or, when training used none, its seeded init.
    """
    from avs_dist.config import config_from_dict, parse_overrides

    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"checkpoint {path} does not exist: give a checkpoint folder (run_dir/checkpoints/best), "
                               "its model.pt, a run folder, or an AVSBench .pth")
    from avs_dist.train.checkpoint import model_file

    file = model_file(path)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0]  # torch's messages run to a page
        raise BadFileError(f"{file}: cannot be read as a torch checkpoint ({type(e).__name__}: {first}); "
                           "give a checkpoint folder, its model.pt or an AVSBench .pth") from None
    from avs_dist.models.system import build_model
    from avs_dist.models.weights import is_reference_checkpoint, load_reference_state_dict, unwrap_state_dict

    _refuse_nonfinite(file, obj)

    if isinstance(obj, dict) and "model" in obj and "config" in obj:
        cfg = config_from_dict(_merge(obj["config"], parse_overrides(config_overrides or [])))
        # every trained weight is in the checkpoint, so the backbone files named at training
        # time need not exist where inference runs, and their random init would be wasted
        try:
            model = _from_state_dict(build_model, cfg, obj["model"])
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise BadFileError(f"{file}: the weights do not fit the model its config describes ({first}); "
                               "drop the overrides that change the model") from None
        vggish_file = vggish_weights or cfg.model.vggish_weights
        if vggish_file and model.vggish is not None:
            from avs_dist.models.weights import load_vggish
            if not Path(vggish_file).is_file():
                raise MissingFileError(f"VGGish weights {vggish_file} (named by the checkpoint's config "
                                        "model.vggish_weights) do not exist here: pass --vggish-weights PATH")
            load_vggish(model.vggish, vggish_file)
    elif isinstance(obj, dict) and is_reference_checkpoint(obj.get("state_dict", obj)):
        sd = unwrap_state_dict(obj, "AVSBench reference checkpoint", file)
        cfg = _reference_config(sd, file, vggish_weights, config_overrides)
        if not vggish_weights:
            print(f"warning: {file} is an AVSBench reference checkpoint, which holds no VGGish weights; "
                  "without --vggish-weights the audio features are random", file=sys.stderr)
        model = build_model(cfg.model)
        # the file is already in memory: no second torch.load of a few hundred MB
        load_reference_state_dict(model, sd, str(file))
    else:
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise BadFileError(f"{file}: neither an avs-dist checkpoint (a dict with 'model' and 'config') "
                         f"nor an AVSBench reference state dict; found {keys}")
    return model.to(device).eval(), cfg, checkpoint_source(file, obj)


def _reference_config(sd: dict, file, vggish_weights, config_overrides):
    """The config of an AVSBench reference checkpoint: the S4 preset of its encoder with the
    model its keys describe, then the caller's overrides (which may not change the encoder)."""
    from avs_dist.config import config_from_dict, load_config, to_dict
    from avs_dist.models.weights import reference_model_overrides

    found = reference_model_overrides(sd, str(file))
    backbone = found[0].partition("=")[2]
    cfg = load_config("s4_pvt" if backbone.startswith("pvt_") else "s4_avsbench", [*found, *(config_overrides or [])])
    if cfg.model.backbone != backbone:
        raise BadFileError(f"{file} holds a {backbone} model, but the overrides set model.backbone="
                         f"{cfg.model.backbone}: drop that override")
    data = to_dict(cfg)
    data["model"].update(vggish_weights=vggish_weights or "", pretrained_backbone="", init_from="")
    return config_from_dict(data)


# ---- evaluation loop ----

def segment(model, frames: torch.Tensor, audio: torch.Tensor, frame_exists: torch.Tensor | None = None) -> torch.Tensor:
    """Mask logits [B*T,K,H,W] (float32; K = model.mask_classes: 1 for S4 / MS3, 71 for AVSS) for
    frames [B,T,3,H,W], audio and frame_exists bool [B,T] (AVSS clips padded to T; None: every
    frame exists, and the model is called without it).

    The crop branch only feeds training losses, never the masks: called without crops, an
    eval-mode model skips it (models/system.py), so inference does not pay for a second ResNet.
    """
    out = model(frames, audio) if frame_exists is None else model(frames, audio, frame_exists=frame_exists)
    return (out["logits"] if isinstance(out, dict) else out).float()


class FirstPerKey:
    """Per key, the (index, value) entries of the `k` smallest indices added, in index order.

    The partner banks of the audio gap (AudioBank here, avss/evaluation.py:ClipAudioBank) keep
    the first videos / clips of the split per class or length with it: `gather` merges the
    ranks' entries (all_gather_object; every rank of `group` calls it), so what is kept does not
    depend on how the split was shared out over ranks and batches."""

    def __init__(self, k: int):
        self.k = k
        self.entries: dict = {}

    def add(self, key, index: int, value) -> None:
        kept = self.entries.setdefault(key, [])
        if len(kept) < self.k or index < kept[-1][0]:
            kept.append((index, value))
            kept.sort(key=lambda e: e[0])
            del kept[self.k:]

    def gather(self, group=None) -> None:
        if dist.is_available() and dist.is_initialized():
            parts = [None] * dist.get_world_size(group)
            dist.all_gather_object(parts, self.entries, group=group)
            self.entries = {}
            for part in parts:
                for key, kept in part.items():
                    for index, value in kept:
                        self.add(key, index, value)

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())


class AudioBank:
    """Partner audio for the mismatched pass, the same on every rank and for every batching.

    It keeps, per class label, the audio of the first `per_class` videos of the split (CSV
    order), merged over ranks. The partner of a video of class c is one of those videos of
    the next class present in the split (cyclic in the reference class order), picked by
    the video's index modulo their number; for videos without a class (MS3, label -1) it is
    one of the split's first `per_class` videos other than itself. Only a split of a single
    class falls back to other videos of the same class.
    """

    def __init__(self, per_class: int = 4):
        self.kept = FirstPerKey(per_class)  # label -> [(video index, audio on the CPU)]
        self.audio = None  # [M,T,...] on the device after freeze()
        self.rows: dict[int, list[tuple[int, int]]] = {}  # label -> [(video index, row of self.audio)]

    def add(self, audio: torch.Tensor, labels: list[int], indices: list[int]) -> None:
        for a, label, index in zip(audio, labels, indices):
            self.kept.add(int(label), int(index), a.detach().to("cpu", copy=True))

    def freeze(self, device, group=None) -> int:
        """Merge the ranks' entries, move them to `device`; returns how many videos it holds."""
        self.kept.gather(group)
        entries = self.kept.entries
        flat = [(label, index, a) for label in sorted(entries) for index, a in entries[label]]
        self.rows = {}
        for row, (label, index, _) in enumerate(flat):
            self.rows.setdefault(label, []).append((index, row))
        if flat:
            self.audio = torch.stack([a for _, _, a in flat]).to(device)
        return len(flat)

    def partner_rows(self, labels: list[int], indices: list[int]) -> list[int]:
        out = []
        known = sorted(k for k in self.rows if k >= 0)
        for label, index in zip(labels, indices):
            if label >= 0 and len(known) > 1:
                others = [k for k in known if k != label]
                cands = self.rows[next((k for k in others if k > label), others[0])]
            else:
                cands = [e for e in self.rows.get(label, []) if e[0] != index]
            if not cands:  # e.g. the only video of its kind: any other video
                cands = [e for k in sorted(self.rows) for e in self.rows[k] if e[0] != index]
            if not cands:
                raise ValueError("the audio gap needs at least two videos")
            out.append(cands[index % len(cands)][1])
        return out


def _to_device(batch: dict, device: torch.device) -> dict:
    out = dict(batch)
    for k in _BATCH_TENSORS:
        if k in out and torch.is_tensor(out[k]):
            out[k] = out[k].to(device, non_blocking=True)
    return out


def _labels(batch: dict) -> list[int]:
    n = batch["frames"].shape[0]
    return batch["label"].tolist() if "label" in batch else [-1] * n


def mask_classes(model) -> int:
    """The model's mask channels: its config's `mask_classes` (1 when it has no config, e.g. a test model)."""
    return int(getattr(getattr(model, "cfg", None), "mask_classes", 1))


@torch.no_grad()
def evaluate(model, loader, device, batch_videos: int = 4, audio_gap: bool = True,
             precision: str = "auto", group=None, per_class: bool = False,
             classes: int | None = None, class_names=None) -> dict:
    """Run `model` over an eval loader and return the metrics (see StreamingEvaluator).

    A class-logit model (`classes`, default mask_classes(model), is 71: AVSS) is evaluated by
    avss/evaluation.py's `evaluate_semantic` instead (the reference's and the correct AVSS
    figures, `miou` = `miou_frame_all71`, `f` = `f_frame_all71`, the audio gap on those,
    with `per_class` the 71 classes' figures named by `class_names`: the manifest's `classes`);
    its docstring lists the keys. Every rank decides the same way, before any batch, so ranks
    without clips still join the same collectives.

    `loader` is a re-iterable of batches (eval_loader's result, a list) or a callable
    returning a fresh iterable; the audio gap iterates it twice (matched, then mismatched
    audio from the AudioBank built in the first pass). Every rank calls this with its own
    share of the videos; the result (the same on every rank) covers all of them; `group` is
    the process group for the gathers (default: world). With `audio_gap` it adds
    `audio_gap`, `miou_mismatched`, `f_mismatched` (None for a split of one video); with
    `per_class` too, `audio_gap_per_class` {S4 class name: that class's audio gap} (videos with
    a class only: S4).
    """
    device = torch.device(device)
    if audio_gap and isinstance(loader, Iterator):
        raise TypeError("the audio gap iterates the loader twice: pass a list, eval_loader(...) "
                        "or a callable that returns a fresh iterable, not an iterator")
    fresh = loader if callable(loader) else (lambda: loader)
    # DDP / DeepSpeed wrappers: evaluation needs no gradient hooks, and the crop-branch
    # switch in `segment` is an attribute of the inner model
    if isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    classes = mask_classes(model) if classes is None else classes
    was_training = model.training
    model.eval()
    if classes != 1:
        from avs_dist.avss.evaluation import evaluate_semantic
        from avs_dist.avss.metrics import NUM_CLASSES

        if classes != NUM_CLASSES:
            raise ValueError(f"a model with {classes} mask classes: evaluation knows 1 (S4, MS3) and "
                             f"{NUM_CLASSES} (AVSS)")
        try:
            return evaluate_semantic(model, fresh, device, segment, audio_gap, precision, group, per_class,
                                     class_names)
        finally:
            model.train(was_training)
    matched = StreamingEvaluator(batch_videos, per_class=per_class)
    mismatched = StreamingEvaluator(batch_videos, per_class=per_class) if audio_gap else None
    bank = AudioBank()
    try:
        for batch in fresh():
            if audio_gap:  # from the host copy: no device sync
                bank.add(batch["audio"], _labels(batch), batch["index"].tolist())
            batch = _to_device(batch, device)
            with autocast(device, precision):
                logits = segment(model, batch["frames"], batch["audio"])
            matched.update(logits, batch)
        paired = audio_gap and bank.freeze(device, group) >= 2
        if paired:
            for batch in fresh():
                rows = bank.partner_rows(_labels(batch), batch["index"].tolist())
                batch = _to_device(batch, device)
                other_audio = bank.audio[torch.tensor(rows).to(device, non_blocking=True)]
                with autocast(device, precision):
                    logits = segment(model, batch["frames"], other_audio)
                mismatched.update(logits, batch)
    finally:
        model.train(was_training)
    res = matched.result(group)
    order = ["miou_avsbench", "f_avsbench", "miou", "f"]
    if audio_gap:
        mis = mismatched.result(group) if paired else {"miou": None, "f": None}
        gap = res["miou"] - mis["miou"] if paired else None
        res.update(audio_gap=gap, miou_mismatched=mis["miou"], f_mismatched=mis["f"])
        order += ["audio_gap", "miou_mismatched", "f_mismatched"]
        if per_class and paired:
            res["audio_gap_per_class"] = _per_class_gap(res["miou_per_class"], mis["miou_per_class"])
    res.pop("miou_per_class", None)
    return {**{k: res[k] for k in order}, **res}


def _per_class_gap(matched: dict, mismatched: dict) -> dict:
    """{label: mIoU} of both passes -> {class name: gap}, in the reference class order."""
    from avs_dist.data.classes import S4_CLASSES

    return {S4_CLASSES[c] if c < len(S4_CLASSES) else str(c): matched[c] - mismatched[c]
            for c in sorted(matched) if c in mismatched}


def evaluate_loaded(model, cfg, source: dict, shards, split: str, device, d=None, *, batch_videos: int | None = None,
                    num_workers: int | None = None, audio_gap: bool = True, precision: str = "auto") -> dict:
    """`evaluate` (per class) of a model from `load_with_source` on `split` of `shards`, as
    `avs-dist eval` writes it: the metrics (an empty split's NaN as None) and split, checkpoint,
    shards, world_size, source. `d`: the process group setup (distributed.setup) when several
    ranks share the split, else None. UserError for batch_videos < 1."""
    batch_videos = batch_videos or cfg.data.eval_batch_videos
    if batch_videos < 1:
        raise UserError(f"--batch-videos must be >= 1 (got {batch_videos})")
    cfg.data.eval_batch_videos = batch_videos
    if num_workers is not None:
        cfg.data.num_workers = num_workers
    from avs_dist.data.loader import eval_loader

    rank, world = (d.rank, d.world_size) if d is not None else (0, 1)
    loader = eval_loader(shards, split, cfg.data, rank, world, device=device, crops=False)
    class_names = None
    if cfg.model.mask_classes != 1:  # AVSS: per-class figures named by the manifest's classes
        from avs_dist.data.shards import read_manifest

        class_names = read_manifest(shards).get("classes")
        if class_names is not None and len(class_names) != cfg.model.mask_classes:
            raise BadFileError(f"{Path(shards) / 'manifest.json'}: 'classes' has {len(class_names)} names but the "
                               f"model has {cfg.model.mask_classes} mask classes: re-pack the shards "
                               "(avs-dist pack --subset avss)")
    result = evaluate(model, loader, device, batch_videos=batch_videos, audio_gap=audio_gap,
                      precision=precision, group=d.control if d is not None else None, per_class=True,
                      classes=cfg.model.mask_classes, class_names=class_names)
    # an empty split has no figures: null in JSON rather than the non-standard NaN
    result = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in result.items()}
    result.update(split=split, checkpoint=source.get("checkpoint"), shards=str(Path(shards).resolve()),
                  world_size=world, source=source)
    return result


def evaluate_checkpoint(checkpoint, shards, split: str = "test", device=None, **kwargs) -> dict:
    """`evaluate_loaded` of the checkpoint `checkpoint` (a run folder: its best/, else its newest
    valid checkpoint; load_with_source) in this one process, on `device` (default: cuda when
    available). OSError / ValueError (WeightsError, BadFileError) for a checkpoint that cannot
    be evaluated; ShardError for a split whose shards are missing."""
    from avs_dist.data.shards import check_shards

    check_shards(shards, [split])
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg, source = load_with_source(checkpoint, device)
    return evaluate_loaded(model, cfg, source, shards, split, device, **kwargs)
