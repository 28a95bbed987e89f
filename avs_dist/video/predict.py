"""`avs-dist predict --video`'s library: masks for a person's own videos, and an overlay video.

Any number of videos of any length (at least one second), frame rate, size, orientation
(rotation metadata is applied, as ffmpeg plays it) and audio format.

Timing (the dataset's: one frame a second, 5-second windows). The frames are numbered in
ffmpeg's constant-rate stream at rate r (what the reference reads). The video has
S = ceil(frames / r) seconds; second s is sampled at time s + 15/16 s, i.e. frame
floor((s + 15/16) r) (clamped to the last frame), which for an integer rate is the reference's
`int(s*fps + (15/16)*fps)` and for 29.97 fps never drifts (the reference's rounded fps would,
by a frame every 16 s). Window w holds seconds 5w..5w+4, each frame paired with the log-mel
example of its second: the VGGish examples of the window's 5 s of the 16 kHz wav that
`avs-dist extract` writes (moviepy's samples, channels averaged; data/audio.py), padded by
repeating the last example, as AVSBench pads short clips. A last window with fewer than 5
seconds repeats its last frame (those repeats are not output); when its audio is shorter than
one example (0.975 s), the example is taken from the last 0.975 s of the video's sound.

`--fps F` (default 1) predicts F masks per second: the model runs F times per window, the
j-th time (j = 0..F-1) on the frames at times s + (j + 15/16) / F of each second s, with the
same audio examples (one per second, as trained). Every frame of the overlay video takes the
mask of the sampled frame nearest to it in time (the earlier one on a tie): with F = 1 a mask
holds for about a second, with F equal to the video's rate every frame has its own.

Outputs in `{out}/{name}/` (name: the file's stem), written under `.{name}.partial` and renamed
when complete:
    masks/{name}_{s+1}.png            the reference's save_mask: sigmoid > 0.5, x 255, mode 'P',
                                      at the model's image size ({name}_{s+1}_{j+1}.png when F > 1)
    overlays/{name}_{s+1}.png         the sampled frame (enlarged to >= 360 px when smaller), the
                                      mask tinted and outlined (plots.overlay, visible on any
                                      content), a band above: second, window, frame, time
    {name}_overlay.mp4                every frame at the source rate with the source audio,
                                      mask drawn the same way, a band above it: time,
                                      second, window, the sampled frame the mask is from
    {name}.json                       each output frame's mask area, each sample, the timing
A video without an audio stream is an error (the model needs the sound) unless
`allow_silence`: then the model is fed the log-mel of silence and every output says the model
could not listen.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from avs_dist.errors import UserError
from avs_dist.video.ffmpeg import NoAudioError, VideoError, VideoMeta, ffmpeg_exe, parse_header, probe

WINDOW_SECONDS = 5
SAMPLE_POINT = Fraction(15, 16)
DATASET_SIZE = 224  # the reference's cv2.resize target: the model sees frames as extracted
NO_AUDIO = "no audio stream: the model was fed silence and could not listen"


class PredictVideoError(UserError, ValueError):
    """A video predict --video cannot use (or bad flags); the message names the file."""


def stream_rate_guess(head: VideoMeta) -> Fraction:
    """The constant-rate stream's rate as ffmpeg's header suggests it (its 'tbr', NTSC rates
    made exact): only a guess for the first decode; the decode reports the real one."""
    import re

    line = next((ln for ln in head.header.splitlines() if " Video: " in ln), "")
    m = re.search(r" ([0-9.]+)(k?) tbr", line)
    x = float(m.group(1)) * (1000 if m.group(2) else 1) if m else head.fps or 25.0
    for base in (24, 25, 30, 48, 50, 60, 120):
        if abs(x - base * 1000 / 1001) < 0.01:
            return Fraction(base * 1000, 1001)
    return Fraction(x).limit_denominator(1001)


@dataclass(frozen=True)
class Sample:
    second: int
    phase: int  # j = 0..F-1
    frame: int  # frame number in the constant-rate stream


def plan_samples(n: int, rate: Fraction, per_second: int) -> list[Sample]:
    """The frames sampled in a stream of n frames at `rate` (module docstring, Timing), in
    time order."""
    seconds = math.ceil(Fraction(n) / rate)
    return [Sample(s, j, min(math.floor((s + (j + SAMPLE_POINT) / per_second) * rate), n - 1))
            for s in range(seconds) for j in range(per_second)]


def window_logmel(samples16k: np.ndarray, window: int) -> np.ndarray:
    """float mono 16 kHz samples -> the log-mel [5, 1, 96, 64] of window `window` (module docstring)."""
    from avs_dist.data.audio import MIN_SAMPLES, NUM_EXAMPLES, SAMPLE_RATE, log_mel_examples, pad_examples

    a, b = window * WINDOW_SECONDS * SAMPLE_RATE, (window + 1) * WINDOW_SECONDS * SAMPLE_RATE
    x = log_mel_examples(samples16k[a:b], SAMPLE_RATE)
    if len(x) == 0:
        end = min(b, len(samples16k))
        x = log_mel_examples(samples16k[max(0, end - MIN_SAMPLES):end], SAMPLE_RATE)
    return pad_examples(x, NUM_EXAMPLES)


def _mono16k(wav_int16: np.ndarray) -> np.ndarray:
    # as data/audio.py read_wav reads the wav extract writes: int16 / 32768, channels averaged
    x = wav_int16.astype(np.float64) / 32768.0
    return x.mean(axis=1) if x.ndim == 2 else x


def check_videos(paths: list[Path], allow_silence: bool) -> list[tuple[Path, VideoMeta]]:
    """Probe every video before any work: all problems in one PredictVideoError."""
    problems, ok = [], []
    for p in paths:
        try:
            head = parse_header(Path(p), probe(p))
        except UserError as e:
            problems.append(str(e))
            continue
        if not head.has_audio and not allow_silence:
            problems.append(f"{p}: has no audio stream; the model needs the sound (pass --allow-silence to "
                            f"predict anyway with silence, and the outputs will say the model could not listen)")
            continue
        ok.append((Path(p), head))
    if problems:
        raise PredictVideoError("; ".join(problems) if len(problems) == 1 else
                                f"{len(problems)} of {len(paths)} videos cannot be used:\n  " + "\n  ".join(problems))
    return ok


MIN_SIDE = 360  # px: smaller videos are enlarged (whole factors, nearest) so that mask and text read


def present(frame: np.ndarray, mask: np.ndarray, lines: list[str], style: dict | None = None) -> np.ndarray:
    """uint8 RGB [H, W, 3] + bool mask [H, W] -> what a person looks at: the mask tinted and
    outlined in a colour that stands out there (plots.overlay; `style`: a plots.overlay_style
    of this mask to reuse), the frame enlarged by a whole factor to at least MIN_SIDE px on its
    shorter side (nearest neighbour), and `lines` of text in a dark band added above the
    picture (never covering it). The output size depends only on the frame size and the
    number of lines."""
    from PIL import Image, ImageDraw

    from avs_dist.plots import font, overlay

    picture = overlay(frame, mask, style=style)
    f = max(1, math.ceil(MIN_SIDE / min(frame.shape[:2])))
    if f > 1:
        picture = picture.repeat(f, 0).repeat(f, 1)
    h, w = picture.shape[:2]
    px = int(np.clip(w // 45, 12, 32))
    band = len(lines) * (px + 6) + 6
    out = Image.new("RGB", (w, h + band), (16, 16, 16))
    out.paste(Image.fromarray(picture), (0, band))
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(lines):
        draw.text((6, 4 + i * (px + 6)), text, fill=(255, 255, 255), font=font(px))
    return np.asarray(out)


def _clock(t: float) -> str:
    return f"{int(t // 60)}:{t % 60:05.2f}"


class _Encoder:
    """ffmpeg: rgb24 frames on stdin at `rate` + the source's audio -> H.264 / AAC mp4 (temp name)."""

    def __init__(self, path: Path, size: tuple[int, int], rate: Fraction, audio_from: Path | None):
        w, h = size
        self.path, self.tmp = path, path.with_name(f".{path.stem}.tmp.mp4")
        cmd = [ffmpeg_exe(), "-nostdin", "-y", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{w}x{h}", "-framerate", f"{rate.numerator}/{rate.denominator}", "-i", "pipe:0"]
        if audio_from is not None:
            cmd += ["-i", str(audio_from), "-map", "0:v", "-map", "1:a:0", "-c:a", "aac", "-b:a", "128k"]
        # 4:2:0 needs even sides: pad odd ones by a pixel
        cmd += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", "libx264", "-preset", "veryfast", "-crf", "20",
                "-pix_fmt", "yuv420p", "-movflags", "+faststart", "-f", "mp4", str(self.tmp)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def write(self, frame: np.ndarray) -> None:
        self.proc.stdin.write(np.ascontiguousarray(frame).tobytes())

    def close(self) -> None:
        self.proc.stdin.close()
        err = self.proc.stderr.read().decode(errors="replace")
        if self.proc.wait() != 0:
            self.tmp.unlink(missing_ok=True)
            raise VideoError(f"{self.path}: ffmpeg could not write the overlay video: {err.strip()[-400:]}")
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.tmp.unlink(missing_ok=True)


def predict_video(model, cfg, video: Path, out_dir: Path, name: str, *, per_second: int = 1,
                  allow_silence: bool = False, device="cpu", precision: str = "auto", batch_windows: int = 4,
                  source: dict | None = None, log=print) -> dict:
    """Masks, overlays, the overlay video and the JSON of one video into `out_dir/name`
    (module docstring); returns the JSON's summary. `model`, `cfg`: from
    evaluation.load_with_source (the model's input side is cfg.data.image_size); `source`: its
    provenance record, copied into the JSON. Memory: every sampled frame is held at the
    video's size until the outputs are written (W x H x 3 bytes x seconds x per_second).
    Raises PredictVideoError (shorter than a second, bad --fps), NoAudioError (no sound and not
    `allow_silence`), VideoError (unreadable; ffmpeg failed)."""
    import cv2
    import torch

    from avs_dist.data.transforms import normalize_uint8, stack_images
    from avs_dist.evaluation import segment
    from avs_dist.precision import autocast
    from avs_dist.video.audio import moviepy_wav_samples
    from avs_dist.video.sample import sample_frames

    if per_second < 1:
        raise PredictVideoError(f"--fps {per_second}: must be a whole number >= 1")
    head = parse_header(video, probe(video))
    listen = head.has_audio
    if not listen and not allow_silence:
        raise NoAudioError(f"{video}: has no audio stream; the model needs the sound (pass --allow-silence)")

    def guess(h: VideoMeta) -> list[int]:
        r = stream_rate_guess(h)
        return sorted({s.frame for s in plan_samples(max(1, math.floor(h.duration * r)), r, per_second)})

    def final(n: int, rate: Fraction) -> list[int]:
        if Fraction(n) / rate < 1:
            raise PredictVideoError(f"{video}: {n} frames at {float(rate):.4g} fps ({n / float(rate):.2f} s); "
                                    f"predict --video needs at least one second")
        return sorted({s.frame for s in plan_samples(n, rate, per_second)})

    sampled = sample_frames(video, guess, final, audio=listen)
    n, rate = sampled.n, sampled.rate
    samples = plan_samples(n, rate, per_second)
    seconds = samples[-1].second + 1
    windows = math.ceil(seconds / WINDOW_SECONDS)
    if listen:
        mono = _mono16k(moviepy_wav_samples(sampled.stream, sampled.meta.duration))
    else:
        mono = np.zeros(WINDOW_SECONDS * 16000 * windows)
    size = cfg.data.image_size
    device = torch.device(device)

    # ---- the model, window by window (each phase j of --fps is its own 5-frame clip)
    by_key = {(s.second, s.phase): s for s in samples}
    jobs = []  # (window, phase, [samples of its 5 slots, the last repeated])
    for w in range(windows):
        secs = list(range(w * WINDOW_SECONDS, min(seconds, (w + 1) * WINDOW_SECONDS)))
        for j in range(per_second):
            slots = [by_key[(s, j)] for s in secs]
            jobs.append((w, j, slots + [slots[-1]] * (WINDOW_SECONDS - len(slots)), len(slots)))
    audio_of = {w: window_logmel(mono, w) for w in range(windows)}
    logits: dict[tuple[int, int], np.ndarray] = {}  # (second, phase) -> float32 [size, size]
    with torch.no_grad():
        for b in range(0, len(jobs), batch_windows):
            chunk = jobs[b:b + batch_windows]
            clips = [np.stack([cv2.resize(sampled.frames[s.frame], (DATASET_SIZE, DATASET_SIZE)) for s in slots])
                     for _, _, slots, _ in chunk]
            x = normalize_uint8(stack_images(clips, size, normalize=False)).to(device)
            a = torch.as_tensor(np.stack([audio_of[w] for w, _, _, _ in chunk])).to(device)
            with autocast(device, precision):
                out = segment(model, x, a).reshape(len(chunk), WINDOW_SECONDS, size, size).cpu().numpy()
            for (_, _, slots, real), lg in zip(chunk, out):
                for k, s in enumerate(slots[:real]):  # the repeats that pad a last window are dropped
                    logits[(s.second, s.phase)] = lg[k]

    final_dir = out_dir / name
    work = out_dir / f".{name}.partial"
    if work.exists():
        shutil.rmtree(work)
    (work / "masks").mkdir(parents=True)
    (work / "overlays").mkdir()
    try:
        summary = _write_outputs(work, name, video, sampled, samples, logits, seconds, windows, per_second, listen,
                                 head, rate, size, source)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # nothing half-written stays behind
        raise
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(work, final_dir)
    log(f"{video}: {sampled.n} frames, {seconds} s, {windows} windows -> {final_dir / f'{name}_overlay.mp4'}"
        + ("" if listen else f" ({NO_AUDIO})"))
    return summary


def _write_outputs(work: Path, name: str, video: Path, sampled, samples: list[Sample], logits: dict, seconds: int,
                   windows: int, per_second: int, listen: bool, head: VideoMeta, rate: Fraction, size: int,
                   source: dict | None) -> dict:
    """Masks, overlays, the overlay video and the JSON into `work` (predict_video's temp folder)."""
    import cv2
    from PIL import Image

    from avs_dist.fileio import write_json
    from avs_dist.plots import overlay_style
    from avs_dist.video.ffmpeg import VideoRun

    n = sampled.n
    suffix = (lambda s: f"{s.second + 1}") if per_second == 1 else (lambda s: f"{s.second + 1}_{s.phase + 1}")
    silence_note = [] if listen else ["NO AUDIO: silence fed, the model could not listen"]
    sample_rows = []
    for s in samples:
        lg = logits[(s.second, s.phase)]
        # the reference's save_mask: (sigmoid > 0.5) * 255 as a 'P' PNG, at the model's size
        Image.fromarray((lg > 0).astype(np.uint8) * 255).convert("P").save(work / "masks" / f"{name}_{suffix(s)}.png")
        frame = sampled.frames[s.frame]
        h, w_ = frame.shape[:2]
        mask = cv2.resize(lg, (w_, h), interpolation=cv2.INTER_LINEAR) > 0
        w = s.second // WINDOW_SECONDS
        text = [f"second {s.second + 1}/{seconds}  window {w + 1}/{windows} "
                f"({w * WINDOW_SECONDS}-{min(seconds, (w + 1) * WINDOW_SECONDS)} s)",
                f"frame {s.frame} ({_clock(s.frame / float(rate))})"] + silence_note
        Image.fromarray(present(frame, mask, text)).save(work / "overlays" / f"{name}_{suffix(s)}.png")
        sample_rows.append({"second": s.second, "phase": s.phase, "window": w, "frame": s.frame,
                            "time_s": round(s.frame / float(rate), 4), "area_px": int(mask.sum()),
                            "area_frac": round(float(mask.mean()), 6),
                            "mask": f"masks/{name}_{suffix(s)}.png", "overlay": f"overlays/{name}_{suffix(s)}.png"})

    # ---- the overlay video: every frame of the stream, the nearest sample's mask
    order = sorted(samples, key=lambda s: (s.frame, s.phase))
    sample_frames_sorted = np.array([s.frame for s in order])
    frame_rows = []
    video_path = work / f"{name}_overlay.mp4"
    encoder = None
    cache: tuple | None = None
    try:
        with VideoRun(video, audio=False) as run:
            for i, frame in run.frames():
                k = int(np.searchsorted(sample_frames_sorted, i))  # first sample at or after i
                if k == len(order) or (k > 0 and i - sample_frames_sorted[k - 1] <= sample_frames_sorted[k] - i):
                    k -= 1
                src = order[k]
                if cache is None or cache[0] != (src.second, src.phase):
                    h, w_ = frame.shape[:2]
                    lg = logits[(src.second, src.phase)]
                    m = cv2.resize(lg, (w_, h), interpolation=cv2.INTER_LINEAR) > 0
                    # rings and outline colour once per held mask (from its sampled frame: no flicker)
                    cache = ((src.second, src.phase), m, overlay_style(sampled.frames[src.frame], m))
                _, mask, style = cache
                t = i / float(rate)
                second = min(int(t), seconds - 1)
                w = second // WINDOW_SECONDS
                text = [f"{_clock(t)}  second {second + 1}/{seconds}  window {w + 1}/{windows}",
                        f"mask from frame {src.frame} ({_clock(src.frame / float(rate))}, second {src.second + 1})"]
                picture = present(frame, mask, text + silence_note, style)
                if encoder is None:
                    encoder = _Encoder(video_path, picture.shape[1::-1], rate, video if listen else None)
                encoder.write(picture)
                frame_rows.append({"frame": i, "time_s": round(t, 4), "second": second, "window": w,
                                   "mask_from_frame": src.frame, "area_px": int(mask.sum()),
                                   "area_frac": round(float(mask.mean()), 6)})
            run.finish()
        encoder.close()
    except BaseException:
        if encoder is not None:
            encoder.abort()
        raise

    summary = {
        "video": str(video.resolve()), "name": name, "checkpoint": (source or {}).get("checkpoint"), "source": source,
        "audio": "yes" if listen else NO_AUDIO, "size": list(sampled.meta.size), "rotation_applied": head.rotate,
        "frame_rate": f"{rate.numerator}/{rate.denominator}", "frames": n, "seconds": seconds, "windows": windows,
        "masks_per_second": per_second, "image_size": size,
        "timing": "second s sampled at s + (j + 15/16)/F s; 5-second windows; each output frame takes the mask of "
                  "the nearest sampled frame in time (earlier on a tie)",
        "overlay_video": f"{name}_overlay.mp4", "samples": sample_rows, "frames_detail": frame_rows,
        "mean_area_frac": round(float(np.mean([r["area_frac"] for r in frame_rows])), 6) if frame_rows else 0.0,
    }
    write_json(work / f"{name}.json", summary)
    return summary
