"""The AVSBench-semantic release layout: metadata.csv -> one VideoRecord per clip.

One root holds ``metadata.csv`` (columns ``vid, uid, s_min, s_sec, a_obj, split, label``),
``label2idx.json`` and, per clip, ``{label}/{uid}/frames/{i}.jpg``, ``audio.wav``,
``labels_rgb/{i}.png`` (colour masks) and ``labels_semantic/{i}.png`` (index masks), i from 0.
``label`` is the set: ``v1s`` (the S4 clips, 5 frames; train labels frame 0 only), ``v1m``
(the MS3 clips, 5 frames, all labelled), ``v2`` (10 frames, all labelled).

The reference (avs_scripts/avss/color_dataloader.py) reads the CSV with pandas and keeps a
split's rows in CSV order; so does `read_avss` (through data/layout.read_meta_csv). Which
frames a clip has and which are labelled follow from its set and split (the reference's
"frame exists" and "has a label" flags). Paths are not checked here: `pack` checks every
clip and reports all problems at once.
"""
from __future__ import annotations

from pathlib import Path

from avs_dist.avss.classes import LABEL2IDX, read_label2idx
from avs_dist.data.layout import LayoutError, VideoRecord, read_meta_csv

META_CSV = "metadata.csv"
HEADER = ["vid", "uid", "s_min", "s_sec", "a_obj", "split", "label"]
REQUIRED = ["uid", "split", "label"]  # what the reference reads; the others may be empty
SETS = ("v1s", "v1m", "v2")
SET_FRAMES = {"v1s": 5, "v1m": 5, "v2": 10}
MAX_FRAMES = 10  # the reference pads every clip to 10 frames
AVSS_DIR = "AVSBench_semantic"  # where `avs-dist synth --subset avss` writes the release under --out


def avss_root(data_root: str | Path) -> Path:
    """The folder holding metadata.csv: `data_root` itself, or its AVSBench_semantic/ folder.
    LayoutError naming both places when neither has one."""
    data_root = Path(data_root)
    for root in (data_root, data_root / AVSS_DIR):
        if (root / META_CSV).is_file():
            return root
    raise LayoutError(f"no {META_CSV} in {data_root} or {data_root / AVSS_DIR}: --data-root must be the "
                      f"AVSBench-semantic release (the folder with {META_CSV}, {LABEL2IDX}, v1s/, v1m/, v2/) "
                      f"or the folder above it")


def parse_sets(text: str | list | tuple | None) -> tuple[str, ...]:
    """"v1s,v1m" (or a list) -> ("v1s", "v1m") in SETS order; None -> all sets.
    LayoutError for an unknown or empty set list."""
    if text is None:
        return SETS
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    unknown = [s for s in items if s not in SETS]
    if unknown or not [s for s in items if s]:
        raise LayoutError(f"--sets {','.join(items)!s}: expected a comma-separated list of {', '.join(SETS)}")
    return tuple(s for s in SETS if s in items)


def labelled_frames(clip_set: str, split: str) -> list[int]:
    """0-based frames with a ground-truth mask: v1s train frame 0 only, else every frame.
    (The reference's loss flag for v1s is [1, 0, 0, 0, 0] on every split, but its val/test
    metrics score all 5 masks, which the release has; so val/test keep all 5 here.)"""
    if clip_set == "v1s" and split == "train":
        return [0]
    return list(range(SET_FRAMES[clip_set]))


def read_classes(data_root: str | Path) -> tuple[str, ...]:
    """The 71 class names of the release's label2idx.json, in class-index order."""
    return read_label2idx(avss_root(data_root) / LABEL2IDX)


def read_avss(data_root: str | Path, sets=None) -> list[VideoRecord]:
    """One VideoRecord per metadata.csv row of the chosen `sets`, in CSV order.

    VideoRecord fields for AVSS: subset "avss", name = uid, category None, start None,
    frame_paths = frames/0.jpg .. (T-1).jpg (T = 5 for v1s / v1m, 10 for v2), mask_frames
    (labelled_frames), mask_paths = labels_rgb/{i}.png of those frames (what the reference
    reads), logmel_path None (the release has no .pkl), wav_path = audio.wav, row; extra:
    "set", "vid", "a_obj", "s_min", "s_sec", "num_frames", "semantic_paths"
    (labels_semantic/{i}.png of the same frames).
    Raises LayoutError for a bad CSV (read_meta_csv) or a label that is not a set."""
    root = avss_root(data_root)
    chosen = parse_sets(sets)
    csv_path = root / META_CSV
    records = []
    for i, row in read_meta_csv(csv_path, HEADER, required=REQUIRED):
        clip_set, uid, split = row["label"], row["uid"], row["split"]
        if clip_set not in SETS:
            raise LayoutError(f"{csv_path}: row {i + 2}: label {clip_set!r} is not one of the sets {', '.join(SETS)}")
        if clip_set not in chosen:
            continue
        d = root / clip_set / uid
        n = SET_FRAMES[clip_set]
        mask_frames = labelled_frames(clip_set, split)
        records.append(VideoRecord(
            subset="avss", name=uid, split=split, category=None, start=None,
            frame_paths=[d / "frames" / f"{k}.jpg" for k in range(n)],
            mask_paths=[d / "labels_rgb" / f"{k}.png" for k in mask_frames],
            mask_frames=mask_frames, logmel_path=None, wav_path=d / "audio.wav", row=i,
            extra={"set": clip_set, "vid": row["vid"], "a_obj": row["a_obj"], "s_min": row["s_min"],
                   "s_sec": row["s_sec"], "num_frames": n,
                   "semantic_paths": [d / "labels_semantic" / f"{k}.png" for k in mask_frames]},
        ))
    return records
