"""`avs-dist synth`: a synthetic dataset in the exact AVSBench-object layout.

Every path of ingestion (CSV readers, PNG frames and masks, wav, .pkl log-mel, labelImg
XML) runs on it, and it is a real audio-visual task: each frame shows 2-3 objects of
different classes on a textured background; a class has its own look (shape, colour,
pattern) and its own sound (two tones at class-specific mel bands, amplitude-modulated at a
class-specific rate). Only the sounding object(s) are in the mask, and the distractors are
classes that sound in other videos, so a model that ignores the audio cannot tell which
object to segment. Scenes come in twins: within a split, videos 2k and 2k+1 of the plan show
the same frames, but another object sounds in the second (and so the mask differs). A model
cannot fit the training masks by remembering the pictures, only by listening.

S4 (`Single-source/`): one sounding object among 2-3. MS3 (`Multi-sources/`): two sounding
objects among 3; the wav is the mix and the mask the union.
Boxes: labelImg XML of the sounding object(s) for every frame, written to
`{out}/boxes/{Single-source|Multi-sources}/{name}/{name}_{i}.xml` (one <object> per sounding
object), outside the AVSBench tree because AVSBench has no boxes; pack with
`--boxes {out}/boxes/Single-source`. The XML <path> is the frame's path relative to `out`
so that the files do not depend on where they are written.

Masks are clean 0 / 255: S4 grayscale ('L'), MS3 palette images ('P', a gray palette) whose
foreground index is 255, so the reference's ``convert('P')`` / 255 gives 1. With ``halo=W``
(``--halo-masks W``) every other video's masks get a W-pixel ring of value 3 around the
object (index 3 for MS3), the faint halo annotation exports leave: the reference reads it as
background in S4 (PIL's dithering) and as a 3/255 target in MS3, and `pack` reports those
masks as not clean.

`--subset avss` writes the AVSBench-semantic release instead (avs_dist/avss/synth.py: 5- and
10-frame clips, 71-class masks of the sounding objects, under `{out}/AVSBench_semantic/`).

`--raw-videos` also writes the clips as AVSBench ships them, `raw_videos/` mp4 files (H.264 +
AAC, one picture per second held for its second, the clip's sound) for `avs-dist extract`.

Same arguments and seed -> byte-identical files (the mp4s: the same ffmpeg build). Clips are 5 s, except every fourth video
(4.2 s), whose last log-mel example is a repeat, as in AVSBench.
"""
from __future__ import annotations

import argparse
import colorsys
import csv
import math
import shutil
import sys
import time
import wave
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from avs_dist.data import audio as audio_mod
from avs_dist.data import layout
from avs_dist.data.boxes import box_from_mask, write_voc_xml
from avs_dist.data.classes import S4_CLASSES
from avs_dist.helpformat import HelpFormatter

FRAMES = layout.FRAMES_PER_VIDEO
SUBSET_IDS = {"s4": 1, "ms3": 2}
BOX_DIR = "boxes"
SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "cross")
PATTERNS = ("solid", "hstripes", "vstripes", "checker")
NAME_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
SHORT_CLIP_S = 4.2
CLIP_S = 5.0
GRID = 3  # objects live in distinct cells of a GRID x GRID layout, so they never overlap
OBJECT_FRACTION = (0.20, 0.27)  # object side as a fraction of the frame side
NOISE_STD = 0.002
HALO_VALUE = 3


# ---------------------------------------------------------------------------------------
# what a class looks and sounds like (a pure function of its index)


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v))


