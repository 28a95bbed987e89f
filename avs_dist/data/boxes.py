"""Bounding boxes of the sounding object: labelImg Pascal-VOC XML, or derived from masks.

Convention everywhere in avs-dist: a box is float (xmin, ymin, xmax, ymax) in 0-based
pixel-corner coordinates with an exclusive max, so it covers pixels xmin <= x < xmax and
`frame[ymin:ymax, xmin:xmax]` is the crop. Pascal VOC (what labelImg writes) uses 1-based
inclusive integer pixels, so a VOC box (xmin, ymin, xmax, ymax) becomes
(xmin - 1, ymin - 1, xmax, ymax), and the full W x H frame is (0, 0, W, H).
"""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from avs_dist.data.layout import FRAMES_PER_VIDEO, SUBSET_DIRS
from avs_dist.errors import UserError

# VOC tools disagree by one pixel at the image border (labelImg never writes 0, others
# write 0-based values): accept that much and clamp, reject anything further out.
_BORDER_TOLERANCE = 1.0


class BoxError(UserError, ValueError):
    """A box annotation that cannot be used (unparsable, incomplete, empty or off-image)."""


def _text(elem: ET.Element, tag: str, path: Path) -> str:
    child = elem.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise BoxError(f"{path}: missing <{tag}> in <{elem.tag}>")
    return child.text.strip()


def _number(elem: ET.Element, tag: str, path: Path) -> float:
    value = _text(elem, tag, path)
    try:
        number = float(value)
    except ValueError:
        raise BoxError(f"{path}: <{tag}> is {value!r}, not a number") from None
    if not math.isfinite(number):  # float() takes "nan" and "inf"; every comparison with NaN is False
        raise BoxError(f"{path}: <{tag}> is {value!r}, not a finite number")
    return number


