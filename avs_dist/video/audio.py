"""The reference's 16 kHz wav samples, computed by moviepy 1.0.3's own code from a decoded stream.

The reference writes the wav with `VideoFileClip(mp4).audio.write_audiofile(wav, fps=16000)`.
In moviepy 1.0.3 that is: ffmpeg decodes the audio to 44.1 kHz stereo int16 (`-ar 44100 -ac 2`,
whatever the source's rate and channels: mono is duplicated, 5.1 downmixed by ffmpeg); its
`FFMPEG_AudioReader` keeps a 200000-sample buffer of it; `iter_chunks(fps=16000,
chunksize=2000)` asks for the samples nearest to t = k / 16000 for k < int(16000 * duration)
(duration: the container's, 10 ms resolution) through that buffer (whose refills, as written,
shift the stream by a sample; past the end the last sample is repeated); `to_soundarray`
clips to +-0.99 and scales by 32768 into int16; ffmpeg writes those int16 samples to a
16-bit stereo wav unchanged. So the wav is not a band-limited resampling: it is moviepy's
sample picking, and only moviepy's code reproduces it sample for sample.

`moviepy_wav_samples` runs moviepy's reader and clip classes on the int16 stream that
`ffmpeg.VideoRun` decoded with moviepy's ffmpeg options (no second ffmpeg process): the
reader's `initialize` / `read_chunk` read that array instead of a pipe; everything else
(buffering, index rounding, clipping, quantisation) is moviepy's.
"""
from __future__ import annotations

import io
import warnings
import wave
from pathlib import Path

import numpy as np

WAV_RATE = 16000  # write_audiofile(fps=16000)
WRITE_CHUNK = 2000  # write_audiofile(buffersize=2000)
READER_BUFFER = 200000  # VideoFileClip(audio_buffersize=200000)


class NeedsSeekError(RuntimeError):
    """moviepy would restart ffmpeg with -ss here (never on a sequential write)."""


def _reader_class():
    from moviepy.audio.io.readers import FFMPEG_AudioReader

    class ArrayAudioReader(FFMPEG_AudioReader):
        """moviepy's FFMPEG_AudioReader whose 'ffmpeg pipe' is an in-memory int16 stream."""

        def __init__(self, samples: np.ndarray, duration: float, fps: int, buffersize: int = READER_BUFFER):
            # FFMPEG_AudioReader.__init__ of moviepy 1.0.3, with the probe's duration given
            self.filename = "<decoded stream>"
            self.nbytes = 2
            self.fps = fps
            self.f = "s16le"
            self.acodec = "pcm_s16le"
            self.nchannels = samples.shape[1]
            self._raw = np.ascontiguousarray(samples, dtype="<i2").tobytes()
            self.duration = duration
            self.infos = {}
            self.proc = None
            self.nframes = int(self.fps * self.duration)
            self.buffersize = min(self.nframes + 1, buffersize)
            self.buffer = None
            self.buffer_startframe = 1
            self.initialize()
            self.buffer_around(1)

        def initialize(self, starttime=0):
            if starttime != 0:
                raise NeedsSeekError(f"moviepy would seek to {starttime} s")

            class _Proc:
                stdout = io.BytesIO(self._raw)

            self.proc = _Proc()
            self.pos = np.round(self.fps * starttime)

        def close_proc(self):
            self.proc = None

    return ArrayAudioReader


def moviepy_wav_samples(stream: np.ndarray, duration: float, stream_rate: int = 44100,
                        wav_rate: int = WAV_RATE) -> np.ndarray:
    """int16 [n, 2] stream at `stream_rate` (what moviepy's ffmpeg reader decodes) + the
    container duration (s) -> the int16 [int(wav_rate * duration), 2] samples that
    `write_audiofile(wav, fps=wav_rate)` writes. Raises NeedsSeekError where moviepy would
    re-run ffmpeg with a seek (not seen on sequential writes)."""
    from moviepy.audio.AudioClip import AudioClip

    reader = _reader_class()(stream, duration, stream_rate)
    clip = AudioClip()  # what AudioFileClip.__init__ sets up around its reader
    clip.reader = reader
    clip.fps = stream_rate
    clip.duration = clip.end = reader.duration
    clip.buffersize = reader.buffersize
    clip.make_frame = lambda t: reader.get_frame(t)
    clip.nchannels = reader.nchannels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # moviepy warns where it repeats the last sample
        chunks = list(clip.iter_chunks(chunksize=WRITE_CHUNK, quantize=True, nbytes=2, fps=wav_rate, logger=None))
    if not chunks:
        return np.zeros((0, reader.nchannels), np.int16)
    return np.ascontiguousarray(np.vstack(chunks), dtype=np.int16)


def write_wav(path: str | Path, samples: np.ndarray, rate: int = WAV_RATE) -> None:
    """int16 [n, channels] -> a 16-bit PCM wav (samples as given; the header is Python's `wave`)."""
    samples = np.ascontiguousarray(samples, dtype="<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())


def read_wav_int16(path: str | Path) -> tuple[np.ndarray, int]:
    """A 16-bit PCM wav -> (int16 [n, channels], rate): for comparing samples exactly."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: {8 * w.getsampwidth()}-bit wav, expected 16-bit")
        data = np.frombuffer(w.readframes(w.getnframes()), "<i2")
        return data.reshape(-1, w.getnchannels()), w.getframerate()
