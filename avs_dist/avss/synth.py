"""`avs-dist synth --subset avss`: a synthetic AVSBench-semantic release, in its exact layout.

Under ``{out}/AVSBench_semantic/``: ``metadata.csv`` (vid, uid, s_min, s_sec, a_obj, split,
label), ``label2idx.json`` (the release's 71 classes, "background": 1 first), and per clip
``{set}/{uid}/frames/{i}.jpg``, ``audio.wav``, ``labels_rgb/{i}.png`` (palette colours, RGB)
and ``labels_semantic/{i}.png`` (class indices, a 'P' image with the same palette).

The task is the existing synth's (data/synth.py) with classes: a few AVSS classes are used,
each with its own look (shape, pattern, hue) and its own sound (tones in its own mel bands);
every frame shows 2-3 objects, and a mask paints only the sounding object(s), each with its
class. The silent objects are classes that sound in other clips, and clips come in twins
(the same frames, another object sounding), so the masks cannot be fitted without listening.
Sets: v1s (5 frames, one sounding object; train labels frame 0 only), v1m (5 frames, two
sounding objects), v2 (10 frames, one or two sounding objects). Frames are 5:4 landscape
(size high, 5 * size // 4 wide) so that the reference's train crop and val/test resize
differ. Every fifth v1s clip lasts 4.2 s (4 log-mel examples: the fifth is the reference's
zero padding), every fifth v2 clip 9.5 s (9 examples).

What is not known of the real release and is invented here: the uid pattern
``{vid}_{start ms}_{end ms}`` and ``a_obj`` as the sounding classes joined by "_".
Same arguments and seed -> byte-identical files.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from avs_dist.avss.classes import AVSS_CLASSES, LABEL2IDX, NUM_CLASSES, palette
from avs_dist.avss.layout import AVSS_DIR, META_CSV, HEADER, SET_FRAMES, SETS, labelled_frames
from avs_dist.data import layout
from avs_dist.data.synth import (NAME_ALPHABET, NOISE_STD, class_sound, place_objects, render_video, split_sizes,
                                 write_wav)

SUBSET_ID = 3  # seeds the generator apart from S4 (1) and MS3 (2)
SOUNDING = {"v1s": (1, 1), "v1m": (2, 2), "v2": (1, 2)}  # sounding objects: first twin's rule (k//2 even, odd)
SHORT_SECONDS = {"v1s": 4.2, "v1m": 5.0, "v2": 9.5}
STYLES = 23  # data/synth.py's looks and sounds: 23 distinct ones


def set_sizes(n: int) -> dict[str, int]:
    """Clips per set: n split as evenly as possible, v2 first to get the remainder."""
    if n < 3 * len(SETS):
        raise ValueError(f"--videos must be at least {3 * len(SETS)} for avss (one clip per split and set), got {n}")
    base, extra = divmod(n, len(SETS))
    return {s: base + (1 if i < extra else 0) for i, s in enumerate(reversed(SETS))}


def class_pool(n_train: int, classes: int | None = None) -> list[int]:
    """AVSS class indices used (1..70): `classes`, or about one per four train clips (3..8),
    spread over the 70 sounding classes."""
    k = max(3, min(8, n_train // 4)) if classes is None else classes
    if not 2 <= k <= STYLES:
        raise ValueError(f"--classes must be 2..{STYLES} for avss, got {k}")
    return [1 + int(i * (NUM_CLASSES - 1) / k) for i in range(k)]


def class_styles(pool: list[int]) -> dict[int, int]:
    """AVSS class -> data/synth.py style index (look and sound), spread over the 23 styles."""
    return {c: int(i * STYLES / len(pool)) for i, c in enumerate(pool)}


def _vid(rng: np.random.Generator) -> str:
    return "".join(NAME_ALPHABET[i] for i in rng.integers(0, len(NAME_ALPHABET), size=11))


def plan_avss(n: int, seed: int, classes: int | None = None) -> list[dict]:
    """One dict per clip, in metadata.csv order: vid, uid, set, split, scene (the same for
    twins), objects / sounding / distractors (AVSS class indices), seconds, start."""
    rng = np.random.default_rng([seed, SUBSET_ID, 0])
    per_set = set_sizes(n)
    sizes = {s: split_sizes(per_set[s]) for s in SETS}
    pool = class_pool(sum(sz["train"] for sz in sizes.values()), classes)
    clips, uids = [], set()
    for clip_set in SETS:
        for split in layout.SPLITS:
            for k in range(sizes[clip_set][split]):
                vid = _vid(rng)
                start = int(rng.integers(0, 30))
                uid = f"{vid}_{start * 1000}_{(start + SET_FRAMES[clip_set]) * 1000}"
                while uid in uids:
                    uid = f"{_vid(rng)}_{start * 1000}_{(start + SET_FRAMES[clip_set]) * 1000}"
                uids.add(uid)
                if k % 2 == 1:  # the twin: the previous clip's scene, another object sounds
                    twin = clips[-1]
                    quiet = twin["distractors"]
                    if len(twin["sounding"]) == 1:
                        sounding = [quiet[int(rng.integers(0, len(quiet)))]]
                    else:
                        sounding = [quiet[0], twin["sounding"][int(rng.integers(0, 2))]]
                    objects = twin["objects"]
                    scene = twin["scene"]
                else:
                    n_sounding = SOUNDING[clip_set][(k // 2) % 2]
                    main = pool[(k // 2 + len(clips)) % len(pool)]
                    others = [c for c in pool if c != main]
                    picked = [others[i] for i in rng.permutation(len(others))]
                    n_objects = 3 if n_sounding == 2 or rng.random() < 0.5 else 2
                    sounding = [main] + picked[: n_sounding - 1]
                    objects = sounding + picked[n_sounding - 1: n_objects - 1]
                    scene = len(clips)
                clips.append({"vid": vid, "uid": uid, "set": clip_set, "split": split, "scene": scene,
                              "objects": objects, "sounding": sounding,
                              "distractors": [c for c in objects if c not in sounding], "start": start})
    clips = [clips[i] for i in rng.permutation(len(clips))]  # the release's CSV is not grouped either
    seen = {s: 0 for s in SETS}
    for i, c in enumerate(clips):
        short = seen[c["set"]] % 5 == 1
        seen[c["set"]] += 1
        c["seconds"] = SHORT_SECONDS[c["set"]] if short else float(SET_FRAMES[c["set"]])
        c["index"] = i
    return clips


def _label_images(index: np.ndarray) -> tuple[Image.Image, Image.Image]:
    """Class indices uint8 [H, W] -> (labels_rgb RGB image, labels_semantic 'P' image)."""
    pal = palette()
    semantic = Image.fromarray(index, mode="P")
    semantic.putpalette(pal.reshape(-1).tolist() + [0] * (768 - pal.size))
    return Image.fromarray(pal[index], mode="RGB"), semantic


def _save(path: Path, img: Image.Image, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)


def write_avss(out: str | Path, videos: int = 40, size: int = 64, seed: int = 0,
               classes: int | None = None) -> dict:
    """Write the synthetic release under ``{out}/AVSBench_semantic``; returns a summary: root,
    clips per set and split, classes used (names), and every clip's uid, set, split, scene,
    sounding and distractor class names, seconds, in CSV order. The caller makes sure the
    folder does not exist yet (data/synth.py:generate)."""
    if size < 32:
        raise ValueError(f"size must be at least 32 px, got {size}")
    clips = plan_avss(videos, seed, classes)
    styles = class_styles(sorted({c for clip in clips for c in clip["objects"]}))
    root = Path(out) / AVSS_DIR
    root.mkdir(parents=True, exist_ok=True)
    (root / LABEL2IDX).write_text(json.dumps({name: i + 1 for i, name in enumerate(AVSS_CLASSES)}, indent=4) + "\n")
    with open(root / META_CSV, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(HEADER)
        for c in clips:
            w.writerow([c["vid"], c["uid"], c["start"] // 60, c["start"] % 60,
                        "_".join(AVSS_CLASSES[k] for k in c["sounding"]), c["split"], c["set"]])
    width = 5 * size // 4
    for c in clips:
        n = SET_FRAMES[c["set"]]
        d = root / c["set"] / c["uid"]
        rng = np.random.default_rng([seed, SUBSET_ID, 1, c["scene"]])
        frames, ids = render_video(rng, size, place_objects(rng, size, [styles[k] for k in c["objects"]]),
                                   frames=n, width=width)
        semantic = np.zeros(ids.shape, np.uint8)
        for k in c["sounding"]:
            semantic[ids == c["objects"].index(k) + 1] = k
        for t in range(n):
            _save(d / "frames" / f"{t}.jpg", Image.fromarray(frames[t]), format="JPEG", quality=90)
        for t in labelled_frames(c["set"], c["split"]):
            rgb, sem = _label_images(semantic[t])
            _save(d / "labels_rgb" / f"{t}.png", rgb, format="PNG")
            _save(d / "labels_semantic" / f"{t}.png", sem, format="PNG")
        rng = np.random.default_rng([seed, SUBSET_ID, 2, c["index"]])
        amp = 0.4 if len(c["sounding"]) == 1 else 0.28
        wav = sum(class_sound(styles[k], c["seconds"], rng, amp * rng.uniform(0.75, 1.0)) for k in c["sounding"])
        write_wav(d / "audio.wav", wav + rng.normal(0.0, NOISE_STD, size=len(wav)))
    return {
        "root": str(root),
        "splits": {s: {sp: sum(c["set"] == s and c["split"] == sp for c in clips) for sp in layout.SPLITS}
                   for s in SETS},
        "classes": sorted({AVSS_CLASSES[k] for c in clips for k in c["sounding"]}),
        "videos": [{"name": c["uid"], "vid": c["vid"], "set": c["set"], "split": c["split"], "scene": c["scene"],
                    "sounding": [AVSS_CLASSES[k] for k in c["sounding"]],
                    "distractors": [AVSS_CLASSES[k] for k in c["distractors"]],
                    "seconds": c["seconds"], "num_frames": SET_FRAMES[c["set"]]} for c in clips],
    }
