"""The AVSBench-object folder layout (S4 `Single-source/`, MS3 `Multi-sources/`).

Readers return one VideoRecord per CSV row, in CSV order, with every path the row implies.
They do not check that the files exist: `pack` validates each video and reports all
problems at once.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from avs_dist.errors import UserError

FRAMES_PER_VIDEO = 5
SPLITS = ("train", "val", "test")
SUBSET_DIRS = {"s4": "Single-source", "ms3": "Multi-sources"}
S4_HEADER = ["name", "start", "category", "split"]
MS3_HEADER = ["video_id", "split"]


class LayoutError(UserError, ValueError):
    """The download root or its meta CSV does not look like AVSBench."""


@dataclass
class VideoRecord:
    subset: str  # "s4" | "ms3" | "avss" (avss/layout.py)
    name: str
    split: str
    category: str | None  # None for MS3
    start: int | None  # S4 only: seconds into the source clip
    frame_paths: list[Path]  # 5 frames, frame 1..5 (AVSS: T = 5 or 10, frames/0.jpg ..)
    mask_paths: list[Path]  # masks that exist in this split (S4 train: frame 1 only)
    mask_frames: list[int]  # 0-based frame index of each mask
    logmel_path: Path | None  # .pkl, torch tensor [5, 1, 96, 64] (AVSS: None, the release has none)
    wav_path: Path  # 16 kHz wav
    row: int  # 0-based row of the meta CSV's table (CSV order; "row {row + 2}" in messages)
    extra: dict = field(default_factory=dict)


def subset_root(data_root: str | Path, subset: str) -> Path:
    if subset not in SUBSET_DIRS:
        raise LayoutError(f"unknown subset {subset!r} (s4 or ms3)")
    return Path(data_root) / SUBSET_DIRS[subset]


def _decode_problem(path: Path) -> str:
    """Where and why the file is not UTF-8 (pandas' default encoding, as the reference reads it)."""
    raw = path.read_bytes()
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "UTF-16 text (a spreadsheet's 'Unicode text'); save it as 'CSV UTF-8'"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        return (f"not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} (line {line}) "
                f"({e.reason}); save it as 'CSV UTF-8'")
    return "not UTF-8 text"


def _parser_hint(message: str) -> str:
    # pandas counts this one from 0 (its field-count errors say "line N" from 1).
    m = re.search(r"EOF inside string starting at row (\d+)", message)
    return f": a quote opened on line {int(m.group(1)) + 1} is never closed" if m else ""


def _header_hint(fields: list[str]) -> str:
    first = fields[0] if fields else ""
    for sep, name in ((";", "semicolons"), ("\t", "tabs")):
        if sep in first:
            return f" (the fields are separated by {name}; the reference reads commas: save it as comma-separated CSV)"
    return ""


def read_meta_csv(path: str | Path, header: list[str],
                  required: list[str] | None = None) -> list[tuple[int, dict[str, str]]]:
    """The rows of an AVSBench meta CSV as the reference reads them: ``pandas.read_csv(path,
    sep=',')`` (so a UTF-8 byte-order mark, CRLF or CR line ends, quoted fields and blank
    lines read cleanly), with two deliberate differences:

    * every field is its literal text (``dtype=str, keep_default_na=False``): pandas' default
      would turn a name like ``NA``, ``null`` or ``nan`` into NaN and ``00123`` or ``1e5``
      into a number, i.e. a path the reference cannot find;
    * surrounding whitespace is stripped (no AVSBench field has any; the reference would look
      for a folder named with it), and a row whose fields are all empty (the ``,,,`` rows a
      spreadsheet leaves; the reference's split filter drops them) is skipped.

    Returns [(row position in the table, {column: text})] in CSV order, with at least the
    `header` columns (extra columns after them are kept). "row N" in errors counts the
    header as row 1, as a spreadsheet does (pandas skips blank lines: they are not counted).
    `required`: the columns that may not be empty (default: all of `header`).
    Raises LayoutError naming the file (and the row where there is one): not found, not UTF-8,
    unparsable (pandas' message, with its line), wrong header, rows with more fields than the
    header, an empty field, or a split other than train / val / test.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise LayoutError(f"{path}: meta CSV not found")
    try:
        df = pd.read_csv(path, sep=",", dtype=str, keep_default_na=False)
    except UnicodeDecodeError:
        raise LayoutError(f"{path}: {_decode_problem(path)}") from None
    except pd.errors.EmptyDataError:
        raise LayoutError(f"{path}: empty file, expected the header {','.join(header)}") from None
    except pd.errors.ParserError as e:
        raise LayoutError(f"{path}: unparsable CSV (pandas: {str(e).strip()}){_parser_hint(str(e))}") from None
    fields = [str(c).strip() for c in df.columns]
    if fields[: len(header)] != header:
        raise LayoutError(f"{path}: header is {fields}, expected {header}{_header_hint(fields)}")
    if not isinstance(df.index, pd.RangeIndex):
        raise LayoutError(
            f"{path}: row 2 has {len(fields) + df.index.nlevels} fields but the header has {len(fields)}: "
            f"pandas then reads the first column as the row index and shifts every column (the reference "
            f"would read the wrong fields); remove the extra fields (often trailing commas)")
    rows = []
    for i, values in enumerate(df.itertuples(index=False, name=None)):
        values = [v.strip() if isinstance(v, str) else "" for v in values]
        if not any(values):
            continue
        row = dict(zip(fields, values))
        for col in header if required is None else required:
            if not row[col]:
                raise LayoutError(f"{path}: row {i + 2}: empty {col!r} field")
        if row["split"] not in SPLITS:
            raise LayoutError(f"{path}: row {i + 2}: split {row['split']!r} is not one of {SPLITS}")
        rows.append((i, row))
    return rows


def _start_seconds(value: str, path: Path, row: int) -> int:
    """`start` as pandas' numeric parsing reads it (" 3", "3.0", "+3" are 3), if integral."""
    import pandas as pd

    number = pd.to_numeric(pd.Series([value]), errors="coerce").iloc[0]
    if pd.isna(number) or not float(number).is_integer():
        raise LayoutError(f"{path}: row {row + 2}: start {value!r} is not a whole number of seconds")
    return int(number)


def read_s4(data_root: str | Path) -> list[VideoRecord]:
    root = subset_root(data_root, "s4")
    csv_path = root / "s4_meta_data.csv"
    d = root / "s4_data"
    records = []
    for i, row in read_meta_csv(csv_path, S4_HEADER):
        name, split, cat = row["name"], row["split"], row["category"]
        start = _start_seconds(row["start"], csv_path, i)
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
    d = root / "ms3_data"
    records = []
    for i, row in read_meta_csv(root / "ms3_meta_data.csv", MS3_HEADER):
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


def raw_video_path(data_root: str | Path, record: VideoRecord) -> Path:
    """Where the release keeps the trimmed clip of a record: S4
    `s4_data/raw_videos/{split}/{category}/{name}.mp4`, MS3 `ms3_data/raw_videos/{video_id}.mp4`
    (no split folder)."""
    root = subset_root(data_root, record.subset)
    if record.subset == "s4":
        return root / "s4_data" / "raw_videos" / record.split / record.category / f"{record.name}.mp4"
    return root / "ms3_data" / "raw_videos" / f"{record.name}.mp4"
