"""The AVSBench-object folder layout (S4 `Single-source/`, MS3 `Multi-sources/`).

Readers return one VideoRecord per CSV row, in CSV order, with every path the row implies.
They do not check that the files exist: `pack` validates each video and reports all
problems at once.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

FRAMES_PER_VIDEO = 5
SPLITS = ("train", "val", "test")
SUBSET_DIRS = {"s4": "Single-source", "ms3": "Multi-sources"}
S4_HEADER = ["name", "start", "category", "split"]
MS3_HEADER = ["video_id", "split"]


class LayoutError(ValueError):
    """The download root or its meta CSV does not look like AVSBench."""


@dataclass
class VideoRecord:
    subset: str  # "s4" | "ms3"
    name: str
    split: str
    category: str | None  # None for MS3
    start: int | None  # S4 only: seconds into the source clip
    frame_paths: list[Path]  # 5 frames, frame 1..5
    mask_paths: list[Path]  # masks that exist in this split (S4 train: frame 1 only)
    mask_frames: list[int]  # 0-based frame index of each mask
    logmel_path: Path  # .pkl, torch tensor [5, 1, 96, 64]
    wav_path: Path  # 16 kHz wav
    row: int  # 0-based row in the meta CSV (CSV order)
    extra: dict = field(default_factory=dict)


def subset_root(data_root: str | Path, subset: str) -> Path:
    if subset not in SUBSET_DIRS:
        raise LayoutError(f"unknown subset {subset!r} (s4 or ms3)")
    return Path(data_root) / SUBSET_DIRS[subset]


def _read_csv(path: Path, header: list[str]) -> list[dict]:
    if not path.is_file():
        raise LayoutError(f"{path}: meta CSV not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = [h.strip() for h in (reader.fieldnames or [])]
        if fields[: len(header)] != header:
            raise LayoutError(f"{path}: header is {fields}, expected {header}")
        rows = []
        for i, row in enumerate(reader):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            if row.get("split") not in SPLITS:
                raise LayoutError(f"{path}: row {i + 2}: split {row.get('split')!r} is not one of {SPLITS}")
            rows.append(row)
    return rows


def read_s4(data_root: str | Path) -> list[VideoRecord]:
    root = subset_root(data_root, "s4")
    rows = _read_csv(root / "s4_meta_data.csv", S4_HEADER)
    d = root / "s4_data"
    records = []
    for i, row in enumerate(rows):
        name, split, cat = row["name"], row["split"], row["category"]
        try:
            start = int(row["start"])
        except ValueError:
            raise LayoutError(f"{root / 's4_meta_data.csv'}: row {i + 2}: start {row['start']!r} is not an integer") from None
        frames_dir = d / "visual_frames" / split / cat / name
        masks_dir = d / "gt_masks" / split / cat / name
        mask_frames = [0] if split == "train" else list(range(FRAMES_PER_VIDEO))
        records.append(VideoRecord(
            subset="s4", name=name, split=split, category=cat, start=start,
            frame_paths=[frames_dir / f"{name}_{k + 1}.png" for k in range(FRAMES_PER_VIDEO)],
            mask_paths=[masks_dir / f"{name}_{k + 1}.png" for k in mask_frames],
            mask_frames=mask_frames,
            logmel_path=d / "audio_log_mel" / split / cat / f"{name}.pkl",
            wav_path=d / "audio_wav" / split / cat / f"{name}.wav",
            row=i,
        ))
    return records


def read_ms3(data_root: str | Path) -> list[VideoRecord]:
    root = subset_root(data_root, "ms3")
    rows = _read_csv(root / "ms3_meta_data.csv", MS3_HEADER)
    d = root / "ms3_data"
    records = []
    for i, row in enumerate(rows):
        vid, split = row["video_id"], row["split"]
        mask_frames = list(range(FRAMES_PER_VIDEO))
        records.append(VideoRecord(
            subset="ms3", name=vid, split=split, category=None, start=None,
            # No split folder for MS3 frames, and the literal ".mp4" stays in the file name.
            frame_paths=[d / "visual_frames" / vid / f"{vid}.mp4_{k + 1}.png" for k in range(FRAMES_PER_VIDEO)],
            mask_paths=[d / "gt_masks" / split / vid / f"{vid}_{k + 1}.png" for k in mask_frames],
            mask_frames=mask_frames,
            logmel_path=d / "audio_log_mel" / split / f"{vid}.pkl",
            wav_path=d / "audio_wav" / split / f"{vid}.wav",
            row=i,
        ))
    return records


def read_subset(data_root: str | Path, subset: str) -> list[VideoRecord]:
    subset_root(data_root, subset)  # rejects an unknown subset
    return read_s4(data_root) if subset == "s4" else read_ms3(data_root)
