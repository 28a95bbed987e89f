"""Small test clips made with imageio-ffmpeg's ffmpeg (the binary the reference runs): lavfi
test patterns and tones, H.264 + AAC in mp4, in well under a second each."""
from __future__ import annotations

import subprocess
from pathlib import Path


def ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def make_clip(path, seconds=5.5, fps="30000/1001", size=(96, 64), audio_rate=44100, channels=2,
              audio=True, vfr=False, rotate=None, audio_seconds=None, freq=440) -> Path:
    """An mp4 of a moving test pattern and a tone. `vfr`: 30 of the frames are dropped with their
    timestamps kept (a variable-frame-rate stream); `rotate`: display-matrix rotation (degrees),
    as a phone writes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    cmd = [ffmpeg(), "-nostdin", "-y", "-v", "error",
           "-f", "lavfi", "-i", f"testsrc2=size={w}x{h}:rate={fps}:duration={seconds}"]
    if audio:
        layout = {1: "mono", 2: "stereo", 6: "5.1"}[channels]
        cmd += ["-f", "lavfi", "-i",
                f"sine=frequency={freq}:sample_rate={audio_rate}:duration={audio_seconds or seconds}",
                "-filter_complex", f"[1:a]aformat=channel_layouts={layout}[a]", "-map", "0:v", "-map", "[a]",
                "-c:a", "aac", "-b:a", "64k"]
    if vfr:
        cmd += ["-vf", r"select='not(between(n\,40\,69))'", "-fps_mode", "vfr"]
    cmd += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-f", "mp4"]
    target = path.with_name(path.stem + ".unrotated.mp4") if rotate else path
    subprocess.run(cmd + [str(target)], check=True)
    if rotate:
        subprocess.run([ffmpeg(), "-nostdin", "-y", "-v", "error", "-display_rotation", str(rotate),
                        "-i", str(target), "-c", "copy", str(path)], check=True)
        target.unlink()
    return path
