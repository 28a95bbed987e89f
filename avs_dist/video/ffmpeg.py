"""One ffmpeg process per video: the reference's RGB frames and moviepy's audio stream at once.

AVSBench's preprocessing runs ffmpeg (imageio-ffmpeg's bundled binary) several times per clip:
imageio's reader (`-i f -pix_fmt rgb24 -vcodec rawvideo -f image2pipe -`), then moviepy's
`ffmpeg -i f` probe, its audio reader (`-i f -vn -f s16le -acodec pcm_s16le -ar 44100 -ac 2 -`)
and its wav writer. `VideoRun` runs the same binary once with several outputs, each with the
reference's own options, so every stream is chosen, decoded, rotated, frame-rate converted
(image2pipe is a constant-frame-rate muxer: ffmpeg duplicates or drops frames of a
variable-frame-rate source) and converted to rgb24 / s16le as in those separate runs; a
`select` output converts only chosen decoded frames, and a frame-map output says which decoded
frame each frame of the constant-rate stream shows (VideoRun's docstring). The header ffmpeg
prints is parsed by imageio-ffmpeg's own parser (fps, sizes, rotation).

Errors: `VideoError` (a BadFileError: exit 2 on the command line) names the file and what is
wrong: not found, not a video ffmpeg can read, no video stream, no audio stream
(`NoAudioError`), or ffmpeg failing half-way (its last message).
"""
from __future__ import annotations

import os
import re
import subprocess
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from avs_dist.errors import BadFileError, MissingFileError, UserError

AUDIO_RATE = 44100  # moviepy 1.0.3's VideoFileClip(audio_fps=44100)
AUDIO_CHANNELS = 2  # moviepy 1.0.3's FFMPEG_AudioReader(nchannels=2): every source becomes stereo
STDERR_TAIL = 8


class VideoError(BadFileError):
    """A video that cannot be used as asked; the message names the file and the problem."""


class NoAudioError(VideoError):
    """The video has no audio stream."""


def ffmpeg_exe() -> str:
    """Path of imageio-ffmpeg's bundled ffmpeg: the binary the reference's readers run."""
    try:
        import imageio_ffmpeg
    except ImportError:
        raise UserError("imageio-ffmpeg is not installed: pip install imageio-ffmpeg "
                        "(avs-dist's dependency for raw videos)") from None
    return imageio_ffmpeg.get_ffmpeg_exe()


def _input_section(text: str) -> str:
    """The part of ffmpeg's header that describes the input file (before 'Stream mapping')."""
    return text.split("Stream mapping:", 1)[0].split("Output #", 1)[0]


def _last_lines(text: str, n: int = STDERR_TAIL) -> str:
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("frame=", "size=", "Press [q]"))]
    return " | ".join(lines[-n:]) or "(no message)"


def _problem(path: Path, text: str) -> str:
    """One line on why ffmpeg could not give frames (and audio) of `path`."""
    inp = _input_section(text)
    if "Input #0" not in inp:
        last = _last_lines(text, 1)
        return f"{path}: not a video ffmpeg can read ({last})"
    if not re.search(r"Stream #0:\d+.*: Video: ", inp):
        return f"{path}: has no video stream (an audio-only file?)"
    return f"{path}: ffmpeg failed: {_last_lines(text, 3)}"


def has_audio_stream(header: str) -> bool:
    return re.search(r"Stream #0:\d+.*: Audio: ", _input_section(header)) is not None


@dataclass
class VideoMeta:
    """What ffmpeg's header says, as the reference's readers parse it.

    fps: imageio-ffmpeg's `meta["fps"]` (the input's "fps" token, e.g. 29.97; 0 when absent);
    size: (width, height) of the rgb24 frames (rotation applied); source_size: before rotation;
    rotate: degrees of rotation metadata; duration: seconds as moviepy 1.0.3 reads it (the
    container's "Duration: HH:MM:SS.ss", 10 ms resolution); has_audio: an input audio stream exists."""
    path: Path
    fps: float
    size: tuple[int, int]
    source_size: tuple[int, int]
    rotate: int
    duration: float
    has_audio: bool
    header: str = field(repr=False)


