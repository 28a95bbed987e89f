"""`avs-dist bench extract`: `avs-dist extract`'s decoding vs the reference recipe, same clips, one run.

Both methods take the same clips, one after the other in this process (one video at a time),
alternating for `--rounds` rounds after one warm-up clip each (imports, page cache); the best
round of each counts. Each writes what `extract` writes per video: the kept frames as PNG
(cv2.imwrite of the BGR conversion) and the 16 kHz wav.
- reference: reference.py, the recipe itself (imageio's ffmpeg reader decodes and converts
  every frame, cv2.resize on each, then the kept ones; moviepy's VideoFileClip(...).audio.
  write_audiofile(fps=16000)).
- extract: video/extract.py:extract_clip (one probe, one ffmpeg run converting only the kept
  frames, moviepy's sample picking on the decoded stream).
The outputs are compared: every frame PNG byte for byte, every wav sample.

"Per core" is videos per CPU-second of this process and its children (ffmpeg) together
(getrusage SELF + CHILDREN), so ffmpeg's decoder threads count as the CPU they use. Without
--clips, clips are generated (video/encode.py:pattern_clip: ffmpeg's moving test pattern, x264
`veryfast`, which uses B-frames and CABAC like web video, and an AAC tone).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from avs_dist.helpformat import HelpFormatter

METHODS = ("reference", "extract")


def _cpu() -> float:
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _run_reference(clip: Path, out: Path, seconds: int, size: int) -> None:
    from avs_dist.video.reference import reference_frames, reference_wav, write_reference_frames

    frames = reference_frames(clip, seconds, size)
    write_reference_frames(frames, [out / f"{clip.stem}_{i + 1}.png" for i in range(len(frames))])
    reference_wav(clip, out / f"{clip.stem}.wav")


def _run_extract(clip: Path, out: Path, seconds: int, size: int) -> None:
    import cv2

    from avs_dist.video.audio import write_wav
    from avs_dist.video.extract import extract_clip

    c = extract_clip(clip, seconds, size)
    for i, frame in enumerate(c.frames):
        cv2.imwrite(str(out / f"{clip.stem}_{i + 1}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    write_wav(out / f"{clip.stem}.wav", c.wav)


RUNNERS = {"reference": _run_reference, "extract": _run_extract}


def _pass(method: str, clips: list[Path], out: Path, seconds: int, size: int) -> dict:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    c0, t0 = _cpu(), time.perf_counter()
    for clip in clips:
        RUNNERS[method](clip, out, seconds, size)
    cpu, wall = _cpu() - c0, time.perf_counter() - t0
    return {"cpu_s": round(cpu, 4), "wall_s": round(wall, 4), "videos_per_s": round(len(clips) / wall, 3),
            "videos_per_cpu_s": round(len(clips) / cpu, 3), "cores_used": round(cpu / wall, 2)}


def _compare(a: Path, b: Path) -> dict:
    """Frame PNGs byte for byte, wav samples (the headers differ: moviepy's ffmpeg adds a LIST chunk)."""
    from avs_dist.video.audio import read_wav_int16

    pngs = sorted(p.name for p in a.glob("*.png"))
    same_png = sum(hashlib.sha256((a / n).read_bytes()).digest() == hashlib.sha256((b / n).read_bytes()).digest()
                   for n in pngs if (b / n).is_file())
    wavs = sorted(p.name for p in a.glob("*.wav"))
    same_wav = 0
    for n in wavs:
        if (b / n).is_file():
            x, rx = read_wav_int16(a / n)
            y, ry = read_wav_int16(b / n)
            same_wav += rx == ry and x.shape == y.shape and bool((x == y).all())
    return {"frames_equal": same_png, "frames": len(pngs), "wavs_equal": same_wav, "wavs": len(wavs),
            "identical": same_png == len(pngs) and same_wav == len(wavs) and len(pngs) > 0}


def make_clips(folder: Path, n: int, seconds: float, size: tuple[int, int], fps: str) -> list[Path]:
    from avs_dist.video.encode import pattern_clip

    return [pattern_clip(folder / f"clip{i:03d}.mp4", seconds=seconds, fps=fps, size=size, hue=(37 * i) % 360,
                         freq=300 + 40 * i, preset="veryfast") for i in range(n)]


def run_bench(clips: list[Path], seconds: int = 5, size: int = 224, rounds: int = 2, work: Path | None = None,
              log=print) -> dict:
    """Time both methods on `clips`; returns the result dict (see main's --out)."""
    from avs_dist.video.ffmpeg import ffmpeg_exe

    work = Path(work or tempfile.mkdtemp(prefix="avs-bench-extract-"))
    for m in METHODS:  # warm-up: imports, page cache
        _pass(m, clips[:1], work / f"warm-{m}", seconds, size)
    best: dict[str, dict] = {}
    for r in range(rounds):
        for m in (METHODS if r % 2 == 0 else METHODS[::-1]):
            res = _pass(m, clips, work / m, seconds, size)
            log(f"round {r + 1}: {m:9s} {res['videos_per_s']:7.2f} videos/s, {res['videos_per_cpu_s']:7.2f} per CPU-s")
            if m not in best or res["cpu_s"] < best[m]["cpu_s"]:
                best[m] = res
    same = _compare(work / "reference", work / "extract")
    ref, ours = best["reference"], best["extract"]
    return {
        "clips": len(clips), "clip_files": [str(c) for c in clips], "seconds_kept": seconds, "frame_size": size,
        "rounds": rounds, "methods": best,
        "ratio": {"per_core": round(ours["videos_per_cpu_s"] / ref["videos_per_cpu_s"], 2),
                  "wall": round(ours["videos_per_s"] / ref["videos_per_s"], 2)},
        "same_output": same,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "ffmpeg": ffmpeg_exe(), "load_avg_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()]},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="avs-dist bench extract", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--clips", default=None, help="a folder of .mp4 clips (default: generate --videos test clips)")
    p.add_argument("--videos", type=int, default=8, help="clips to generate without --clips")
    p.add_argument("--clip-seconds", type=float, default=5.2, help="length of generated clips")
    p.add_argument("--clip-size", default="640x360", help="WxH of generated clips")
    p.add_argument("--clip-fps", default="30000/1001", help="frame rate of generated clips")
    p.add_argument("--size", type=int, default=224, help="frame side after cv2.resize (the reference: 224)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="bench_extract.json", help="result JSON")
    a = p.parse_args(argv)
    from avs_dist.errors import UserError

    work = Path(tempfile.mkdtemp(prefix="avs-bench-extract-"))
    try:
        if a.clips:
            clips = sorted(Path(a.clips).glob("*.mp4"))
            if not clips:
                raise UserError(f"--clips {a.clips}: no .mp4 files there")
        else:
            w, h = (int(v) for v in a.clip_size.lower().split("x"))
            clips = make_clips(work / "clips", a.videos, a.clip_seconds, (w, h), a.clip_fps)
        result = run_bench(clips, size=a.size, rounds=a.rounds, work=work)
        result["generated"] = None if a.clips else {"size": a.clip_size, "fps": a.clip_fps, "seconds": a.clip_seconds}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    r, s = result["ratio"], result["same_output"]
    print(f"extract vs reference on {result['clips']} clips: {r['per_core']}x videos per CPU-second, {r['wall']}x "
          f"videos per second; identical output: {s['identical']} ({s['frames_equal']}/{s['frames']} frame PNGs, "
          f"{s['wavs_equal']}/{s['wavs']} wavs) -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