def class_style(c: int) -> dict:
    """Shape, pattern and colours of class c. (shape, pattern) is unique for the 23 classes
    and each class has its own hue (class_pool spreads the classes it uses, so their hues are
    far apart). All class colours are saturated; backgrounds are nearly grey, so no
    background pixel matches one."""
    hue = c / 23.0
    return {
        "shape": SHAPES[c % len(SHAPES)],
        "pattern": PATTERNS[(c // len(SHAPES)) % len(PATTERNS)],
        "primary": _rgb(hue, 0.9, 0.95),
        "secondary": _rgb(hue, 0.9, 0.5),
    }


def class_colours(c: int) -> set[tuple[int, int, int]]:
    st = class_style(c)
    return {st["primary"]} if st["pattern"] == "solid" else {st["primary"], st["secondary"]}


def mel_band_centers_hz() -> np.ndarray:
    edges = np.linspace(audio_mod.hz_to_mel(audio_mod.MEL_LOW_HZ), audio_mod.hz_to_mel(audio_mod.MEL_HIGH_HZ),
                        audio_mod.NUM_BANDS + 2)
    return 700.0 * np.expm1(edges[1:-1] / 1127.0)


def class_bands(c: int) -> tuple[int, int]:
    """(main, second) mel band of class c: mains 8, 10, .., 52 are distinct; seconds are odd,
    so they never sit on another class's main band."""
    main = 8 + 2 * c
    return main, main + 5


def class_sound(c: int, seconds: float, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """16 kHz float samples of class c: a tone at the centre of its main band (jittered a
    fifth of a band in mel), a weaker one in its second band, modulated at 2-6 Hz."""
    n = int(round(seconds * audio_mod.SAMPLE_RATE))
    t = np.arange(n) / audio_mod.SAMPLE_RATE
    step = (audio_mod.hz_to_mel(audio_mod.MEL_HIGH_HZ) - audio_mod.hz_to_mel(audio_mod.MEL_LOW_HZ)) / (audio_mod.NUM_BANDS + 1)
    centers_mel = audio_mod.hz_to_mel(mel_band_centers_hz())
    out = np.zeros(n)
    for band, gain in zip(class_bands(c), (1.0, 0.4)):
        mel = centers_mel[band] + rng.uniform(-0.2, 0.2) * step
        f = 700.0 * math.expm1(mel / 1127.0)
        out += gain * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    rate, depth = 2.0 + (c % 5), 0.5
    envelope = (1.0 + depth * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))) / (1.0 + depth)
    return amplitude * envelope * out / 1.4


# ---------------------------------------------------------------------------------------
# pictures


def _shape_mask(shape: str, s: int) -> np.ndarray:
    img = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(img)
    e = s - 1
    if shape == "circle":
        d.ellipse([0, 0, e, e], fill=1)
    elif shape == "square":
        m = round(0.1 * s)
        d.rectangle([m, m, e - m, e - m], fill=1)
    elif shape == "triangle":
        d.polygon([(e / 2, 0), (e, e), (0, e)], fill=1)
    elif shape == "diamond":
        d.polygon([(e / 2, 0), (e, e / 2), (e / 2, e), (0, e / 2)], fill=1)
    elif shape == "hexagon":
        d.polygon([(e / 2 + e / 2 * math.cos(a), e / 2 + e / 2 * math.sin(a))
                   for a in np.arange(6) * math.pi / 3], fill=1)
    elif shape == "cross":
        a, b = round(s / 3), round(2 * s / 3) - 1
        d.rectangle([a, 0, b, e], fill=1)
        d.rectangle([0, a, e, b], fill=1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(img, dtype=bool)


def _pattern(style: dict, s: int) -> np.ndarray:
    period = max(2, s // 4)
    y, x = np.mgrid[0:s, 0:s] // period
    alt = {"solid": np.zeros((s, s), bool), "hstripes": y % 2 == 1, "vstripes": x % 2 == 1,
           "checker": (x + y) % 2 == 1}[style["pattern"]]
    return np.where(alt[..., None], np.array(style["secondary"], np.uint8), np.array(style["primary"], np.uint8))


def _background(rng: np.random.Generator, size: int, width: int | None = None) -> np.ndarray:
    """Low-saturation texture [size, width (default size), 3]: a grey-ish tint (channel
    spread <= 24) plus coarse and fine luminance noise added equally to all channels."""
    width = size if width is None else width
    base = rng.integers(80, 171) + rng.integers(-12, 13, size=3)
    coarse = rng.integers(-14, 15, size=(8, 8)).astype(np.float32)
    coarse = np.asarray(Image.fromarray(coarse, mode="F").resize((width, size), Image.BILINEAR))
    fine = rng.integers(-6, 7, size=(size, width))
    return (base[None, None, :] + np.round(coarse)[..., None] + fine[..., None]).astype(np.int32)


def place_objects(rng: np.random.Generator, size: int, classes: list[int]) -> list[dict]:
    """Each object of `classes` (style indices 0..22) gets its own grid cell of the size x size
    square, a side length and a drift that keeps all its positions inside the cell."""
    cell = size / GRID
    cells = rng.permutation(GRID * GRID)[: len(classes)]
    objects = []
    for c, cell_id in zip(classes, cells):
        side = max(4, int(round(rng.uniform(*OBJECT_FRACTION) * size)))
        side = min(side, int(cell) - 1)
        free = cell - side
        origin = np.array([cell_id % GRID, cell_id // GRID]) * cell
        drift = rng.uniform(-0.6, 0.6, size=2) * free
        lo = origin + np.maximum(0.0, -drift)
        hi = origin + free - np.maximum(0.0, drift)
        start = lo + rng.random(2) * (hi - lo)
        objects.append({"cls": int(c), "side": side, "start": start, "drift": drift})
    return objects


def render_video(rng: np.random.Generator, size: int, objects: list[dict], frames: int = FRAMES,
                 width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Frames uint8 [frames, size, width, 3] and an object-id map uint8 [frames, size, width]
    (0 = background, j + 1 = objects[j]); width defaults to size. With a wider frame the
    objects (placed in a size x size square) sit in its horizontal middle."""
    n_frames, width = frames, size if width is None else width
    shift = (width - size) // 2
    bg = _background(rng, size, width)
    frames = np.empty((n_frames, size, width, 3), np.uint8)
    ids = np.zeros((n_frames, size, width), np.uint8)
    sprites = []  # (shape mask, its pixels): the same in every frame
    for ob in objects:
        style = class_style(ob["cls"])
        shape = _shape_mask(style["shape"], ob["side"])
        sprites.append((shape, _pattern(style, ob["side"])[shape]))
    for t in range(n_frames):
        noise = rng.integers(-3, 4, size=(size, width, 1))
        frame = np.clip(bg + noise, 0, 255).astype(np.uint8)
        for j, (ob, (shape, pixels)) in enumerate(zip(objects, sprites)):
            s = ob["side"]
            x0, y0 = (int(round(v)) for v in ob["start"] + ob["drift"] * t / (n_frames - 1))
            x0, y0 = min(max(0, x0), size - s) + shift, min(max(0, y0), size - s)
            frame[y0:y0 + s, x0:x0 + s][shape] = pixels
            ids[t, y0:y0 + s, x0:x0 + s][shape] = j + 1
        frames[t] = frame
    return frames, ids


# ---------------------------------------------------------------------------------------
# dataset plan


def split_sizes(n: int) -> dict[str, int]:
    if n < 3:
        raise ValueError(f"--videos must be at least 3 (one per split), got {n}")
    val = max(1, round(0.15 * n))
    test = max(1, round(0.15 * n))
    return {"train": n - val - test, "val": val, "test": test}


def class_pool(n_train: int, classes: int | None = None) -> list[int]:
    """Classes used: `classes`, or by default about three train videos per class (2..23
    classes), spread evenly over the 23 so that their colours and sounds are far apart; never
    more than the train videos, so every class used appears in train. Few classes make the
    audio-visual association learnable from few videos (the demo and the learning test)."""
    k = min(23, n_train, max(3, n_train // 3)) if classes is None else min(23, n_train, classes)
    k = max(k, min(2, n_train))
    return sorted({int(i * 23 / k) for i in range(k)})


def _video_name(rng: np.random.Generator, dash: bool) -> str:
    chars = [NAME_ALPHABET[i] for i in rng.integers(0, len(NAME_ALPHABET), size=11)]
    if dash:  # names like "-_wznbUu3DY": a leading dash (breaks naive shells) and an underscore
        chars[0] = "-"
        chars[1 + int(rng.integers(0, 9))] = "_"
    return "".join(chars)


def plan_subset(subset: str, n: int, seed: int, classes: int | None = None) -> list[dict]:
    """One dict per video, in CSV order."""
    rng = np.random.default_rng([seed, SUBSET_IDS[subset], 0])
    sizes = split_sizes(n)
    pool = class_pool(sizes["train"], classes)
    videos, names = [], set()
    for split in layout.SPLITS:
        for k in range(sizes[split]):
            name = _video_name(rng, dash=len(videos) % 5 == 0)
            while name in names:
                name = _video_name(rng, dash=False)
            names.add(name)
            if k % 2 == 1:  # the twin of the previous video: the same scene, another object sounds
                twin = videos[-1]
                objects = twin["sounding"] + twin["distractors"]
                quiet = twin["distractors"]
                if subset == "s4":
                    sounding = [quiet[int(rng.integers(0, len(quiet)))]]
                else:
                    sounding = [quiet[0], twin["sounding"][int(rng.integers(0, 2))]]
                videos.append({"name": name, "split": split, "scene": twin["scene"], "objects": objects,
                               "sounding": sounding, "distractors": [c for c in objects if c not in sounding],
                               "start": int(rng.integers(0, 7))})
                continue
            main = pool[(k // 2) % len(pool)]
            others = [c for c in pool if c != main] + [c for c in range(len(S4_CLASSES)) if c not in pool]
            if subset == "s4":
                n_objects = 3 if rng.random() < 0.5 else 2
                sounding = [main]
            else:
                n_objects = 3
                sounding = [main, others[int(rng.integers(0, min(len(others), max(1, len(pool) - 1))))]]
            rest = [c for c in others if c not in sounding]
            n_pool_rest = len([c for c in rest if c in pool])
            if n_pool_rest >= n_objects - len(sounding):
                rest = [c for c in rest if c in pool]
            distractors = [int(rest[i]) for i in rng.permutation(len(rest))[: n_objects - len(sounding)]]
            videos.append({"name": name, "split": split, "scene": len(videos), "objects": sounding + distractors,
                           "sounding": sounding, "distractors": distractors,
                           "start": int(rng.integers(0, 7))})
    order = rng.permutation(len(videos))  # AVSBench CSVs are not grouped by split either
    videos = [videos[i] for i in order]
    for i, v in enumerate(videos):
        v["seconds"] = SHORT_CLIP_S if i % 4 == 1 else CLIP_S
        v["index"] = i
    return videos


# ---------------------------------------------------------------------------------------
# writing


def write_wav(path: Path, samples: np.ndarray) -> None:
    """16-bit mono 16 kHz wav of float samples (clipped to [-1, 1))."""
    pcm = np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2")
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(audio_mod.SAMPLE_RATE)
        w.writeframes(pcm.tobytes())


def _write_png(path: Path, img: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")


def halo_ring(mask: np.ndarray, width: int) -> np.ndarray:
    """bool [H,W]: the pixels within `width` pixels (chessboard distance) of the mask, outside it."""
    from PIL import ImageFilter

    grown = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * width + 1))
    return (np.asarray(grown) > 0) & ~mask


def _mask_image(mask: np.ndarray, subset: str, halo: int = 0) -> Image.Image:
    values = np.where(mask, 255, 0).astype(np.uint8)
    if halo:
        values[halo_ring(mask, halo)] = HALO_VALUE
    if subset == "s4":  # grayscale, read by the reference with convert('1')
        return Image.fromarray(values, mode="L")
    # MS3: a palette image read with convert('P') / 255, so the foreground index must be 255.
    img = Image.fromarray(values, mode="P")
    img.putpalette([v for i in range(256) for v in (i, i, i)])
    return img


def _write_csv(root: Path, subset: str, videos: list[dict]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ("s4_meta_data.csv" if subset == "s4" else "ms3_meta_data.csv"), "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        if subset == "s4":
            w.writerow(layout.S4_HEADER)
            for v in videos:
                w.writerow([v["name"], v["start"], S4_CLASSES[v["sounding"][0]], v["split"]])
        else:
            w.writerow(layout.MS3_HEADER)
            for v in videos:
                w.writerow([v["name"], v["split"]])


def write_subset(out: Path, subset: str, n: int, size: int, seed: int, xml: bool,
                 n_classes: int | None = None, halo: int = 0, raw_fps: str | None = None) -> dict:
    videos = plan_subset(subset, n, seed, n_classes)
    if raw_fps is not None:
        for v in videos:  # the reference extracts 10 - start < 5 frames from a clip with start > 5
            v["start"] = min(v["start"], 5)
    root = layout.subset_root(out, subset)
    _write_csv(root, subset, videos)
    records = layout.read_subset(out, subset)
    box_root = out / BOX_DIR / layout.SUBSET_DIRS[subset]
    for v, rec in zip(videos, records):
        rng = np.random.default_rng([seed, SUBSET_IDS[subset], 1, v["scene"]])
        frames, ids = render_video(rng, size, place_objects(rng, size, v["objects"]))
        sounding_ids = [v["objects"].index(c) + 1 for c in v["sounding"]]
        for t, path in enumerate(rec.frame_paths):
            _write_png(path, Image.fromarray(frames[t], mode="RGB"))
        video_halo = halo if v["index"] % 2 == 1 else 0
        for t, path in zip(rec.mask_frames, rec.mask_paths):
            _write_png(path, _mask_image(np.isin(ids[t], sounding_ids), subset, video_halo))
        rng = np.random.default_rng([seed, SUBSET_IDS[subset], 2, v["index"]])
        amp = 0.4 if subset == "s4" else 0.28
        wav = sum(class_sound(c, v["seconds"], rng, amp * rng.uniform(0.75, 1.0)) for c in v["sounding"])
        wav = wav + rng.normal(0.0, NOISE_STD, size=len(wav))
        write_wav(rec.wav_path, wav)
        if raw_fps is not None:
            from avs_dist.video.encode import write_clip

            write_clip(layout.raw_video_path(out, rec), frames, v["seconds"], fps=raw_fps, audio=wav)
        rec.logmel_path.parent.mkdir(parents=True, exist_ok=True)
        audio_mod.save_logmel_pkl(rec.logmel_path, audio_mod.logmel_from_wav(rec.wav_path))
        if xml:
            for t, frame_path in enumerate(rec.frame_paths):
                boxes = [{"name": S4_CLASSES[c], "box": box_from_mask(ids[t] == j)}
                         for j, c in zip(sounding_ids, v["sounding"])]
                write_voc_xml(box_root / rec.name / f"{rec.name}_{t + 1}.xml", frame_path.name, size, size,
                              [b for b in boxes if b["box"] is not None], folder=frame_path.parent.name,
                              image_path=frame_path.relative_to(out).as_posix())
        v["category"] = S4_CLASSES[v["sounding"][0]] if subset == "s4" else None
    return {
        "root": str(root),
        "boxes": str(box_root) if xml else None,
        "splits": {s: sum(v["split"] == s for v in videos) for s in layout.SPLITS},
        "classes": sorted({S4_CLASSES[c] for v in videos for c in v["sounding"]}),
        "videos": [{"name": v["name"], "split": v["split"], "scene": v["scene"], "category": v["category"],
                    "sounding": [S4_CLASSES[c] for c in v["sounding"]],
                    "distractors": [S4_CLASSES[c] for c in v["distractors"]],
                    "seconds": v["seconds"], "halo": halo if v["index"] % 2 == 1 else 0} for v in videos],
    }


def generate(out: str | Path, videos: int = 30, size: int = 224, subset: str = "both", seed: int = 0,
             xml: bool = True, force: bool = False, classes: int | None = None, halo: int = 0,
             raw_fps: str | None = None) -> dict:
    """Write the synthetic dataset under `out`; returns a summary (per subset: root, boxes
    folder, split sizes, classes, and every video's name, split, scene (the same number for
    twins), sounding and distractor classes, in CSV order). Refuses to write into an existing
    subset folder unless `force`, which first deletes that subset's folder and its boxes
    folder. `halo` > 0: every other video's masks get a ring of that many pixels of value 3
    (module docstring). `raw_fps` (e.g. "10" or "30000/1001"): also write each clip as
    `raw_videos/...mp4` (H.264 + AAC, video/encode.py) at that frame rate, each frame held for
    its second, with the clip's sound, for `avs-dist extract`; `start` is then at most 5 so that
    the reference's recipe takes 5 frames of every clip. subset "avss": the AVSBench-semantic
    release under `{out}/AVSBench_semantic` (avss/synth.py:write_avss; `videos` clips in all,
    no XML, halo or raw videos)."""
    if subset not in ("s4", "ms3", "both", "avss"):
        raise ValueError(f"subset must be s4, ms3, both or avss, got {subset!r}")
    if subset == "avss":
        return _generate_avss(Path(out), videos, size, seed, force, classes, halo, raw_fps)
    if size < 32:
        raise ValueError(f"size must be at least 32 px, got {size}")
    split_sizes(videos)  # rejects videos < 3
    if halo < 0:
        raise ValueError(f"halo must be >= 0 pixels, got {halo}")
    out = Path(out)
    subsets = ["s4", "ms3"] if subset == "both" else [subset]
    for s in subsets:
        targets = [layout.subset_root(out, s), out / BOX_DIR / layout.SUBSET_DIRS[s]]
        for d in targets:
            if d.exists():
                if not force:
                    raise FileExistsError(f"{d} already exists: choose another --out or pass --force to replace it")
                shutil.rmtree(d)
    summary = {"out": str(out), "seed": seed, "size": size, "videos_per_subset": videos, "subsets": {}}
    for s in subsets:
        summary["subsets"][s] = write_subset(out, s, videos, size, seed, xml, classes, halo, raw_fps)
    return summary


def _generate_avss(out: Path, videos: int, size: int, seed: int, force: bool, classes: int | None,
                   halo: int, raw_fps: str | None) -> dict:
    from avs_dist.avss.layout import AVSS_DIR
    from avs_dist.avss.synth import write_avss

    if halo or raw_fps is not None:
        raise ValueError("--halo-masks and --raw-videos are for s4 / ms3, not avss")
    root = out / AVSS_DIR
    if root.exists():
        if not force:
            raise FileExistsError(f"{root} already exists: choose another --out or pass --force to replace it")
        shutil.rmtree(root)
    return {"out": str(out), "seed": seed, "size": size, "videos_per_subset": videos,
            "subsets": {"avss": write_avss(out, videos, size, seed, classes)}}


# Defaults that depend on the subset: AVSBench-object sized, and AVSS tiny (its clips are 10 frames).
DEFAULT_VIDEOS = {"avss": 40}
DEFAULT_SIZE = {"avss": 64}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="avs-dist synth", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="dataset root (gets Single-source/, Multi-sources/, boxes/; "
                   "avss: AVSBench_semantic/)")
    p.add_argument("--videos", type=int, default=None,
                   help="videos per subset, split ~70/15/15 (default 30; avss: 40 clips over v1s, v1m, v2)")
    p.add_argument("--size", type=int, default=None,
                   help="frame side in pixels (default 224, like AVSBench; avss: 64 high, 5:4 wide)")
    p.add_argument("--subset", choices=("s4", "ms3", "both", "avss"), default="both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", type=int, default=None,
                   help="number of classes used (2..23; default about one per three train videos)")
    p.add_argument("--no-xml", action="store_true", help="do not write labelImg box XML")
    p.add_argument("--halo-masks", type=int, default=0, metavar="W",
                   help="give every other video's masks a W-pixel ring of value 3 (not clean 0/255; default 0)")
    p.add_argument("--raw-videos", action="store_true",
                   help="also write raw_videos/ (mp4, H.264 + AAC, with the sound) for `avs-dist extract`")
    p.add_argument("--raw-fps", default="10", help="frame rate of --raw-videos, e.g. 25 or 30000/1001")
    p.add_argument("--force", action="store_true", help="replace existing subset folders under --out")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        videos = args.videos if args.videos is not None else DEFAULT_VIDEOS.get(args.subset, 30)
        size = args.size if args.size is not None else DEFAULT_SIZE.get(args.subset, 224)
        summary = generate(args.out, videos=videos, size=size, subset=args.subset, seed=args.seed,
                           xml=not args.no_xml, force=args.force, classes=args.classes, halo=args.halo_masks,
                           raw_fps=args.raw_fps if args.raw_videos else None)
    except (ValueError, FileExistsError) as e:
        print(f"avs-dist synth: {e}", file=sys.stderr)
        return 2
    for s, info in summary["subsets"].items():
        if s == "avss":
            sets = "; ".join(f"{k} " + " / ".join(f"{n} {sp}" for sp, n in v.items()) for k, v in info["splits"].items())
            print(f"avss: {sets} clips, {len(info['classes'])} classes -> {info['root']}")
            continue
        splits = " / ".join(f"{n} {k}" for k, n in info["splits"].items())
        print(f"{s}: {splits} videos, {len(info['classes'])} classes -> {info['root']}")
        if info["boxes"]:
            print(f"{s}: box XML -> {info['boxes']}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
