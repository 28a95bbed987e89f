"""Reading a shard set written by `avs-dist pack`: manifest, checksums, videos.

``manifest.json`` (written last; its absence means the pack did not complete)::

    format "avs-dist-shards", schema_version 2, subset "s4" | "ms3" | "avss", created,
    classes        the 23 S4 classes in reference order (label = position); for avss the
                   71 classes of label2idx.json in class-index order (background first)
    sets           avss only: the sets packed (v1s, v1m, v2)
    options        packing options (image_format, jpeg_quality, crop_size, shard_videos,
                   boxes, skip_bad, data_root)
    splits         {split: {"videos": n, "shards": k}}
    shards         [{"file", "split", "videos", "keys", "sha256", "bytes"}] in split, CSV order;
                   avss entries add "num_frames" (each clip's frame count, in key order)
    skipped        [{"name", "split", "row", "problems": ["path: reason", ...]}]
    masks_not_clean  {"count": n, "of": masks packed, "files": [{"file", "pixels", "values"}]}:
                   masks that are not clean 0 / 255 (data/masks.py), in shard order

Schema 2 stores each mask as the reference's target times 255; schema 1 stored 0/1 masks
made by "any non-zero pixel is foreground", which is not the reference's rule: such a set
is refused with a request to re-pack.

``iter_videos(shard_dir, split)`` yields one dict per video, in CSV order:

    frames       uint8 [5,H,W,3]     the 5 frames, RGB, bit-identical to the source PNGs
    crops        uint8 [5,c,c,3]     sounding-object crops (box -> crop -> bilinear resize)
    masks        uint8 [M,H,W]       ground-truth masks (S4 train: M=1, else 5) as stored:
                                     the reference's float target is v / 255 (S4 0 / 255,
                                     MS3 the palette index; masks.mask_targets computes it)
    mask_frames  int64 [M]           0-based frame index of each mask
    audio        float32 [5,96,64]   VGGish log-mel (equal to the .pkl in float32)
    name, category (str or None for MS3), label (int, -1 for MS3), split,
    index        position in the split (CSV order; with --skip-bad, among packed videos)
    row          0-based row in the meta CSV
    boxes        float32 [5,4] (xmin, ymin, xmax, ymax), 0-based pixel corners, exclusive max
    box_source   list[5] of "xml" | "mask" | "nearest_mask" | "full_frame"
    audio_source "pkl" | "wav"

For an AVSS shard set (subset "avss") each clip is the dict of avss/samples.py:decode_clip:
frames uint8 [T,S,S,3] (T = 5 or 10, not padded), masks uint8 [M,S,S] class indices 0..70,
mask_frames int64 [M], audio float32 [T,96,64], object_boxes float32 [K,4],
object_classes int64 [K], object_frames int64 [K], num_frames, name (uid), vid, set, split,
index, row, subset, mask_source, audio_examples.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from avs_dist.data.layout import FRAMES_PER_VIDEO, SPLITS
from avs_dist.errors import UserError
from avs_dist.fileio import sha256_file

MANIFEST = "manifest.json"
SCHEMA_VERSION = 2


class ShardError(UserError, RuntimeError):
    """A shard set that is missing, incomplete, or does not match its manifest."""


def read_manifest(shard_dir: str | Path) -> dict:
    """The manifest of a complete shard set. ShardError if it is missing (incomplete pack)."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        hint = " (an incomplete pack: rerun avs-dist pack)" if Path(shard_dir).is_dir() else ""
        raise ShardError(f"{path} not found: {shard_dir} is not a complete shard set{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: unreadable manifest ({e})") from None
    if manifest.get("format") == "avs-dist-shards" and manifest.get("schema_version") == 1:
        raise ShardError(f"{path}: schema 1, packed by an older avs-dist whose masks are 0/1 by \"any non-zero "
                         f"pixel is foreground\", not the reference's PIL conversion; re-pack it "
                         f"(avs-dist pack --overwrite --out {shard_dir})")
    if manifest.get("format") != "avs-dist-shards" or manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(f"{path}: format {manifest.get('format')!r} schema {manifest.get('schema_version')!r}, "
                         f"expected 'avs-dist-shards' schema {SCHEMA_VERSION}")
    return manifest


