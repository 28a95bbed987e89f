"""The reference recipe itself, as AVSBench's `preprocess_s4.py` / `preprocess_ms3.py` run it.

Facts in docs/avsbench-format §1 "From raw videos": imageio's ffmpeg reader decodes every
frame as RGB, each is resized with `cv2.resize(frame, (224, 224))`, the frame of second l is
`int(l*fps + (15/16)*fps)` (fps = int(round(reader fps))) clamped to the last frame, saved with
`cv2.imwrite` of the BGR conversion; the audio is `VideoFileClip(mp4).audio.write_audiofile(wav,
fps=16000)` (moviepy 1.x). This module is the oracle of the tests and of `avs-dist bench
extract`; `avs-dist extract` (extract.py) must produce the same pixels and samples, faster.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from avs_dist.video.timing import frame_indices, reference_fps


def reference_frames(path: str | Path, seconds: int, size: int = 224) -> list[np.ndarray]:
    """The reference's frames of a clip: `seconds` uint8 RGB [size, size, 3] arrays (every
    frame decoded and resized, then the kept ones picked, as the reference does)."""
    import cv2
    import imageio

    reader = imageio.get_reader(str(path), "ffmpeg")
    try:
        fps = reference_fps(reader.get_meta_data()["fps"])
        frames = [cv2.resize(np.asarray(im), (size, size)) for im in reader]
    finally:
        reader.close()
    return [frames[i] for i in frame_indices(fps, seconds, len(frames))]


def reference_wav(path: str | Path, wav: str | Path) -> None:
    """The reference's 16 kHz wav of a clip, written by moviepy 1.0.3 itself."""
    from moviepy.video.io.VideoFileClip import VideoFileClip  # what moviepy.editor exports

    clip = VideoFileClip(str(path))
    try:
        clip.audio.write_audiofile(str(wav), fps=16000, logger=None)
    finally:
        clip.close()


def write_reference_frames(frames: list[np.ndarray], paths: list[Path]) -> None:
    """Save RGB frames as the reference does: cv2.imwrite of the BGR conversion."""
    import cv2

    for frame, p in zip(frames, paths):
        cv2.imwrite(str(p), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
