"""One AVSS clip read from the release and checked, as `avs-dist pack --subset avss` packs it.

`load_clip(record, options)` reads the clip's T frames (``frames/{i}.jpg``), the masks of its
labelled frames, and its ``audio.wav``, and returns the arrays a shard sample holds
(avss/samples.py) or every problem found ("path: reason"), never only the first.

- Frames: PIL ``convert('RGB')``, then the reference's resize at ``image_size``
  (avss/resize.py: train short side + centre crop, val / test a plain resize; bilinear).
- Masks -> class indices 0..70. ``masks="auto"`` reads ``labels_semantic/{i}.png`` (index
  masks) when the clip has all of them, else ``labels_rgb/{i}.png`` (colour masks, what the
  reference reads) through the palette (avss/classes.py); ``"rgb"`` / ``"semantic"`` force
  one. A colour in no palette entry, or an index above 70, is class 0 as in the reference,
  and the mask is listed as not clean (file, pixels, up to 8 values). Then the reference's
  nearest resize. A mask whose size differs from its frame's is a problem (its labels would
  not line up with the picture after the resize).
- Audio: the wav through data/audio.py's VGGish front end (read_wav, log_mel_examples: the
  same recipe as the reference's avss/torchvggish/vggish_input.wavfile_to_examples, which is
  the S4 one), giving N examples of 0.96 s; the first T are kept and missing ones are zeros
  (the reference zero-pads to 10, where S4 repeats the last example). Examples past T (a
  5-frame clip's wav of 5.76 s or more) are dropped: the reference keeps them at the padded
  positions, but multiplies the VGGish embeddings by the frame-exists flag right away
  (avss/train.py), so they never reach the model. N = 0 (a wav shorter than 0.975 s) is a
  problem: the reference would run on silence.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from avs_dist.avss.classes import BACKGROUND, NUM_CLASSES, colour_to_index
from avs_dist.avss.objects import objects_from_masks
from avs_dist.avss.resize import reference_resize
from avs_dist.data.layout import VideoRecord

MASK_SOURCES = ("auto", "rgb", "semantic")
INDEX_MODES = ("P", "L", "I", "I;16")  # index masks whose pixel value is the class index
MAX_VALUES_LISTED = 8
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class AvssPackOptions:
    """How `pack --subset avss` packs: frame / mask side, image encoding, shard size, which
    sets, which mask files, and whether bad clips are skipped."""
    image_format: str = "npy"
    jpeg_quality: int = 95
    shard_videos: int = 64
    skip_bad: bool = False
    image_size: int = 224
    sets: tuple = ("v1s", "v1m", "v2")
    masks: str = "auto"


def _frame(path: Path, size: int, split: str, problems: list[str]) -> tuple[np.ndarray | None, tuple | None]:
    if not path.is_file():
        problems.append(f"{path}: frame not found")
        return None, None
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except _READ_ERRORS as e:
        problems.append(f"{path}: unreadable image ({e})")
        return None, None
    return np.asarray(reference_resize(rgb, size, split, is_mask=False)), (rgb.height, rgb.width)


def read_class_mask(path: Path, source: str) -> tuple[np.ndarray, dict | None]:
    """A mask file at full size -> (class indices uint8 [H, W], None when every pixel is a
    class, else {"pixels": count, "values": up to 8 offending values}) — colours as [r, g, b]
    for "rgb", indices for "semantic". Raises what PIL raises for an unreadable file, and
    ValueError for a "semantic" mask of a mode that holds no class indices."""
    with Image.open(path) as im:
        if source == "rgb" or im.mode in ("RGB", "RGBA"):
            rgb = np.asarray(im.convert("RGB"))
            index, unknown = colour_to_index(rgb)
            if not unknown:
                return index, None
            bad = index == BACKGROUND
            bad &= np.any(rgb != 0, axis=-1)
            values = np.unique(rgb[bad].reshape(-1, 3), axis=0)[:MAX_VALUES_LISTED].tolist()
            return index, {"pixels": unknown, "values": values}
        if im.mode not in INDEX_MODES:
            raise ValueError(f"mode {im.mode!r} holds no class indices "
                             f"(expected one of {', '.join(INDEX_MODES)} or RGB)")
        raw = np.asarray(im).astype(np.int64)
    outside = (raw < 0) | (raw >= NUM_CLASSES)
    index = np.where(outside, BACKGROUND, raw).astype(np.uint8)
    if not outside.any():
        return index, None
    return index, {"pixels": int(outside.sum()), "values": np.unique(raw[outside])[:MAX_VALUES_LISTED].tolist()}


def mask_source(rec: VideoRecord, wanted: str) -> str:
    """"semantic" or "rgb": which of the clip's mask files `load_clip` reads (module docstring)."""
    if wanted != "auto":
        return wanted
    return "semantic" if all(p.is_file() for p in rec.extra["semantic_paths"]) else "rgb"


