"""The reference's frames at chosen frame numbers, decoding a video once (twice at worst).

The reference numbers frames in ffmpeg's constant-rate rgb24 stream (imageio's reader; a
variable-rate source has frames repeated or dropped there). `sample_frames`:
1. `ffmpeg -i` (probe): the header, whence the caller guesses the frame numbers it wants;
2. one ffmpeg run (ffmpeg.VideoRun) that converts to RGB only the decoded frames with those
   numbers, tells for every frame n of the constant-rate stream which decoded frame it shows
   (and that stream's rate), and decodes moviepy's audio stream;
3. the caller's final frame numbers (now that the frame count and rate are known); those whose
   decoded frame was not converted in 2 (a variable rate, a wrong guess) are converted by a
   second run. The pixels are ffmpeg's rgb24 of the same decoded frames either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np

from avs_dist.video.ffmpeg import NoAudioError, VideoError, VideoMeta, VideoRun, parse_header, probe


@dataclass
class Sampled:
    """frames: {frame number: uint8 RGB [H, W, 3] at the video's size (rotation applied)};
    stream: moviepy's int16 [n, 2] 44.1 kHz audio (None without audio); meta: the run's header;
    n: frames in the constant-rate stream; rate: its frames per second; runs: ffmpeg decodes."""
    frames: dict
    stream: np.ndarray | None
    meta: VideoMeta
    n: int
    rate: Fraction
    runs: int


def sample_frames(video: str | Path, guess: Callable[[VideoMeta], list[int]],
                  final: Callable[[int, Fraction], list[int]], audio: bool = True, stop_early: bool = False) -> Sampled:
    """`guess(probe header)` -> the frame numbers to convert in the first run; `final(n, rate)`
    -> the frame numbers wanted (0 <= k < n; it may raise VideoError, e.g. for a clip too
    short). `stop_early`: decode video only up to the last guessed frame (the audio to the
    end); n is then at most that frame's number + 1, which is all `final` may rely on.
    Raises VideoError / NoAudioError (when `audio` and there is no audio stream)."""
    video = Path(video)
    head = parse_header(video, probe(video))
    if audio and not head.has_audio:
        raise NoAudioError(f"{video}: has no audio stream (the model needs the sound)")
    first = guess(head)
    with VideoRun(video, audio=audio, select=first, timing=True,
                  max_frames=max(first) + 1 if stop_early and first else None) as run:
        kept = {i: frame.copy() for i, frame in run.frames()}
        stream = run.finish()
        meta, decoded_of, rate = run.meta, run.decoded_of, run.rate
    n = len(decoded_of)
    if n == 0:
        raise VideoError(f"{video}: no decodable video frame")
    wanted = final(n, rate)
    need = sorted({decoded_of[k] for k in wanted} - set(kept))
    runs = 1
    if need:  # the stream's frame k is not decoded frame k, or the guess missed
        runs = 2
        with VideoRun(video, audio=False, select=need) as again:
            kept.update((i, frame.copy()) for i, frame in again.frames())
            again.finish()
    return Sampled(frames={k: kept[decoded_of[k]] for k in wanted}, stream=stream, meta=meta, n=n,
                   rate=rate, runs=runs)
