"""`avs-dist extract`: an AVSBench layout's raw_videos/ -> visual_frames/, audio_wav/, audio_log_mel/.

The output is what the reference's preprocessing scripts make (docs/avsbench-format §1 "From
raw videos"; reference.py is that recipe, the tests compare against it): for second l of the
clip (S4: 5 seconds, or 10 - start when start > 5; MS3: 5) the decoded frame
`int(l*fps + (15/16)*fps)`, resized by `cv2.resize(frame, (size, size))` and written by
`cv2.imwrite` (BGR) under the reference's names; the wav moviepy 1.0.3 writes (16 kHz, 16-bit,
stereo: audio.py); the log-mel of that wav as `data/audio.py:logmel_from_wav` computes it
([5, 1, 96, 64] float32, the last example repeated), pickled as a torch tensor like the release.

How it is faster than the reference (`avs-dist bench extract`; the reference's imageio reader
converts and pipes every frame and cv2 resizes each, and moviepy runs ffmpeg four more times):
after a probe, one ffmpeg process per video decodes up to the last kept frame, converts only
the kept frames to RGB, reports which decoded frame each frame of the reference's stream
shows (the proof that the kept frames are the reference's; a second decode where they are
not: sample.py), and decodes moviepy's audio stream, whose sample picking then runs on the
array (audio.py). Videos are decoded in parallel threads (`workers`), one ffmpeg thread each.

Bad videos do not stop the run: every one is collected with the file and the reason (not
found, unreadable, no video or no audio stream, no frame rate, shorter than the clip, audio
too short for one 0.96 s example) in one report, printed and written to
`{subset root}/extract_report.json`; `extract` then raises ExtractError (exit 2) after the good
videos are written. `avs-dist pack` reads the result; a video reported here has no frames, so
pack reports it too (or skips it with --skip-bad).

Resumable and atomic per video: the frames are written into a hidden temp folder that is
renamed to the video's frame folder, then the wav and the .pkl are written under temp names
and renamed, the .pkl last. A video counts as done when its frame folder holds every frame and
its wav and .pkl exist; a rerun skips those (unless `overwrite`) and redoes any other.
"""
from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avs_dist.data.layout import VideoRecord, raw_video_path, read_subset, subset_root
from avs_dist.errors import UserError
from avs_dist.video.ffmpeg import VideoError
from avs_dist.video.timing import CLIP_SECONDS, frame_indices, reference_fps, s4_clip_seconds

REPORT = "extract_report.json"
REFERENCE_SIZE = 224


class ExtractError(UserError, RuntimeError):
    """Some videos could not be extracted; `bad` lists each with its problem."""

    def __init__(self, message: str, bad: list[dict] | None = None):
        super().__init__(message)
        self.bad = bad or []


@dataclass(frozen=True)
class Clip:
    """The frames (uint8 RGB [size, size, 3], one per second) and the wav samples (int16
    [n, 2], 16 kHz) the reference makes of one video, plus what ffmpeg said about it."""
    frames: list
    wav: np.ndarray
    fps: float
    frames_decoded: int  # frames of the reference's stream read (up to the last kept one)
    duration: float
    runs: int = 1  # ffmpeg decodes (2: the reference's frame numbers were not the decoded ones)


def extract_clip(video: str | Path, seconds: int, size: int = REFERENCE_SIZE, audio: bool = True) -> Clip:
    """Decode one video and return the reference's frames and wav samples.

    How, exactly and cheaply: `ffmpeg -i` gives the fps the reference indexes with, hence the
    frame numbers k it keeps. One ffmpeg run then decodes the video once and (a) converts to
    RGB only the decoded frames numbered k, (b) runs the reference's constant-rate stream to
    learn which decoded frame each of its frames shows, (c) decodes moviepy's audio stream.
    When (b) says the reference's frame k is decoded frame k (a constant-rate source: nearly
    always), the frames of (a) are the reference's. Otherwise (a variable frame rate, a late
    video start, a clip shorter than its last kept frame) a second run converts the decoded
    frames (b) names. Either way the pixels are ffmpeg's rgb24 of the same decoded frames,
    resized by cv2.resize: the reference's.

    Raises VideoError (file named): unreadable, no video stream, no audio stream (NoAudioError,
    when `audio`), no frame rate, or fewer seconds of video than `seconds` (no frame in the
    last second the clip needs: the reference would silently repeat an earlier frame)."""
    import cv2

    from avs_dist.video.audio import moviepy_wav_samples
    from avs_dist.video.sample import sample_frames

    video = Path(video)
    if seconds < 1:
        raise VideoError(f"{video}: the clip has {seconds} seconds to extract (S4 start > 9?)")
    fps = 0

    def guess(head) -> list[int]:
        nonlocal fps
        fps = reference_fps(head.fps)
        if fps <= 0:
            raise VideoError(f"{video}: ffmpeg reports no frame rate, so no frame can be matched to a second")
        return frame_indices(fps, seconds)

    def final(n: int, rate) -> list[int]:
        if n - 1 < (seconds - 1) * fps:
            raise VideoError(f"{video}: {n} frames at {float(rate):g} fps ({n / float(rate):.2f} s); the clip "
                             f"needs {seconds} s (a frame in each second)")
        return frame_indices(fps, seconds, n)

    # Nothing after the last kept frame matters (the reference decodes it all the same).
    s = sample_frames(video, guess, final, audio=audio, stop_early=True)
    frames = [cv2.resize(s.frames[k], (size, size)) for k in frame_indices(fps, seconds, s.n)]
    wav = moviepy_wav_samples(s.stream, s.meta.duration) if audio else np.zeros((0, 2), np.int16)
    return Clip(frames=frames, wav=wav, fps=s.meta.fps, frames_decoded=s.n, duration=s.meta.duration, runs=s.runs)


