"""The 71 AVSBench-semantic classes, label2idx.json, and colour masks -> class indices.

Class index = label2idx.json value - 1, so "background" (value 1) is class 0 and "woman"
(value 71) is class 70 (docs/avsbench-format, "AVSBench-semantic"). The release's colour
masks (`labels_rgb/*.png`) paint class j in colour j of the PASCAL-VOC bit-interleaved
palette: bit k of j's three low bits goes to bit 7 - k of R, G, B in turn (the reference's
`get_v2_pallete` in avs_scripts/avss/color_dataloader.py), so 0 = (0, 0, 0), 1 = (128, 0, 0),
2 = (0, 128, 0), 3 = (128, 128, 0), ... The reference decodes a mask by comparing every pixel
with every palette colour and taking the argmax, so a colour that is in no palette entry is
class 0 (background); `colour_to_index` gives the same result with one table lookup.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from avs_dist.data.layout import LayoutError

NUM_CLASSES = 71
BACKGROUND = 0
LABEL2IDX = "label2idx.json"

# label2idx.json of the AVSS release in index order: "background" first, then the 70 sounding
# classes alphabetically (as the release's file lists them, values 1..71).
AVSS_CLASSES = (
    "background", "accordion", "airplane", "axe", "baby", "bassoon", "bell", "bird", "boat", "boy",
    "bus", "car", "cat", "cello", "clarinet", "clipper", "clock", "dog", "donkey", "drum", "duck",
    "elephant", "emergency-car", "erhu", "flute", "frying-food", "girl", "goose", "guitar", "gun",
    "guzheng", "hair-dryer", "handpan", "harmonica", "harp", "helicopter", "hen", "horse", "keyboard",
    "leopard", "lion", "man", "marimba", "missile-rocket", "motorcycle", "mower", "parrot", "piano",
    "pig", "pipa", "saw", "saxophone", "sheep", "sitar", "sorna", "squirrel", "tabla", "tank", "tiger",
    "tractor", "train", "trombone", "truck", "trumpet", "tuba", "ukulele", "utv", "vacuum-cleaner",
    "violin", "wolf", "woman",
)


def read_label2idx(path: str | Path) -> tuple[str, ...]:
    """The class names of an AVSS label2idx.json in class-index order (index = value - 1).

    Raises LayoutError naming the file when it is missing, not JSON, not an object of
    name -> integer, or its values are not exactly 1..71 (the reference's palette has 71
    colours and asserts that the file has as many classes)."""
    path = Path(path)
    if not path.is_file():
        raise LayoutError(f"{path}: not found; the AVSS release keeps label2idx.json beside metadata.csv "
                          f"(class name -> 1..{NUM_CLASSES}, background 1)")
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LayoutError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(table, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in table.values()):
        raise LayoutError(f"{path}: expected a JSON object of class name -> integer 1..{NUM_CLASSES}")
    values = sorted(table.values())
    if values != list(range(1, NUM_CLASSES + 1)):
        missing = sorted(set(range(1, NUM_CLASSES + 1)) - set(values))[:5]
        raise LayoutError(f"{path}: {len(table)} classes with values {values[:3]}..{values[-3:] if values else []}, "
                          f"expected each of 1..{NUM_CLASSES} once (missing {missing})")
    names = [None] * NUM_CLASSES
    for name, value in table.items():
        names[value - 1] = name
    return tuple(names)


def palette(n: int = NUM_CLASSES) -> np.ndarray:
    """uint8 [n, 3]: colour of class j = bits of j interleaved into R, G, B from bit 7 down
    (the PASCAL-VOC palette, as the reference's get_v2_pallete builds it)."""
    out = np.zeros((n, 3), np.uint8)
    for j in range(n):
        lab, bit = j, 7
        while lab > 0:
            for ch in range(3):
                out[j, ch] |= ((lab >> ch) & 1) << bit
            bit -= 1
            lab >>= 3
    return out


def _keys(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def colour_to_index(rgb: np.ndarray, n: int = NUM_CLASSES) -> tuple[np.ndarray, int]:
    """Colour mask uint8 [H, W, 3] -> (class indices uint8 [H, W], pixels whose colour is in no
    palette entry). Those pixels are class 0, as the reference's argmax over all-False
    equality maps makes them."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"colour mask must be [H, W, 3], got shape {list(rgb.shape)}")
    table = _keys(palette(n))
    order = np.argsort(table)
    keys = _keys(rgb)
    pos = np.clip(np.searchsorted(table[order], keys), 0, n - 1)
    found = table[order][pos] == keys
    index = np.where(found, order[pos], BACKGROUND).astype(np.uint8)
    return index, int((~found).sum())


def index_to_colour(index: np.ndarray, n: int = NUM_CLASSES) -> np.ndarray:
    """Class indices (any integer array, values 0..n-1) -> uint8 [..., 3] palette colours.
    ValueError for an index outside 0..n-1."""
    index = np.asarray(index)
    if index.size and (index.min() < 0 or index.max() >= n):
        raise ValueError(f"class index outside 0..{n - 1}: {index.min()}..{index.max()}")
    return palette(n)[index]
