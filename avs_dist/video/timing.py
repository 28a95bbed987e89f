"""Which decoded frame stands for each second of a clip, as AVSBench's preprocessing picks it.

The reference (`preprocess_s4.py` / `preprocess_ms3.py`, facts in docs/avsbench-format §1
"From raw videos") takes `fps = int(round(reader fps))` from imageio's ffmpeg reader and,
for second l = 0..t-1, the decoded frame `int(l*fps + (15/16)*fps)`: near the end of each
second, clamped to the last decoded frame. The clip length t is S4 `5 if start <= 5 else
10 - start`, MS3 5.
"""
from __future__ import annotations

SAMPLE_POINT = 15 / 16  # where in each second the reference samples (exact in binary)
CLIP_SECONDS = 5


def reference_fps(meta_fps: float) -> int:
    """The integer rate the reference indexes frames with: round() of the reader's fps (29.97 -> 30)."""
    return int(round(meta_fps))


def second_frame_index(second: int, fps: int) -> int:
    """0-based index of the frame the reference keeps for `second` (0-based), before clamping."""
    return int(second * fps + SAMPLE_POINT * fps)


def s4_clip_seconds(start: int) -> int:
    """Seconds (frames) the reference extracts from an S4 clip whose meta CSV `start` is given."""
    return CLIP_SECONDS if start <= 5 else 10 - start


def frame_indices(fps: int, seconds: int, n_frames: int | None = None) -> list[int]:
    """The reference's frame index for each second 0..seconds-1; clamped to n_frames - 1 when
    the number of decoded frames is known."""
    idx = [second_frame_index(s, fps) for s in range(seconds)]
    return idx if n_frames is None else [min(i, n_frames - 1) for i in idx]
