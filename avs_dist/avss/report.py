"""The per-class table of AVSS metrics (for `eval`'s output), from avss/metrics.py's result."""
from __future__ import annotations

from avs_dist.avss.metrics import NUM_CLASSES

# per-class columns: (result key, header)
_COLUMNS = (
    ("frames_gt", "frames_gt"),
    ("iou_frame", "iou_frame"),
    ("f_frame", "f_frame"),
    ("iou_dataset", "iou_dataset"),
    ("f_dataset", "f_dataset"),
    ("iou_avsbench", "iou_avsbench"),
    ("f_avsbench", "f_avsbench"),
)
# the summary lines under the table
SUMMARY_KEYS = (
    "miou_frame_objects", "f_frame_objects", "miou_dataset_objects", "f_dataset_objects",
    "iou_frame_background", "iou_dataset_background",
    "miou_frame_all71", "miou_dataset_all71", "miou_avsbench", "f_avsbench",
)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_per_class(result: dict, class_names: list[str] | None = None) -> str:
    """A plain-text table: one row per class that is labelled or predicted in a scored frame.

    `result`: avss.metrics.summarize's dict (its ``per_class`` list of 71 entries).
    `class_names`: 71 names, index 0 = background (label2idx.json order); without them the
    table shows indices only. Columns: idx, class, frames_gt (scored frames labelled with the
    class), iou/f at frame and dataset level (``-``: undefined), the reference's iou/f;
    then one line naming the classes in no frame, and the summary figures. Raises ValueError
    when `class_names` is not 71 names.
    """
    if class_names is not None and len(class_names) != NUM_CLASSES:
        raise ValueError(f"class_names has {len(class_names)} names, expected {NUM_CLASSES} (index 0 = background)")
    header = ["idx"] + (["class"] if class_names else []) + [h for _, h in _COLUMNS]
    rows, unseen = [], []
    for entry in result["per_class"]:
        k = entry["index"]
        if entry["frames_union"] == 0:
            unseen.append(class_names[k] if class_names else str(k))
            continue
        rows.append([str(k)] + ([class_names[k]] if class_names else []) + [_cell(entry[key]) for key, _ in _COLUMNS])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    text_cols = 2 if class_names else 1  # idx and class left-aligned, numbers right-aligned

    def line(cells):
        return "  ".join(c.ljust(w) if i < text_cols else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header)] + [line(r) for r in rows]
    if unseen:
        out.append(f"not in any scored frame ({len(unseen)} classes): {', '.join(unseen)}")
    out.append(f"scored frames {result['frames_scored']}, padded {result['frames_padded']}, "
               f"unlabelled {result['frames_unlabelled']}; classes present {result['classes_present']} "
               f"({result['objects_present']} objects)")
    width = max(len(k) for k in SUMMARY_KEYS)
    out += [f"{k.ljust(width)}  {_cell(result[k])}" for k in SUMMARY_KEYS]
    return "\n".join(out)