def _masks(rec: VideoRecord, opts: AvssPackOptions, frame_hw: list, problems: list[str], not_clean: list[dict]):
    source = mask_source(rec, opts.masks)
    paths = rec.extra["semantic_paths"] if source == "semantic" else rec.mask_paths
    if paths and not paths[0].parent.is_dir():
        problems.append(f"{paths[0].parent}: mask folder not found")
        return None, source
    masks = []
    for k, path in zip(rec.mask_frames, paths):
        if not path.is_file():
            other = rec.mask_paths[rec.mask_frames.index(k)] if source == "semantic" else None
            problems.append(f"{path}: mask not found" + (f" (nor {other})" if other and not other.is_file() else ""))
            masks.append(None)
            continue
        try:
            index, bad = read_class_mask(path, source)
        except _READ_ERRORS as e:
            problems.append(f"{path}: unreadable mask ({e})")
            masks.append(None)
            continue
        hw = frame_hw[k] if k < len(frame_hw) else None
        if hw is not None and index.shape != hw:
            problems.append(f"{path}: mask is {index.shape[1]}x{index.shape[0]} (WxH), its frame is {hw[1]}x{hw[0]}")
        if bad is not None:
            not_clean.append({"file": str(path), **bad})
        resized = reference_resize(Image.fromarray(index, mode="L"), opts.image_size, rec.split, is_mask=True)
        masks.append(np.asarray(resized))
    return masks, source


def _audio(rec: VideoRecord, n_frames: int, problems: list[str]) -> tuple[np.ndarray | None, int]:
    from avs_dist.data.audio import AudioError, log_mel_examples, read_wav

    if not rec.wav_path.is_file():
        problems.append(f"{rec.wav_path}: audio not found")
        return None, 0
    try:
        samples, rate = read_wav(rec.wav_path)
        examples = log_mel_examples(samples, rate)[:, 0]
    except AudioError as e:
        problems.append(str(e) if str(rec.wav_path) in str(e) else f"{rec.wav_path}: {e}")
        return None, 0
    if len(examples) == 0:
        problems.append(f"{rec.wav_path}: audio shorter than 0.975 s gives no 0.96 s VGGish example")
        return None, 0
    audio = np.zeros((n_frames, *examples.shape[1:]), np.float32)
    kept = min(n_frames, len(examples))
    audio[:kept] = examples[:kept]
    return audio, len(examples)


def load_clip(rec: VideoRecord, opts: AvssPackOptions) -> tuple[dict | None, list[str]]:
    """Read and check every file of one clip: (arrays, []) or (None, ["path: reason", ...]).

    The arrays: "frames" uint8 [T,S,S,3], "masks" uint8 [M,S,S] class indices, "mask_frames"
    list[M], "mask_source" "semantic" | "rgb", "audio" float32 [T,96,64], "audio_examples" N,
    "source_size" [h, w] of frame 0 in the release, "object_boxes" float32 [K,4],
    "object_classes" int64 [K], "object_frames" int64 [K] (avss/objects.py), and
    "masks_not_clean" [{"file", "pixels", "values"}] (S = image_size)."""
    problems: list[str] = []
    frames_dir = rec.frame_paths[0].parent
    if not frames_dir.is_dir():
        problems.append(f"{frames_dir}: frame folder not found (no frames for this CSV row)")
        frames, sizes = [None] * len(rec.frame_paths), [None] * len(rec.frame_paths)
    else:
        frames, sizes = zip(*(_frame(p, opts.image_size, rec.split, problems) for p in rec.frame_paths))
    not_clean: list[dict] = []
    masks, source = _masks(rec, opts, list(sizes), problems, not_clean)
    audio, n_examples = _audio(rec, len(rec.frame_paths), problems)
    if problems:
        return None, problems
    masks = np.stack(masks)
    boxes, classes, box_frames = objects_from_masks(masks, rec.mask_frames)
    return {"frames": np.stack(frames), "masks": masks, "mask_frames": list(rec.mask_frames),
            "mask_source": source, "audio": audio, "audio_examples": n_examples, "source_size": list(sizes[0]),
            "object_boxes": boxes, "object_classes": classes, "object_frames": box_frames,
            "masks_not_clean": not_clean}, []