def split_shards(shard_dir: str | Path, split: str, manifest: dict | None = None) -> list[dict]:
    """Manifest entries of one split's shards, in CSV order, with "path" added."""
    manifest = manifest or read_manifest(shard_dir)
    if split not in SPLITS:
        raise ShardError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
    return [dict(e, path=str(Path(shard_dir) / e["file"])) for e in manifest["shards"] if e["split"] == split]


def _shard_problem(path: Path, entry: dict, sha256: bool) -> str | None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path}: missing"
    except OSError as e:
        return f"{path}: unreadable ({e.strerror})"
    if not path.is_file():
        return f"{path}: not a regular file"
    if size != entry["bytes"]:
        what = "truncated: " if size < entry["bytes"] else ""
        return f"{path}: {what}{size} bytes, manifest says {entry['bytes']}"
    if sha256:
        try:
            digest = sha256_file(path)
        except OSError as e:
            return f"{path}: unreadable ({e.strerror})"
        if digest != entry["sha256"]:
            return f"{path}: sha256 {digest[:16]}..., manifest says {entry['sha256'][:16]}..."
    return None


def shard_problems(shard_dir: str | Path, splits=SPLITS, sha256: bool = False,
                   manifest: dict | None = None) -> tuple[int, list[str]]:
    """(shards checked, ["path: reason", ...]) for the shards of `splits` against the manifest:
    presence and size, and with `sha256` the full checksum (reads every byte)."""
    shard_dir = Path(shard_dir)
    manifest = manifest or read_manifest(shard_dir)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ShardError(f"unknown split {unknown[0]!r} (one of {', '.join(SPLITS)})")
    entries = [e for e in manifest["shards"] if e["split"] in splits]
    problems = [p for e in entries if (p := _shard_problem(shard_dir / e["file"], e, sha256)) is not None]
    return len(entries), problems


def check_shards(shard_dir: str | Path, splits=SPLITS, sha256: bool = False, manifest: dict | None = None) -> int:
    """Check, before a run starts, every shard of `splits` that it will read: present and of
    the manifest's size (cheap: one stat per shard), and with `sha256=True` also the full
    checksum (reads every byte; ``avs-dist inspect`` always does it).

    Returns the number of shards checked. Raises ShardError naming every bad file and why
    (missing, truncated / wrong size, sha256 mismatch), or the manifest's problem."""
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    checked, problems = shard_problems(shard_dir, splits, sha256, manifest)
    if problems:
        what = "size and sha256" if sha256 else "presence and size"
        raise ShardError(f"{len(problems)} of the {checked} {'/'.join(splits)} shards in {shard_dir} do not match "
                         f"{MANIFEST} ({what} checked); re-pack or restore them:\n  " + "\n  ".join(problems))
    return checked


def verify_shards(shard_dir: str | Path) -> dict:
    """Check every shard against the manifest (presence, size, sha256).

    Returns ``{"ok": bool, "checked": n, "problems": ["file: reason", ...],
    "extra": [shard-like files not in the manifest]}``.
    """
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    checked, problems = shard_problems(shard_dir, SPLITS, True, manifest)
    listed = {e["file"] for e in manifest["shards"]}
    extra = sorted(p.name for p in shard_dir.glob("*.tar*") if p.name not in listed)
    return {"ok": not problems, "checked": checked, "problems": problems, "extra": extra}