def parse_header(path: Path, header: str) -> VideoMeta:
    import logging

    from imageio_ffmpeg._parsing import parse_ffmpeg_header  # the reference reader's own parser

    # It logs a warning when rotation makes the frames' size differ from the source's: expected here.
    log = logging.getLogger("imageio_ffmpeg")
    was_disabled, log.disabled = log.disabled, True
    try:
        meta = parse_ffmpeg_header(header)
    except (IndexError, AttributeError, ValueError) as e:
        raise VideoError(f"{path}: cannot parse ffmpeg's description of the video ({type(e).__name__}: {e})") from None
    finally:
        log.disabled = was_disabled
    # moviepy 1.0.3 ffmpeg_parse_infos: the first "Duration: " line, HH:MM:SS.ss
    duration = None
    for line in header.splitlines():
        if "Duration: " in line:
            m = re.findall(r"([0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9])", line)
            if m:
                h, mi, s = m[0].split(":")
                duration = 3600 * float(h) + 60 * float(mi) + float(s)
            break
    if duration is None:
        raise VideoError(f"{path}: ffmpeg reports no duration (a stream, not a file?)")
    return VideoMeta(path=path, fps=float(meta["fps"]), size=tuple(meta["size"]),
                     source_size=tuple(meta["source_size"]), rotate=int(meta.get("rotate", 0)),
                     duration=duration, has_audio=has_audio_stream(header), header=header)


