"""`avs-dist pack`: validate an AVSBench download, then write WebDataset shards + manifest.

One shard set per subset: ``{split}-{k:05d}.tar`` for train / val / test, videos in CSV
order, ``shard_videos`` videos per shard, and ``manifest.json`` (see shards.py).

Each video is one WebDataset sample, key ``{index:06d}`` (its position in the split):

- frames: ``frames.npy`` uint8 [5,H,W,3] (``--image-format npy``, the default: raw,
  lossless, ~100x faster to decode than PNG) or ``frame0.png`` .. ``frame4.png`` (lossless)
  or ``frame0.jpg`` .. (``--image-format jpeg``, lossy);
- crops: the same with ``crops`` / ``crop{i}``: each frame's sounding-object box cropped
  and resized to ``crop_size`` x ``crop_size`` (PIL bilinear on the exact sub-pixel box);
- ``masks.npy`` uint8 [M,H,W]: the reference's target times 255 (masks.py: S4 PIL
  ``convert('1')`` -> 0 / 255, MS3 ``convert('P')`` -> the palette index), target = v / 255;
- ``audio.npy`` float32 [5,96,64] VGGish log-mel;
- ``meta.json``: name, category, label, split, index, row (CSV row), mask_frames, boxes,
  box_source, audio_source, frame_size.

AVSBench-semantic (``--subset avss``, avs_dist/avss/): one sample per clip of 5 or 10 frames
(avss/samples.py), frames and class-index masks resized as the reference loader does at
``--image-size`` (avss/resize.py), log-mel from the wav (avss/clips.py), ``--sets`` choosing
among v1s / v1m / v2; the manifest records the sets and the 71 classes.

Masks that are not clean 0 / 255 (soft edges, halos, coloured or 0/1-valued masks, see
masks.py) are packed as the reference reads them, and counted and listed in the summary
and in the manifest (``masks_not_clean``): such data is not what the reference was trained on.

Bad input. Every video is validated first (all files decoded). By default any bad video
stops the pack with one report listing every bad video, the file and the reason, and
nothing is written. ``--skip-bad`` packs the rest and records the skipped videos and why in
the manifest; ``index`` is then the position among the packed videos of the split.

Atomic publishing. Shards are written as ``*.tar.tmp`` and renamed; ``manifest.json`` is
written last (temp + rename), so a directory without a manifest is an incomplete pack.
A rerun deletes the shards and temp files of an incomplete run and rebuilds. A complete
shard set (a manifest exists) is never touched unless ``--overwrite`` is given; with it, the
old set is removed only after the new input has validated.

Chunks (Slurm arrays, slurm/pack-array.sbatch): ``--chunk I --num-chunks N`` writes every
N-th shard of the same plan, starting at I, and records them in ``.chunks/``; ``--finalize
--num-chunks N`` verifies that the chunks hold exactly the planned shards and publishes the
manifest. The result is identical to a one-process pack.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from avs_dist.avss import layout as avss_layout
from avs_dist.avss.clips import MASK_SOURCES, AvssPackOptions, load_clip
from avs_dist.avss.samples import clip_meta, encode_clip
from avs_dist.data.classes import S4_CLASSES, class_index
from avs_dist.data.layout import FRAMES_PER_VIDEO, SPLITS, SUBSET_DIRS, LayoutError, VideoRecord, read_subset, subset_root
from avs_dist.data.masks import stored_mask
from avs_dist.data.shards import MANIFEST, SCHEMA_VERSION, encode_members
from avs_dist.errors import UserError
from avs_dist.fileio import fsync_dir, sha256_file, write_text_atomic

IMAGE_FORMATS = ("npy", "png", "jpeg")
SHARD_NAME = re.compile(r"^(train|val|test)-\d{5}\.tar(\.tmp)?$")
CSV_NAMES = {"s4": "s4_meta_data.csv", "ms3": "ms3_meta_data.csv"}
SUBSETS = ("s4", "ms3", "avss")


class PackError(UserError, RuntimeError):
    """The input cannot be packed as asked; `problems` lists every bad video when known."""

    def __init__(self, message: str, problems: list[dict] | None = None):
        super().__init__(message)
        self.problems = problems or []


@dataclass(frozen=True)
class PackOptions:
    image_format: str = "npy"
    jpeg_quality: int = 95
    crop_size: int = 224
    shard_videos: int = 64
    boxes: str | None = None  # root of the labelImg XML tree (None: boxes from masks)
    skip_bad: bool = False


# ----------------------------------------------------------------------------- reading


def _read_rgb(path: Path, problems: list[str]) -> np.ndarray | None:
    if not path.is_file():
        problems.append(f"{path}: frame not found")
        return None
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        problems.append(f"{path}: unreadable image ({e})")
        return None


def _read_mask(path: Path, subset: str, hw: tuple[int, int] | None, problems: list[str],
               not_clean: list[dict]) -> np.ndarray | None:
    """uint8 [H,W] stored target (masks.stored_mask) or None (problem recorded); a mask that is
    not clean 0 / 255 is appended to `not_clean` as {"file", "pixels", "values"}."""
    if not path.is_file():
        problems.append(f"{path}: mask not found")
        return None
    try:
        with Image.open(path) as im:
            arr, soft = stored_mask(im, subset)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        problems.append(f"{path}: unreadable mask ({e})")
        return None
    if hw is not None and arr.shape != hw:
        problems.append(f"{path}: mask is {arr.shape[1]}x{arr.shape[0]} (WxH), its frame is {hw[1]}x{hw[0]}")
        return None
    if soft is not None:
        not_clean.append({"file": str(path), **soft})
    return arr


def _crop(frame: np.ndarray, box, size: int) -> np.ndarray:
    # PIL resamples the exact (float) box region, so no rounding of the box is needed.
    x0, y0, x1, y1 = (float(v) for v in box)
    return np.asarray(Image.fromarray(frame).resize((size, size), Image.BILINEAR, box=(x0, y0, x1, y1)))


def _read_frames(rec: VideoRecord, problems: list[str]) -> tuple[list, tuple[int, int] | None]:
    """The 5 frames (None where unreadable) and the size all of them must share."""
    frames_dir = rec.frame_paths[0].parent
    if not frames_dir.is_dir():
        problems.append(f"{frames_dir}: frame folder not found (no frames for this CSV row)")
        return [None] * FRAMES_PER_VIDEO, None
    frames = [_read_rgb(p, problems) for p in rec.frame_paths]
    good = [f for f in frames if f is not None]
    hw = good[0].shape[:2] if good else None
    for p, f in zip(rec.frame_paths, frames):
        if f is not None and f.shape[:2] != hw:
            problems.append(f"{p}: frame is {f.shape[1]}x{f.shape[0]}, frame 1 is {hw[1]}x{hw[0]}")
    return frames, hw


def _read_audio(rec: VideoRecord, problems: list[str]):
    """(log-mel [5,1,96,64] float32 or None, "pkl" | "wav" | None)."""
    from avs_dist.data.audio import AudioError, load_audio

    try:
        audio, source = load_audio(rec)
    except AudioError as e:
        problems.append(str(e) if str(rec.logmel_path) in str(e) or str(rec.wav_path) in str(e)
                        else f"{rec.logmel_path}: {e}")
        return None, None
    audio = np.asarray(audio, dtype=np.float32)
    if audio.shape != (FRAMES_PER_VIDEO, 1, 96, 64):
        problems.append(f"{rec.logmel_path}: audio features have shape {list(audio.shape)}, expected [5, 1, 96, 64]")
        return None, None
    return audio, source


def _boxes(rec: VideoRecord, hw, masks: list, opts: PackOptions, problems: list[str]):
    """(boxes float32 [5,4], box sources) from the XML or the masks; (None, None) with problems."""
    from avs_dist.data.boxes import BoxError, boxes_for_video

    try:
        # Foreground for a box: target > 1/2 (stored v > 127), how a prediction is read.
        fg = {k: m > 127 for k, m in zip(rec.mask_frames, masks)}
        boxes, source = boxes_for_video(rec, hw, fg, opts.boxes)
    except BoxError as e:
        problems.append(str(e))
        return None, None
    boxes = np.asarray(boxes, dtype=np.float32)
    h, w = hw
    for i, b in enumerate(boxes):
        x0, y0, x1, y1 = (float(v) for v in b)
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            problems.append(f"frame {i + 1} of {rec.name}: box {[x0, y0, x1, y1]} ({source[i]}) "
                            f"is empty or outside the {w}x{h} image")
    return boxes, source


def load_video(rec: VideoRecord, opts: PackOptions, csv_path: Path | str = "meta CSV",
               with_crops: bool = True) -> tuple[dict | None, list[str]]:
    """Read and check every file of one video: (arrays, []) or (None, ["path: reason", ...]).

    All problems of the video are collected, not only the first one. The arrays' "masks" are
    the stored targets (uint8, target = v / 255) and "masks_not_clean" lists the video's
    masks that are not clean 0 / 255 ({"file", "pixels", "values"}).
    """
    problems: list[str] = []
    label = -1
    try:
        label = class_index(rec.category)
    except KeyError as e:
        problems.append(f"{csv_path}: row {rec.row + 2}: {e.args[0]}")
    frames, hw = _read_frames(rec, problems)
    masks_dir = rec.mask_paths[0].parent if rec.mask_paths else None
    not_clean: list[dict] = []
    if masks_dir is not None and not masks_dir.is_dir():
        problems.append(f"{masks_dir}: mask folder not found")
        masks = [None] * len(rec.mask_paths)
    else:
        masks = [_read_mask(p, rec.subset, hw, problems, not_clean) for p in rec.mask_paths]
    audio, audio_source = _read_audio(rec, problems)
    boxes = box_source = None
    if hw is not None and all(m is not None for m in masks) and all(f is not None for f in frames):
        boxes, box_source = _boxes(rec, hw, masks, opts, problems)
    if problems:
        return None, problems
    video = {"frames": np.stack(frames), "masks": np.stack(masks) if masks else np.zeros((0, *hw), np.uint8),
             "mask_frames": list(rec.mask_frames), "audio": audio[:, 0], "audio_source": audio_source,
             "boxes": boxes, "box_source": list(box_source), "label": label, "masks_not_clean": not_clean}
    if with_crops:
        video["crops"] = np.stack([_crop(f, b, opts.crop_size) for f, b in zip(frames, boxes)])
    return video, []


# ----------------------------------------------------------------------------- encoding


def encode_sample(video: dict, meta: dict, opts: PackOptions) -> dict:
    """Arrays + meta -> {"__key__", suffix: bytes} for one WebDataset sample (data/shards.py:encode_members)."""
    return encode_members(meta["index"], {"frame": video["frames"], "crop": video["crops"]}, video["masks"],
                          video["audio"], meta, opts.image_format, opts.jpeg_quality)


class _HashingWriter:
    """File wrapper that hashes and counts what tarfile streams into it."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, b):
        self.sha.update(b)
        self.bytes += len(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def _write_shard(out: str, file: str, split: str, items: list[tuple[VideoRecord, int]],
                 opts, csv_path: str) -> dict:
    """Write one whole shard (runs in a worker process); returns its manifest entry."""
    import webdataset as wds

    final = Path(out) / file
    tmp = final.with_name(file + ".tmp")
    keys, not_clean, n_masks, clip_frames = [], [], 0, []
    with open(tmp, "wb") as f:
        hw = _HashingWriter(f)
        # mtime=0: the same input gives byte-identical shards (stable sha256 across rebuilds).
        with wds.TarWriter(hw, encoder=False, mtime=0.0) as tw:
            for rec, index in items:
                video, problems = _load(rec, opts, csv_path)
                if video is None:
                    raise PackError(f"{rec.name}: changed while packing: " + "; ".join(problems))
                if rec.subset == "avss":
                    sample = encode_clip(video, clip_meta(rec, video, split, index), opts.image_format,
                                         opts.jpeg_quality)
                    keys.append(sample["__key__"])
                    clip_frames.append(len(video["frames"]))
                    not_clean += video["masks_not_clean"]
                    n_masks += len(video["masks"])
                    tw.write(sample)
                    continue
                meta = {
                    "name": rec.name, "subset": rec.subset, "category": rec.category,
                    "label": video["label"], "split": split, "index": index, "row": rec.row,
                    "mask_frames": video["mask_frames"], "boxes": video["boxes"].tolist(),
                    "box_source": video["box_source"], "audio_source": video["audio_source"],
                    "frame_size": list(video["frames"].shape[1:3]),
                }
                sample = encode_sample(video, meta, opts)
                keys.append(sample["__key__"])
                not_clean += video["masks_not_clean"]
                n_masks += len(video["masks"])
                tw.write(sample)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    # The mask counts travel with the entry (and a chunk's record); build_manifest moves them
    # to the manifest's "masks_not_clean".
    # AVSS: each clip's frame count beside its key, so the loader can group clips by length
    # without reading them (data/loader.py, data.avss_batching).
    lengths = {"num_frames": clip_frames} if clip_frames else {}
    return {"file": file, "split": split, "videos": len(items), "keys": keys, **lengths,
            "sha256": hw.sha.hexdigest(), "bytes": hw.bytes, "masks": n_masks, "masks_not_clean": not_clean}


def _load(rec: VideoRecord, opts, csv_path: str, with_crops: bool = True) -> tuple[dict | None, list[str]]:
    """load_video, or avss/clips.py:load_clip for an AVSS clip."""
    if rec.subset == "avss":
        return load_clip(rec, opts)
    return load_video(rec, opts, csv_path, with_crops=with_crops)


def _validate_chunk(recs: list[VideoRecord], opts, csv_path: str) -> list[list[str]]:
    return [_load(r, opts, csv_path, with_crops=False)[1] for r in recs]


# ----------------------------------------------------------------------------- driver


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False)