# ----------------------------------------------------------------------------- encoding


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _image_bytes(arr: np.ndarray, fmt: str, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    else:
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_members(index: int, stacks: dict, masks: np.ndarray, audio: np.ndarray, meta: dict,
                   image_format: str = "npy", jpeg_quality: int = 95) -> dict:
    """One WebDataset sample {"__key__": index as 6 digits, member: bytes}, the members
    decode_sample reads: each image stack {name: uint8 [N,H,W,3]} as `{name}s.npy` (image_format
    "npy") or `{name}0.png` .. (`png`) / `.jpg` (`jpeg`, at jpeg_quality); masks as uint8 and
    audio as float32 `.npy`; meta as sorted-key `meta.json`. S4 / MS3 (data/pack.py) and AVSS
    clips (avss/samples.py) are written by this one function."""
    sample = {"__key__": f"{index:06d}"}
    for name, stack in stacks.items():
        if image_format == "npy":
            sample[f"{name}s.npy"] = _npy_bytes(stack)
        else:
            ext = "png" if image_format == "png" else "jpg"
            for i, img in enumerate(stack):
                sample[f"{name}{i}.{ext}"] = _image_bytes(img, image_format, jpeg_quality)
    sample["masks.npy"] = _npy_bytes(masks.astype(np.uint8))
    sample["audio.npy"] = _npy_bytes(audio.astype(np.float32))
    sample["meta.json"] = json.dumps(meta, sort_keys=True).encode()
    return sample


# ----------------------------------------------------------------------------- decoding


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _image(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def stack_members(raw: dict, name: str, count: int = FRAMES_PER_VIDEO) -> np.ndarray:
    """The image stack `name` of a raw sample, uint8 [count,H,W,3], as encode_members wrote it
    (`{name}s.npy`, or `count` PNG / JPEG members). ShardError when it has none."""
    if f"{name}s.npy" in raw:
        return _npy(raw[f"{name}s.npy"])
    for ext in ("png", "jpg"):
        if f"{name}0.{ext}" in raw:
            return np.stack([_image(raw[f"{name}{i}.{ext}"]) for i in range(count)])
    raise ShardError(f"{raw.get('__url__')}: sample {raw.get('__key__')} has no {name}s")


def decode_sample(raw: dict, crops: bool = True) -> dict:
    """One raw WebDataset sample (suffix -> bytes) -> the video dict described above.

    crops=False: no "crops" key and nothing of the crops decoded (a model without a crop
    branch; read such samples with iter_raw(..., crops=False)). An AVSS clip (meta subset
    "avss") decodes to the dict avss/samples.py:decode_clip describes (no crops)."""
    try:
        meta = json.loads(raw["meta.json"])
        if meta.get("subset") == "avss":
            from avs_dist.avss.samples import decode_clip

            return decode_clip(raw, meta)
        video = {
            "frames": stack_members(raw, "frame"),
            **({"crops": stack_members(raw, "crop")} if crops else {}),
            "masks": _npy(raw["masks.npy"]),
            "mask_frames": np.asarray(meta["mask_frames"], dtype=np.int64),
            "audio": _npy(raw["audio.npy"]),
            "boxes": np.asarray(meta["boxes"], dtype=np.float32),
        }
    except KeyError as e:
        raise ShardError(f"{raw.get('__url__')}: sample {raw.get('__key__')} lacks {e.args[0]}") from None
    for k in ("name", "category", "label", "split", "index", "row", "box_source", "audio_source"):
        video[k] = meta[k]
    return video


def _is_crop(suffix: str) -> bool:
    return suffix.startswith("crop")  # crops.npy, crop0.png .. crop4.jpg


def _tar_members(paths: list[str], select_files):
    """{"fname", "data", "__url__"} per wanted member, then {} at the end of each file.

    Shards are local files: read with seeks (tarfile "r:"), a member that is not wanted
    is skipped without reading it, and a wanted one is read in one call; a stream reader
    reads everything in 10 KB pieces (3x the CPU for a shard's samples without crops)."""
    import tarfile

    for path in paths:
        try:
            with tarfile.open(path, mode="r:") as tar:
                while (info := tar.next()) is not None:
                    if info.isreg() and select_files(info.name):
                        yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": path}
                    tar.members = []  # the index of members read so far is not needed
        except tarfile.TarError as e:
            raise ShardError(f"{path}: unreadable shard ({e})") from None
        yield {}


def iter_raw(paths: list[str], select=None, crops: bool = True):
    """Raw samples (suffix -> bytes) of the given tar files, in order.

    `select(key) -> bool` picks samples by key before their bytes are read into memory;
    crops=False leaves the crop members out the same way.
    """
    from webdataset.tariterators import group_by_keys

    def select_files(fname: str) -> bool:
        key, _, suffix = fname.partition(".")
        return (select is None or select(key)) and (crops or not _is_crop(suffix))

    for path in paths:
        if not Path(path).is_file():
            raise ShardError(f"{path}: shard listed in the manifest is missing")
    return group_by_keys(_tar_members(paths, select_files))


def iter_videos(shard_dir: str | Path, split: str, crops: bool = True):
    """Every video of `split` as a dict of numpy arrays (see the module docstring), CSV order.

    crops=False: without the "crops" key (their bytes are not even read into memory)."""
    entries = split_shards(shard_dir, split)
    for raw in iter_raw([e["path"] for e in entries], crops=crops):
        yield decode_sample(raw, crops=crops)
