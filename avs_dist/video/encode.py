"""Writing mp4 clips with imageio-ffmpeg's ffmpeg (H.264 + AAC): `synth --raw-videos`, the tests, the bench.

`write_clip` shows one picture per second (picture l from second l until l+1, the last one
until the end) at a constant frame rate, with a mono sound: the shape of an AVSBench clip
whose frames the reference's 15/16 rule (timing.py) reads back one per second.
The file is written under a temp name in the same folder and renamed when ffmpeg succeeded.
"""
from __future__ import annotations

import math
import os
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

from avs_dist.video.ffmpeg import VideoError, ffmpeg_exe


def _pix_fmt(w: int, h: int) -> str:
    # 4:2:0 (what phones and YouTube deliver) needs even sides; 4:4:4 takes any size.
    return "yuv420p" if w % 2 == 0 and h % 2 == 0 else "yuv444p"


def write_clip(path: str | Path, pictures: np.ndarray, seconds: float, fps: str | float = 10,
               audio: np.ndarray | None = None, audio_rate: int = 16000, crf: int = 18,
               extra_output_args: list[str] | None = None) -> Path:
    """Write `pictures` (uint8 [T, H, W, 3], picture l shown during second l) as an H.264 mp4
    of `seconds` seconds at `fps` (a number or an ffmpeg rate such as "30000/1001"), with
    `audio` (float [n] mono in [-1, 1] at `audio_rate` Hz, AAC) when given.
    Raises VideoError (with ffmpeg's message) when ffmpeg fails; no partial file is left."""
    path = Path(path)
    pictures = np.ascontiguousarray(pictures, dtype=np.uint8)
    t, h, w, _ = pictures.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    wav_tmp = None
    # Every output frame is sent (frame k at k / fps shows picture floor(k / fps)): exact
    # timing at any rate, no reliance on ffmpeg's frame duplication at the end of the input.
    rate = Fraction(str(fps)) if "/" not in str(fps) else Fraction(*map(int, str(fps).split("/")))
    n = max(1, math.ceil(seconds * rate - Fraction(1, 10**6)))
    frames = pictures[np.minimum(np.floor(np.arange(n) / float(rate)).astype(int), t - 1)]
    cmd = [ffmpeg_exe(), "-nostdin", "-y", "-v", "error",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-framerate", str(fps), "-i", "pipe:0"]
    try:
        if audio is not None:
            from avs_dist.video.audio import write_wav

            fd, wav_tmp = tempfile.mkstemp(suffix=".wav", dir=path.parent, prefix=".audio-")
            os.close(fd)
            pcm = np.clip(np.round(np.asarray(audio, np.float64) * 32767), -32768, 32767).astype(np.int16)
            write_wav(wav_tmp, pcm[:, None], audio_rate)
            cmd += ["-i", wav_tmp, "-map", "0:v", "-map", "1:a", "-c:a", "aac", "-b:a", "96k"]
        cmd += ["-c:v", "libx264", "-preset", "veryfast",
                "-crf", str(crf), "-pix_fmt", _pix_fmt(w, h), *(extra_output_args or []), "-f", "mp4", str(tmp)]
        proc = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            raise VideoError(f"{path}: ffmpeg could not write the clip: "
                             f"{proc.stderr.decode(errors='replace').strip()[-500:]}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        if wav_tmp is not None:
            Path(wav_tmp).unlink(missing_ok=True)
    return path


def pattern_clip(path, seconds=5.5, fps="30000/1001", size=(96, 64), audio_rate=44100, channels=2,
                 audio=True, vfr=False, rotate=None, audio_seconds=None, freq=440, hue=0,
                 preset="ultrafast") -> Path:
    """An mp4 (H.264 + AAC) of ffmpeg's moving test pattern `testsrc2` (colours turned by
    `hue` degrees) and a `freq` Hz tone of `channels` channels at `audio_rate` Hz, encoded with
    x264's `preset`. `vfr`: frames 40..69 are dropped with the others' timestamps kept (a
    variable-frame-rate stream); `rotate`: display-matrix rotation (degrees), as a phone
    writes it. For the tests and `avs-dist bench extract`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    cmd = [ffmpeg_exe(), "-nostdin", "-y", "-v", "error",
           "-f", "lavfi", "-i", f"testsrc2=size={w}x{h}:rate={fps}:duration={seconds}"]
    if audio:
        layout = {1: "mono", 2: "stereo", 6: "5.1"}[channels]
        cmd += ["-f", "lavfi", "-i",
                f"sine=frequency={freq}:sample_rate={audio_rate}:duration={audio_seconds or seconds}",
                "-filter_complex", f"[1:a]aformat=channel_layouts={layout}[a]", "-map", "0:v", "-map", "[a]",
                "-c:a", "aac", "-b:a", "64k"]
    filters = [f"hue=h={hue}"] if hue else []
    if vfr:
        filters.append(r"select='not(between(n\,40\,69))'")
    if filters:
        cmd += ["-vf", ",".join(filters)] + (["-fps_mode", "vfr"] if vfr else [])
    cmd += ["-c:v", "libx264", "-preset", preset, "-pix_fmt", "yuv420p", "-f", "mp4"]
    target = path.with_name(path.stem + ".unrotated.mp4") if rotate else path
    subprocess.run(cmd + [str(target)], check=True)
    if rotate:
        subprocess.run([ffmpeg_exe(), "-nostdin", "-y", "-v", "error", "-display_rotation", str(rotate),
                        "-i", str(target), "-c", "copy", str(path)], check=True)
        target.unlink()
    return path