def _map_chunks(fn, chunks, args, progress, task, pool, size=len) -> list:
    """fn(chunk, *args) for every chunk, in order, in the pool or in-process; advances `task`
    by size(chunk)."""
    results = [None] * len(chunks)
    if pool is None:
        for i, chunk in enumerate(chunks):
            results[i] = fn(chunk, *args)
            progress.advance(task, size(chunk))
        return results
    futures = {pool.submit(fn, chunk, *args): i for i, chunk in enumerate(chunks)}
    for fut in as_completed(futures):
        i = futures[fut]
        results[i] = fut.result()
        progress.advance(task, size(chunks[i]))
    return results


def _format_problems(bad: list[dict]) -> str:
    lines = []
    for b in bad:
        lines.append(f"  {b['name']} ({b['split']}, CSV row {b['row'] + 2}):")
        lines += [f"    {p}" for p in b["problems"]]
    return "\n".join(lines)


def _clean_incomplete(out: Path) -> list[str]:
    removed = []
    for p in sorted(out.iterdir()):
        if SHARD_NAME.match(p.name) or p.name == MANIFEST + ".tmp":
            p.unlink()
            removed.append(p.name)
    return removed


def _write_manifest(out: Path, manifest: dict) -> None:
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def _options(data_root, subset, boxes, workers, skip_bad, image_format, jpeg_quality, crop_size,
             shard_videos, image_size: int = 224, sets=None, masks: str = "auto") -> tuple[Path, PackOptions]:
    if subset not in SUBSETS:
        raise PackError(f"--subset {subset!r}: expected one of {', '.join(SUBSETS)}")
    if image_format not in IMAGE_FORMATS:
        raise PackError(f"--image-format {image_format!r}: expected one of {', '.join(IMAGE_FORMATS)}")
    if not 1 <= jpeg_quality <= 100:
        raise PackError(f"--jpeg-quality {jpeg_quality}: expected 1..100")
    if crop_size < 1 or shard_videos < 1 or workers < 1:
        raise PackError("--crop-size, --shard-videos and --workers must be positive")
    data_root = Path(data_root)
    if subset == "avss":
        if boxes is not None:
            raise PackError("--boxes: AVSS boxes come from the semantic masks (one per class and labelled "
                            "frame); there is no XML to give")
        if image_size < 1:
            raise PackError(f"--image-size {image_size}: must be positive")
        if masks not in MASK_SOURCES:
            raise PackError(f"--avss-masks {masks!r}: expected one of {', '.join(MASK_SOURCES)}")
        return data_root, AvssPackOptions(image_format, jpeg_quality, shard_videos, skip_bad, image_size,
                                          avss_layout.parse_sets(sets), masks)
    if sets is not None:
        raise PackError(f"--sets is for --subset avss (AVSBench-semantic), not {subset}")
    if boxes is None and (data_root / "boxes").is_dir():
        boxes = data_root / "boxes"
    if boxes is not None and not Path(boxes).is_dir():
        raise PackError(f"--boxes {boxes}: folder not found")
    if boxes is not None and (Path(boxes) / SUBSET_DIRS[subset]).is_dir():
        # One XML tree for both subsets, split like the download (Single-source/, Multi-sources/).
        boxes = Path(boxes) / SUBSET_DIRS[subset]
    return data_root, PackOptions(image_format, jpeg_quality, crop_size, shard_videos,
                                  str(boxes) if boxes is not None else None, skip_bad)