def parse_voc_xml(path: str | Path) -> tuple[list[dict], tuple[int, int]]:
    """Parse a labelImg / Pascal-VOC file.

    Returns ([{"name": str, "box": (x0, y0, x1, y1)}, ...], (height, width)); boxes in the
    avs-dist convention (module docstring). BoxError names the file for unparsable XML, a
    missing size or coordinate, an empty box, or a box outside the image.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise BoxError(f"{path}: box XML not found") from None
    except (ET.ParseError, OSError) as e:
        raise BoxError(f"{path}: unparsable XML ({e})") from None
    if root.tag != "annotation":
        raise BoxError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    size = root.find("size")
    if size is None:
        raise BoxError(f"{path}: missing <size>")
    width, height = _number(size, "width", path), _number(size, "height", path)
    if width <= 0 or height <= 0 or width != int(width) or height != int(height):
        raise BoxError(f"{path}: image size {width}x{height} is not a positive integer size")
    width, height = int(width), int(height)
    objects = []
    for k, obj in enumerate(root.findall("object")):
        bb = obj.find("bndbox")
        if bb is None:
            raise BoxError(f"{path}: object {k} has no <bndbox>")
        vx0, vy0, vx1, vy1 = (_number(bb, t, path) for t in ("xmin", "ymin", "xmax", "ymax"))
        x0, y0, x1, y1 = vx0 - 1.0, vy0 - 1.0, vx1, vy1
        if x1 <= x0 or y1 <= y0:
            raise BoxError(f"{path}: object {k} has an empty box (VOC xmin={vx0:g} ymin={vy0:g} xmax={vx1:g} ymax={vy1:g})")
        t = _BORDER_TOLERANCE
        if x0 < -t or y0 < -t or x1 > width + t or y1 > height + t:
            raise BoxError(f"{path}: object {k} box (VOC xmin={vx0:g} ymin={vy0:g} xmax={vx1:g} ymax={vy1:g}) "
                           f"lies outside the {width}x{height} image")
        box = (max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1))
        if box[2] <= box[0] or box[3] <= box[1]:
            raise BoxError(f"{path}: object {k} box is empty inside the {width}x{height} image")
        name = obj.findtext("name", default="").strip()
        objects.append({"name": name, "box": box})
    return objects, (height, width)


def write_voc_xml(path: str | Path, filename: str, width: int, height: int, objects: list[dict],
                  folder: str | None = None, image_path: str | None = None) -> None:
    """Write a labelImg-style VOC file. `objects`: [{"name", "box"}] with boxes in the
    avs-dist convention and integer-valued corners; written as 1-based inclusive integers."""
    path = Path(path)
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder if folder is not None else path.parent.name
    ET.SubElement(root, "filename").text = filename
    ET.SubElement(root, "path").text = image_path if image_path is not None else filename
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "Unknown"
    size = ET.SubElement(root, "size")
    for tag, v in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(int(v))
    ET.SubElement(root, "segmented").text = "0"
    for obj in objects:
        x0, y0, x1, y1 = (int(round(float(v))) for v in obj["box"])
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise BoxError(f"{path}: box {obj['box']} is empty or outside the {width}x{height} image")
        o = ET.SubElement(root, "object")
        ET.SubElement(o, "name").text = str(obj["name"])
        ET.SubElement(o, "pose").text = "Unspecified"
        ET.SubElement(o, "truncated").text = "0"
        ET.SubElement(o, "difficult").text = "0"
        bb = ET.SubElement(o, "bndbox")
        for tag, v in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(bb, tag).text = str(v)
    ET.indent(root, space="\t")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ET.tostring(root, encoding="unicode").encode() + b"\n")


def box_from_mask(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight box of the non-zero pixels of an [H, W] mask; None if it has no foreground."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"box_from_mask expects an [H, W] mask, got shape {mask.shape}")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def union_box(boxes: list[tuple]) -> tuple[float, float, float, float]:
    b = np.asarray(boxes, dtype=np.float64)
    return (float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max()))


def xml_candidates(record, frame: int, xml_dir: str | Path) -> list[Path]:
    """Where the XML for 1-based `frame` of `record` may live under `xml_dir`, in lookup order.

    The seed's folder layout is unknown, so these are all accepted (first hit wins):
      {xml_dir}/{name}/{stem}.xml          {xml_dir}/{stem}.xml
    and the same below {xml_dir}/{split}/{category}/ (S4) or {xml_dir}/{split}/ (MS3),
    where stem is `{name}_{i}` and, for MS3, also `{name}.mp4_{i}` (the MS3 frame file name).
    Each of these is also tried below {xml_dir}/Single-source/ (S4) or
    {xml_dir}/Multi-sources/ (MS3), so `xml_dir` may be the folder that holds both subsets
    (`avs-dist synth` writes {out}/boxes/{Single-source|Multi-sources}/{name}/{name}_{i}.xml).
    """
    xml_dir = Path(xml_dir)
    name = record.name
    stems = [f"{name}_{frame}"]
    if record.subset == "ms3":
        stems.append(f"{name}.mp4_{frame}")
    roots = []
    for base in (xml_dir, xml_dir / SUBSET_DIRS.get(record.subset, "")):
        roots.append(base)
        if record.subset == "s4" and record.category:
            roots.append(base / record.split / record.category)
        elif record.subset == "ms3":
            roots.append(base / record.split)
    return [d for root in roots for stem in stems for d in (root / name / f"{stem}.xml", root / f"{stem}.xml")]


def _frame_size(frames_hw, k: int) -> tuple[int, int]:
    if len(frames_hw) == 2 and np.isscalar(frames_hw[0]):
        return int(frames_hw[0]), int(frames_hw[1])
    h, w = frames_hw[k]
    return int(h), int(w)


def boxes_for_video(record, frames_hw, masks: dict, xml_dir: str | Path | None = None
                    ) -> tuple[np.ndarray, list[str]]:
    """One box per frame of a video: float32 [5, 4] (avs-dist convention) and the source of each.

    `frames_hw`: (H, W) shared by the 5 frames, or a list of 5 (H, W). `masks`: 0-based frame
    index -> [H, W] mask (non-zero = sounding object), for the frames that have one.
    Per frame, in order:
      "xml"          a VOC file for the frame under `xml_dir` (see xml_candidates); with
                     several objects, the union box of all of them (MS3 labels each source);
      "mask"         the tight box of the frame's own non-empty mask;
      "nearest_mask" the tight box of the closest frame whose mask is non-empty (ties go to
                     the earlier frame) — S4 train has a mask for frame 1 only;
      "full_frame"   no foreground in any mask and no XML.
    An XML whose <size> differs from the frame is a BoxError (its boxes are in another
    image's coordinates); an XML with no <object> (labelImg saves those too) falls through
    to the mask rules.
    """
    mask_boxes = {}
    for k, m in masks.items():
        m = np.asarray(m)
        if m.shape != _frame_size(frames_hw, int(k)):
            raise BoxError(f"video {record.name!r}: mask of frame {int(k) + 1} is {m.shape[0]}x{m.shape[1]}, "
                           f"frame is {_frame_size(frames_hw, int(k))[0]}x{_frame_size(frames_hw, int(k))[1]}")
        box = box_from_mask(m)
        if box is not None:
            mask_boxes[int(k)] = box
    boxes, sources = [], []
    for k in range(FRAMES_PER_VIDEO):
        h, w = _frame_size(frames_hw, k)
        found = None
        if xml_dir is not None:
            found = next((p for p in xml_candidates(record, k + 1, xml_dir) if p.is_file()), None)
        objects = []
        if found is not None:
            objects, (xh, xw) = parse_voc_xml(found)
            if (xh, xw) != (h, w):
                raise BoxError(f"{found}: XML image size {xw}x{xh} differs from the frame size {w}x{h}")
        if objects:
            boxes.append(union_box([o["box"] for o in objects]))
            sources.append("xml")
        elif k in mask_boxes:
            boxes.append(mask_boxes[k])
            sources.append("mask")
        elif mask_boxes:
            nearest = min(mask_boxes, key=lambda j: (abs(j - k), j))
            boxes.append(_fit(mask_boxes[nearest], h, w))
            sources.append("nearest_mask")
        else:
            boxes.append((0.0, 0.0, float(w), float(h)))
            sources.append("full_frame")
    return np.asarray(boxes, dtype=np.float32), sources


def _fit(box, h: int, w: int) -> tuple[float, float, float, float]:
    """Clip a box borrowed from another frame to this frame; full frame if nothing is left."""
    x0, y0, x1, y1 = max(0.0, box[0]), max(0.0, box[1]), min(float(w), box[2]), min(float(h), box[3])
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else (0.0, 0.0, float(w), float(h))