# ----------------------------------------------------------------------------- one video


def clip_seconds(rec: VideoRecord) -> int:
    return s4_clip_seconds(rec.start) if rec.subset == "s4" else CLIP_SECONDS


def is_done(rec: VideoRecord) -> bool:
    t = clip_seconds(rec)
    return (rec.logmel_path.is_file() and rec.wav_path.is_file()
            and all(p.is_file() for p in rec.frame_paths[:t]))


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def extract_video(data_root: Path, rec: VideoRecord, size: int = REFERENCE_SIZE, overwrite: bool = False) -> str:
    """Extract one record's clip; returns "done" or "skipped" (already complete). Raises
    VideoError / AudioError (file named) for a bad video; nothing of it is then left looking
    complete."""
    import cv2

    from avs_dist.data.audio import logmel_from_wav, save_logmel_pkl
    from avs_dist.video.audio import write_wav

    if not overwrite and is_done(rec):
        return "skipped"
    video = raw_video_path(data_root, rec)
    if not video.is_file():
        raise VideoError(f"{video}: raw video not found")
    t = clip_seconds(rec)
    clip = extract_clip(video, t, size)

    frame_dir = rec.frame_paths[0].parent
    frame_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = frame_dir.with_name(f".{frame_dir.name}.extract-tmp")
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir()
    for frame, path in zip(clip.frames, rec.frame_paths[:t]):
        if not cv2.imwrite(str(tmp_dir / path.name), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)):
            raise OSError(f"cv2.imwrite could not write {tmp_dir / path.name}")
    # Unpublish the old result first (pkl last in, first out), so a crash never leaves new
    # frames beside an old wav looking complete.
    for p in (rec.logmel_path, rec.wav_path):
        p.unlink(missing_ok=True)
    if frame_dir.exists():
        shutil.rmtree(frame_dir)
    os.replace(tmp_dir, frame_dir)

    rec.wav_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(rec.wav_path, lambda p: write_wav(p, clip.wav))
    logmel = logmel_from_wav(rec.wav_path)  # the project's VGGish front end (data/audio.py)
    rec.logmel_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(rec.logmel_path, lambda p: save_logmel_pkl(p, logmel))
    return "done"


# ----------------------------------------------------------------------------- driver


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False)


def _job(data_root: Path, rec: VideoRecord, size: int, overwrite: bool) -> tuple[str, str | None]:
    from avs_dist.data.audio import AudioError

    try:
        return extract_video(data_root, rec, size, overwrite), None
    except (VideoError, AudioError) as e:  # NoAudioError is a VideoError
        return "bad", str(e)


def format_report(bad: list[dict]) -> str:
    return "\n".join(f"  {b['name']} ({b['split']}, CSV row {b['row'] + 2}): {b['problem']}" for b in bad)


def extract(data_root: str | Path, subset: str, *, workers: int = 1, size: int = REFERENCE_SIZE,
            overwrite: bool = False, progress: bool = True, log=print) -> dict:
    """Extract every video of one subset's meta CSV (CSV order) under `data_root`.

    Returns {"done", "skipped", "bad": [{"name", "split", "row", "video", "problem"}], "seconds",
    "videos_per_s"}; writes `{subset root}/extract_report.json` (the same, atomically). Raises
    ExtractError listing every bad video after the others are written, and LayoutError for a
    missing or malformed meta CSV."""
    from avs_dist.fileio import write_json

    if size < 1 or workers < 1:
        raise ExtractError("--size and --workers must be positive")
    data_root = Path(data_root)
    records = read_subset(data_root, subset)
    t0 = time.perf_counter()
    status: dict[int, tuple[str, str | None]] = {}
    with _progress(progress) as bar, ThreadPoolExecutor(max_workers=workers) as pool:
        task = bar.add_task(f"extract {subset}", total=len(records))
        futures = {pool.submit(_job, data_root, rec, size, overwrite): i for i, rec in enumerate(records)}
        for fut in as_completed(futures):
            status[futures[fut]] = fut.result()
            bar.advance(task)
    seconds = time.perf_counter() - t0
    bad = [{"name": rec.name, "split": rec.split, "row": rec.row, "video": str(raw_video_path(data_root, rec)),
            "problem": status[i][1]} for i, rec in enumerate(records) if status[i][0] == "bad"]
    done = sum(s == "done" for s, _ in status.values())
    skipped = sum(s == "skipped" for s, _ in status.values())
    summary = {"subset": subset, "data_root": str(data_root), "size": size, "videos": len(records), "done": done,
               "skipped": skipped, "bad": bad, "seconds": round(seconds, 3),
               "videos_per_s": round(done / seconds, 3) if done and seconds > 0 else None}
    write_json(subset_root(data_root, subset) / REPORT, summary)
    log(f"extracted {done} {subset} videos in {seconds:.1f} s"
        + (f" ({done / seconds:.2f} videos/s, {workers} workers)" if done else "")
        + (f"; {skipped} already complete" if skipped else ""))
    if bad:
        raise ExtractError(
            f"{len(bad)} of {len(records)} {subset} videos could not be extracted (the others were; the list is in "
            f"{subset_root(data_root, subset) / REPORT}; fix or remove them, or pack with --skip-bad):\n"
            + format_report(bad), bad)
    return summary