def _records(data_root: Path, subset: str, opts) -> tuple[list[VideoRecord], str]:
    """(the records to pack in CSV order, the meta CSV they come from)."""
    if subset == "avss":
        avss_layout.read_classes(data_root)  # a missing or bad label2idx.json stops the pack first
        root = avss_layout.avss_root(data_root)
        return avss_layout.read_avss(data_root, opts.sets), str(root / avss_layout.META_CSV)
    return read_subset(data_root, subset), str(subset_root(data_root, subset) / CSV_NAMES[subset])


def _manifest_extra(data_root: Path, subset: str, sets) -> dict:
    """What an AVSS manifest adds: its 71 classes and the sets packed."""
    if subset != "avss":
        return {}
    return {"classes": list(avss_layout.read_classes(data_root)), "sets": list(sets)}


def _validate(records, opts, csv_path, workers, bar, pool) -> list[dict]:
    """Decode every video once; the bad ones with all their problems."""
    task = bar.add_task("validate", total=len(records))
    chunk = max(1, min(16, len(records) // (4 * workers) or 1))
    chunks = [records[i:i + chunk] for i in range(0, len(records), chunk)]
    found = [p for c in _map_chunks(_validate_chunk, chunks, (opts, csv_path), bar, task, pool)
             for p in c]
    return [{"name": r.name, "split": r.split, "row": r.row, "problems": p}
            for r, p in zip(records, found) if p]


def shard_plan(records: list[VideoRecord], shard_videos: int, bad_rows=frozenset()) -> list[tuple]:
    """(file, split, [(record, index in split), ...]) for every shard, in manifest order."""
    jobs = []
    for split in SPLITS:
        good = [r for r in records if r.split == split and r.row not in bad_rows]
        items = list(zip(good, range(len(good))))
        for k, i in enumerate(range(0, len(items), shard_videos)):
            jobs.append((f"{split}-{k:05d}.tar", split, items[i:i + shard_videos]))
    return jobs


def _write_job(job, out: str, opts, csv_path: str) -> dict:
    file, split, items = job
    return _write_shard(out, file, split, items, opts, csv_path)


def _write_shards(out: Path, jobs, opts, csv_path, bar, pool) -> list[dict]:
    task = bar.add_task("write shards", total=sum(len(j[2]) for j in jobs))
    return _map_chunks(_write_job, jobs, (str(out), opts, csv_path), bar, task, pool, size=lambda j: len(j[2]))


_MASK_KEYS = ("masks", "masks_not_clean")


def build_manifest(subset: str, options: dict, entries: list[dict], skipped: list[dict],
                   extra: dict | None = None) -> dict:
    """The manifest (shards.py) from the shard entries _write_shard returned, in plan order;
    `extra` replaces or adds top-level keys (AVSS: its classes and sets)."""
    not_clean = [m for e in entries for m in e.get("masks_not_clean", [])]
    masks = {"count": len(not_clean), "of": sum(e.get("masks", 0) for e in entries), "files": not_clean}
    entries = [{k: v for k, v in e.items() if k not in _MASK_KEYS} for e in entries]
    splits = {s: {"videos": sum(e["videos"] for e in entries if e["split"] == s),
                  "shards": sum(1 for e in entries if e["split"] == s)} for s in SPLITS}
    return {
        "format": "avs-dist-shards",
        "schema_version": SCHEMA_VERSION,
        "subset": subset,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "classes": list(S4_CLASSES),
        "options": options,
        "splits": splits,
        "shards": entries,
        "skipped": skipped,
        "masks_not_clean": masks,
        **(extra or {}),
    }


def not_clean_summary(masks: dict, shown: int = 5, subset: str = "s4") -> str:
    """A few lines on the masks that are not clean ("" when all are clean): S4 / MS3 masks
    not 0 / 255, AVSS masks with colours or indices that are no class."""
    if not masks["count"]:
        return ""
    if subset == "avss":
        lines = [f"{masks['count']} of {masks['of']} masks have pixels of no class (a colour not in the palette, "
                 f"or an index above 70): packed as class 0 (background), as the reference reads them; all are "
                 f"listed in {MANIFEST} (masks_not_clean):"]
        what = "pixels of no class"
    else:
        lines = [f"{masks['count']} of {masks['of']} masks are not clean 0/255 (soft edges, halos, palette or "
                 f"colour masks): packed as the reference's PIL conversion reads them, but this is not the data "
                 f"the reference was trained on; all are listed in {MANIFEST} (masks_not_clean):"]
        what = "pixels not 0/255"
    for m in masks["files"][:shown]:
        lines.append(f"  {m['file']}: {m['pixels']} {what} (values {m['values']})")
    if masks["count"] > shown:
        lines.append(f"  ... and {masks['count'] - shown} more")
    return "\n".join(lines)


def pack(data_root: str | Path, subset: str, out: str | Path, *, boxes: str | Path | None = None,
         workers: int = 1, skip_bad: bool = False, image_format: str = "npy", jpeg_quality: int = 95,
         crop_size: int = 224, shard_videos: int = 64, overwrite: bool = False,
         progress: bool = True, log=print, image_size: int = 224, sets=None, avss_masks: str = "auto") -> dict:
    """Pack one subset of an AVSBench download into `out`; returns the manifest.

    `boxes`: root of the labelImg XML tree handed to ``boxes_for_video``; when None and
    ``<data_root>/boxes`` exists, that folder is used (`avs-dist synth` writes it there).
    AVSS (subset "avss"): `image_size` (frames and masks, avss/resize.py), `sets` ("v1s,v1m,v2"
    or a list; None: all), `avss_masks` ("auto", "rgb", "semantic": avss/clips.py); `crop_size`
    and `boxes` do not apply (no crops are packed; boxes come from the masks).
    Raises PackError (bad videos without `skip_bad`, or a complete set without `overwrite`),
    LayoutError (the layout: e.g. no metadata.csv or label2idx.json).
    """
    data_root, opts = _options(data_root, subset, boxes, workers, skip_bad, image_format, jpeg_quality,
                               crop_size, shard_videos, image_size, sets, avss_masks)
    out = Path(out)
    if (out / MANIFEST).exists() and not overwrite:
        raise PackError(f"{out} already holds a complete shard set ({MANIFEST}); "
                        f"pass --overwrite to rebuild it, or choose another --out")

    records, csv_path = _records(data_root, subset, opts)
    t0 = time.time()
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        with _progress(progress) as bar:
            # Validation decodes everything once: the report must be complete before any
            # shard is written, and with --skip-bad the shard layout depends on it.
            bad = _validate(records, opts, csv_path, workers, bar, pool)
            if bad and not skip_bad:
                raise PackError(
                    f"{len(bad)} of {len(records)} {subset} videos are bad; nothing was written "
                    f"(fix them, or pass --skip-bad to pack the rest):\n{_format_problems(bad)}", bad)
            if bad:
                log(f"skipping {len(bad)} bad videos (recorded in {MANIFEST}):\n{_format_problems(bad)}")

            out.mkdir(parents=True, exist_ok=True)
            if (out / MANIFEST).exists():  # --overwrite: unpublish first, so a crash leaves "incomplete"
                (out / MANIFEST).unlink()
                fsync_dir(out)
            removed = _clean_incomplete(out)
            if removed:
                log(f"removed {len(removed)} files of a previous incomplete or replaced pack in {out}")

            jobs = shard_plan(records, shard_videos, {b["row"] for b in bad})
            entries = _write_shards(out, jobs, opts, csv_path, bar, pool)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    fsync_dir(out)
    manifest = build_manifest(subset, {**asdict(opts), "data_root": str(data_root)}, entries, bad,
                              _manifest_extra(data_root, subset, getattr(opts, "sets", None)))
    _write_manifest(out, manifest)
    counts = ", ".join(f"{s} {v['videos']} videos / {v['shards']} shards" for s, v in manifest["splits"].items())
    log(f"packed {subset} into {out} in {time.time() - t0:.1f}s: {counts}"
        + (f"; skipped {len(bad)} bad videos" if bad else ""))
    if manifest["masks_not_clean"]["count"]:
        log(not_clean_summary(manifest["masks_not_clean"], subset=subset))
    return manifest


# ----------------------------------------------------------------------------- chunks (Slurm arrays)
# `--chunk I --num-chunks N` validates and writes shards I, I+N, I+2N, ... of the plan a
# one-process pack makes (byte-identical files) and records them in CHUNK_DIR; `--finalize
# --num-chunks N` checks that the chunks hold exactly the planned shards (sizes and sha256
# re-read from disk) and publishes manifest.json. slurm/pack-array.sbatch runs them.
CHUNK_DIR = ".chunks"


def _chunk_file(out: Path, chunk: int, num_chunks: int) -> Path:
    return out / CHUNK_DIR / f"chunk-{chunk:05d}-of-{num_chunks:05d}.json"


def pack_chunk(data_root: str | Path, subset: str, out: str | Path, chunk: int, num_chunks: int, *,
               boxes: str | Path | None = None, workers: int = 1, image_format: str = "npy",
               jpeg_quality: int = 95, crop_size: int = 224, shard_videos: int = 64,
               progress: bool = True, log=print, image_size: int = 224, sets=None, avss_masks: str = "auto") -> dict:
    """Pack chunk `chunk` of `num_chunks`; returns its record (also OUT/.chunks/chunk-I-of-N.json).

    A bad video fails the chunk with the full report (--skip-bad changes the shard layout,
    which needs the whole list: pack without chunks for that)."""
    if not 0 <= chunk < num_chunks:
        raise PackError(f"--chunk {chunk}: expected 0 <= chunk < --num-chunks ({num_chunks})")
    data_root, opts = _options(data_root, subset, boxes, workers, False, image_format, jpeg_quality,
                               crop_size, shard_videos, image_size, sets, avss_masks)
    out = Path(out)
    if (out / MANIFEST).exists():
        raise PackError(f"{out} already holds a complete shard set ({MANIFEST}); remove it to rebuild in chunks")
    records, csv_path = _records(data_root, subset, opts)
    mine = shard_plan(records, shard_videos)[chunk::num_chunks]
    recs = [rec for _, _, items in mine for rec, _ in items]
    t0 = time.time()
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        with _progress(progress) as bar:
            bad = _validate(recs, opts, csv_path, workers, bar, pool)
            if bad:
                raise PackError(f"chunk {chunk} of {num_chunks}: {len(bad)} of its {len(recs)} videos are bad; "
                                f"its shards were not written:\n{_format_problems(bad)}", bad)
            (out / CHUNK_DIR).mkdir(parents=True, exist_ok=True)
            entries = _write_shards(out, mine, opts, csv_path, bar, pool)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    record = {"chunk": chunk, "num_chunks": num_chunks, "subset": subset,
              "options": {**asdict(opts), "data_root": str(data_root)}, "shards": entries}
    write_text_atomic(_chunk_file(out, chunk, num_chunks), json.dumps(record, indent=1) + "\n")
    log(f"packed chunk {chunk} of {num_chunks} into {out} in {time.time() - t0:.1f}s: "
        f"{len(entries)} shards, {len(recs)} videos")
    n_soft = sum(len(e["masks_not_clean"]) for e in entries)
    if n_soft:
        log(f"{n_soft} of its {sum(e['masks'] for e in entries)} masks are not clean 0/255 "
            f"(the manifest lists them after --finalize)")
    return record


def finalize_chunks(data_root: str | Path, subset: str, out: str | Path, num_chunks: int, *,
                    shard_videos: int = 64, log=print) -> dict:
    """Verify the N chunk records against the plan and the files, then publish the manifest."""
    out = Path(out)
    chunk_dir = out / CHUNK_DIR
    if (out / MANIFEST).exists() and not chunk_dir.exists():
        log(f"{out} is already complete ({MANIFEST}); nothing to finalize")
        return json.loads((out / MANIFEST).read_text())
    data_root = Path(data_root)
    records, missing = [], []
    for i in range(num_chunks):
        path = _chunk_file(out, i, num_chunks)
        if path.is_file():
            records.append(json.loads(path.read_text()))
        else:
            missing.append(i)
    if missing:
        raise PackError(f"{out}: chunks {missing} of {num_chunks} have no record in {chunk_dir} (their tasks "
                        f"failed, are still running, or ran with another chunk count); rerun them with "
                        f"--chunk I --num-chunks {num_chunks}, then --finalize again")
    options = {json.dumps(r["options"], sort_keys=True) for r in records}
    if len(options) != 1 or records[0]["subset"] != subset:
        raise PackError(f"{out}: the chunks were packed with different options or subsets; rerun all of them")
    opts = records[0]["options"]
    if opts["shard_videos"] != shard_videos or Path(opts["data_root"]) != data_root:
        raise PackError(f"{out}: chunks were packed from {opts['data_root']} with --shard-videos "
                        f"{opts['shard_videos']}; finalize with the same --data-root and --shard-videos")
    # The plan of the sets the chunks packed (AVSS); S4 / MS3 have no sets.
    sets = opts.get("sets")
    videos = _records(data_root, subset, AvssPackOptions(sets=tuple(sets)) if subset == "avss" else None)[0]
    plan = shard_plan(videos, shard_videos)
    by_file = {e["file"]: e for r in records for e in r["shards"]}
    planned = [file for file, _, _ in plan]
    problems = [f"{f}: planned, but no chunk wrote it" for f in planned if f not in by_file]
    problems += [f"{f}: not in the plan" for f in by_file if f not in set(planned)]
    for file, split, items in plan:
        entry = by_file.get(file)
        if entry is None:
            continue
        if entry["videos"] != len(items) or entry["split"] != split:
            problems.append(f"{file}: {entry['videos']} {entry['split']} videos, planned {len(items)} {split}")
            continue
        path = out / file
        sha, size = (sha256_file(path), path.stat().st_size) if path.is_file() else (None, None)
        if (sha, size) != (entry["sha256"], entry["bytes"]):
            problems.append(f"{out / file}: missing or changed since its chunk wrote it")
    if problems:
        raise PackError(f"{out}: the chunks do not add up to the shard set:\n  " + "\n  ".join(problems))
    entries = [by_file[f] for f in planned]
    manifest = build_manifest(subset, opts, entries, [], _manifest_extra(data_root, subset, sets))
    _write_manifest(out, manifest)
    for path in chunk_dir.iterdir():
        path.unlink()
    chunk_dir.rmdir()
    counts = ", ".join(f"{s} {v['videos']} videos / {v['shards']} shards" for s, v in manifest["splits"].items())
    log(f"finalized {subset} in {out} from {num_chunks} chunks: {counts}")
    if manifest["masks_not_clean"]["count"]:
        log(not_clean_summary(manifest["masks_not_clean"], subset=subset))
    return manifest


def main(argv: list[str] | None = None) -> int:
    from avs_dist.helpformat import HelpFormatter

    ap = argparse.ArgumentParser(prog="avs-dist pack", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--data-root", required=True, help="folder holding Single-source/ and/or Multi-sources/; "
                    "for avss the AVSBench-semantic release (metadata.csv) or the folder above its AVSBench_semantic/")
    ap.add_argument("--subset", required=True, choices=SUBSETS,
                    help="s4, ms3 (AVSBench-object) or avss (AVSBench-semantic)")
    ap.add_argument("--sets", default=None, help="avss: comma-separated sets to pack, of v1s,v1m,v2 (default: all)")
    ap.add_argument("--image-size", type=int, default=224,
                    help="avss: frame and mask side, resized as the reference loader does (train: short side then "
                         "centre crop; val/test: plain resize)")
    ap.add_argument("--avss-masks", choices=MASK_SOURCES, default="auto",
                    help="avss: labels_semantic index masks when a clip has them (auto), or always the labels_rgb "
                         "colour masks the reference reads (rgb), or always labels_semantic (semantic)")
    ap.add_argument("--out", required=True, help="shard folder to write (one per subset)")
    ap.add_argument("--boxes", default=None, help="labelImg XML root (default: <data-root>/boxes if present, "
                    "else boxes are derived from masks)")
    ap.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    ap.add_argument("--skip-bad", action="store_true", help="pack the good videos, record bad ones in the manifest")
    ap.add_argument("--image-format", choices=IMAGE_FORMATS, default="npy",
                    help="frames and crops: raw uint8 npy (lossless, fastest to read; default), png (lossless, "
                         "smaller, ~3 cores per GPU to decode), jpeg (lossy)")
    ap.add_argument("--jpeg-quality", type=int, default=95)
    ap.add_argument("--crop-size", type=int, default=224)
    ap.add_argument("--shard-videos", type=int, default=64)
    ap.add_argument("--overwrite", action="store_true", help="rebuild a complete shard set in --out")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--num-chunks", type=int, default=0,
                    help="split the work into N chunks (Slurm array tasks; slurm/pack-array.sbatch)")
    ap.add_argument("--chunk", type=int, default=None, help="write chunk I of --num-chunks (0-based)")
    ap.add_argument("--finalize", action="store_true",
                    help="verify the --num-chunks chunks written in --out and publish manifest.json")
    a = ap.parse_args(argv)
    if (a.chunk is not None or a.finalize) and a.num_chunks < 1:
        ap.error("--chunk and --finalize need --num-chunks N (N >= 1)")
    if a.chunk is not None and a.finalize:
        ap.error("--chunk and --finalize are separate steps")
    if (a.chunk is not None or a.finalize) and (a.skip_bad or a.overwrite):
        ap.error("--skip-bad and --overwrite need the whole video list: pack without chunks")
    try:
        if a.finalize:
            finalize_chunks(a.data_root, a.subset, a.out, a.num_chunks, shard_videos=a.shard_videos)
            return 0
        if a.chunk is not None:
            pack_chunk(a.data_root, a.subset, a.out, a.chunk, a.num_chunks, boxes=a.boxes, workers=a.workers,
                       image_format=a.image_format, jpeg_quality=a.jpeg_quality, crop_size=a.crop_size,
                       shard_videos=a.shard_videos, progress=not a.no_progress, image_size=a.image_size,
                       sets=a.sets, avss_masks=a.avss_masks)
            return 0
        pack(a.data_root, a.subset, a.out, boxes=a.boxes, workers=a.workers, skip_bad=a.skip_bad,
             image_format=a.image_format, jpeg_quality=a.jpeg_quality, crop_size=a.crop_size,
             shard_videos=a.shard_videos, overwrite=a.overwrite, progress=not a.no_progress,
             image_size=a.image_size, sets=a.sets, avss_masks=a.avss_masks)
    except (PackError, LayoutError) as e:
        print(f"avs-dist pack: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