def probe(path: str | Path) -> str:
    """ffmpeg's description of `path` (`ffmpeg -i path`, no output: what moviepy's probe runs).
    Raises MissingFileError / VideoError (file named) when there is no readable video."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: video file not found")
    proc = subprocess.run([ffmpeg_exe(), "-nostdin", "-i", str(path)], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    text = proc.stderr.decode("utf-8", "replace")
    if "Input #0" not in text or not re.search(r"Stream #0:\d+.*: Video: ", _input_section(text)):
        raise VideoError(_problem(path, text))
    return text


class _PipeReader(threading.Thread):
    """Drains one pipe into memory (ffmpeg writes several outputs at once: none may block)."""

    def __init__(self, fd: int):
        super().__init__(daemon=True)
        self.fd, self.chunks = fd, []
        self.start()

    def run(self) -> None:
        with os.fdopen(self.fd, "rb", buffering=0) as f:
            while chunk := f.read(1 << 16):
                self.chunks.append(chunk)

    def data(self) -> bytes:
        self.join()
        return b"".join(self.chunks)


class VideoRun:
    """A running `ffmpeg` decode of one video; use as a context manager.

    Outputs, each with the reference's own options (module docstring):
    - video: every frame of the reference's stream (select=None: imageio's rgb24 image2pipe,
      constant frame rate), or only the decoded frames whose 0-based decode index is in
      `select` (a `select` filter before the conversion to rgb24, no rate conversion: the
      other frames are decoded but never converted or sent);
    - timing (timing=True): the reference's constant-rate stream again, into ffmpeg's null
      muxer, with `-stats_enc_pre` writing for each of its frames n the decoded frame it
      shows (`ni`) and its time base: after finish(), `decoded_of[n]` maps the reference's
      frame numbers to decoded ones and `rate` (a Fraction, frames/s) is that stream's rate;
    - audio (audio=True): moviepy's `-f s16le -ar 44100 -ac 2` stream.

    `meta` (VideoMeta) is available after entering. `frames()` yields (index, frame): the
    reference's frame number (select=None) or the decoded index (select given); frame is a
    uint8 [H, W, 3] RGB view into a reused buffer, valid until the next frame. `finish()` waits
    for ffmpeg and returns the audio int16 [n, 2] at 44.1 kHz (None when audio=False), raising
    VideoError if ffmpeg failed. Leaving the block early kills ffmpeg.
    """

    def __init__(self, path: str | Path, audio: bool = True, select: list[int] | None = None,
                 timing: bool = False, max_frames: int | None = None):
        self.path = Path(path)
        self.audio = audio
        self.select = sorted(set(select)) if select is not None else None
        self.timing = timing
        # frames of the constant-rate stream after which both video outputs stop (ffmpeg then
        # stops decoding video; the audio goes on to the end): None for all
        self.max_frames = max_frames
        self.proc = None
        self.meta: VideoMeta | None = None
        self.n_frames = 0
        self._readers: dict[str, _PipeReader] = {}

    def _limit(self, selected: bool) -> list[str]:
        # -frames:v counts an output's frames: the constant-rate outputs stop at max_frames,
        # the select output after its last selected frame.
        if self.max_frames is None:
            return []
        return ["-frames:v", str(len(self.select) if selected else self.max_frames)]

    def _pipe(self, name: str, fds: list[int]) -> str:
        r, w = os.pipe()
        fds.append(w)
        self._readers[name] = r  # replaced by its reader once ffmpeg runs
        return f"pipe:{w}"

    def __enter__(self) -> "VideoRun":
        from imageio_ffmpeg._parsing import LogCatcher  # imageio's reader waits for the header the same way

        if not self.path.is_file():
            raise MissingFileError(f"{self.path}: video file not found")
        # One decoder thread: decoding is bit-exact at any thread count, and one thread per video
        # spends the least CPU per video (parallelism comes from decoding several videos at once).
        cmd = [ffmpeg_exe(), "-nostdin", "-threads", "1", "-i", str(self.path)]
        fds: list[int] = []
        if self.audio:
            # moviepy's reader: '-i f -vn -loglevel error -f s16le -acodec pcm_s16le -ar 44100 -ac 2 -'
            # (the log level changes only what is printed)
            cmd += ["-vn", "-f", "s16le", "-acodec", "pcm_s16le", "-ar", str(AUDIO_RATE),
                    "-ac", str(AUDIO_CHANNELS), self._pipe("audio", fds)]
        if self.timing:
            # The constant-rate stream image2pipe makes (-fps_mode cfr is its default), its frames
            # only wrapped, not converted; per frame: its number and the decoded frame it shows.
            cmd += ["-an", "-fps_mode", "cfr", "-c:v", "wrapped_avframe", *self._limit(False),
                    "-stats_enc_pre", self._pipe("timing", fds), "-stats_enc_pre_fmt", "{n} {ni} {tb}", "-f", "null", "-"]
        if self.select is not None:
            # filtergraph escaping: '\\,' is a comma inside the expression (no shell is involved)
            expr = "+".join(f"eq(n\\,{i})" for i in self.select) or "0"
            cmd += ["-vf", f"select={expr}", "-fps_mode", "passthrough"]
        # imageio-ffmpeg's read_frames: '-i f -pix_fmt rgb24 -vcodec rawvideo -f image2pipe -'
        cmd += [*self._limit(self.select is not None), "-pix_fmt", "rgb24", "-vcodec", "rawvideo", "-f", "image2pipe", "-"]
        # A name starting with '-' is safe: it follows -i, and no shell is involved.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, pass_fds=tuple(fds), bufsize=1 << 20)
        for w in fds:
            os.close(w)
        self._readers = {k: _PipeReader(r) for k, r in self._readers.items()}
        self._log = LogCatcher(self.proc.stderr)
        while not self._log.header and self._log.is_alive():
            self._log.join(0.002)
        if not self._log.header:
            text = self._log.get_text(1.0)
            self._stop()
            if "Input #0" in text and self.audio and not has_audio_stream(text) and re.search(
                    r"Stream #0:\d+.*: Video: ", _input_section(text)):
                raise NoAudioError(f"{self.path}: has no audio stream (the model needs the sound)")
            raise VideoError(_problem(self.path, text))
        self.meta = parse_header(self.path, self._log.header)
        return self

    def frames(self):
        w, h = self.meta.size
        nbytes = w * h * 3
        buf = bytearray(nbytes)  # reused: the caller copies what it keeps
        view = memoryview(buf)
        stdout = self.proc.stdout
        k = 0
        while True:
            got = 0
            while got < nbytes:
                n = stdout.readinto(view[got:])
                if not n:
                    break
                got += n
            if got < nbytes:  # EOF (a partial last frame is dropped, as imageio does not keep it)
                break
            self.n_frames = k + 1
            index = k if self.select is None else self.select[k]
            yield index, np.frombuffer(buf, np.uint8).reshape(h, w, 3)
            k += 1

    def finish(self) -> np.ndarray | None:
        """Drain, wait for ffmpeg, return the audio int16 [n, 2] (44.1 kHz) or None."""
        self.proc.stdout.read()
        rc = self.proc.wait()
        self._log.join(2.0)
        raw = {k: r.data() for k, r in self._readers.items()}
        text = self._log.get_text(0.5)
        if rc != 0:
            if self.audio and not self.meta.has_audio:
                raise NoAudioError(f"{self.path}: has no audio stream (the model needs the sound)")
            raise VideoError(_problem(self.path, text))
        if self.timing:
            rows = [ln.split() for ln in raw["timing"].decode().splitlines() if ln.strip()]
            self.decoded_of = [int(row[1]) for row in rows]
            # the constant-rate stream's time base is 1 / its frame rate (e.g. 1001/30000)
            self.rate = 1 / Fraction(rows[0][2]) if rows else None
        if not self.audio:
            return None
        audio = raw["audio"][: len(raw["audio"]) - len(raw["audio"]) % (2 * AUDIO_CHANNELS)]
        return np.frombuffer(audio, "<i2").reshape(-1, AUDIO_CHANNELS)

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
            try:
                self.proc.stdout.close()
            except OSError:
                pass

    def __exit__(self, *exc) -> None:
        self._stop()
