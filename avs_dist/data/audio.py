"""Audio features: wav -> VGGish log-mel examples exactly as AVSBench computes them.

The recipe (the VGGish front end, see docs/avsbench-format §2):
- 16-bit PCM read as int16 / 32768, stereo averaged to mono, resampled to 16 kHz;
- frames of 400 samples every 160 (25 ms / 10 ms), no padding at either end;
- periodic Hann window, |rfft| with FFT length 512 (257 bins over 0..8000 Hz);
- 64 triangular filters linear on the HTK mel scale (mel = 1127 ln(1 + f/700)), band edges
  linspace(mel(125), mel(7500), 66), DC bin weight 0;
- log(mel + 0.01); examples of 96 frames with hop 96, leftover frames dropped -> [N,1,96,64];
- AVSBench pads to 5 examples by repeating the last one.

AVSBench ships the result as `.pkl` files: a torch tensor [5,1,96,64] written with
`pickle.dump` and read with `pickle.load`. `load_logmel_pkl` reads those (and `torch.save`
files, and numpy arrays) through an unpickler that only admits tensor / array rebuilding.
"""
from __future__ import annotations

import functools
import io
import math
import pickle
import wave
import zipfile
from pathlib import Path

import numpy as np

from avs_dist.errors import UserError

SAMPLE_RATE = 16000
WINDOW = 400
HOP = 160
FFT_LENGTH = 512
NUM_BANDS = 64
MEL_LOW_HZ = 125.0
MEL_HIGH_HZ = 7500.0
LOG_OFFSET = 0.01
EXAMPLE_FRAMES = 96
NUM_EXAMPLES = 5
EXAMPLE_SHAPE = (NUM_EXAMPLES, 1, EXAMPLE_FRAMES, NUM_BANDS)
# The smallest clip that yields one example: 96 frames of 400 samples every 160.
MIN_SAMPLES = WINDOW + (EXAMPLE_FRAMES - 1) * HOP


class AudioError(UserError, ValueError):
    """An audio file (wav or .pkl) that cannot be read or has the wrong shape."""


# ---------------------------------------------------------------------------------------
# wav reading and resampling


def _read_riff(path: Path) -> tuple[int, int, int, bytes, bool]:
    """(channels, bytes per sample, rate, raw data, is_float) from a RIFF/WAVE file's chunks.

    Needed for what `wave` rejects before Python 3.12: IEEE-float data and
    WAVE_FORMAT_EXTENSIBLE headers (which 24-bit and multi-channel writers often use)."""
    data = path.read_bytes()
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioError(f"{path}: not a RIFF/WAVE file")
    fmt = raw = None
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        body = data[pos + 8:pos + 8 + size]
        if cid == b"fmt ":
            fmt = body
        elif cid == b"data":
            raw = body
        pos += 8 + size + (size & 1)  # chunks are word-aligned
    if fmt is None or len(fmt) < 16 or raw is None:
        raise AudioError(f"{path}: wav without a valid 'fmt ' and 'data' chunk")
    tag, channels = int.from_bytes(fmt[0:2], "little"), int.from_bytes(fmt[2:4], "little")
    rate, block = int.from_bytes(fmt[4:8], "little"), int.from_bytes(fmt[12:14], "little")
    if tag == 0xFFFE and len(fmt) >= 26:  # extensible: the real format leads the sub-format GUID
        tag = int.from_bytes(fmt[24:26], "little")
    if tag not in (1, 3) or channels <= 0 or block % channels:
        raise AudioError(f"{path}: unsupported wav encoding (format tag {tag}); use PCM or float")
    return channels, block // channels, rate, raw[: len(raw) - len(raw) % block], tag == 3


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a wav as float64 mono and its sample rate.

    Integer PCM of 8 (unsigned), 16, 24 and 32 bits is scaled by 2^(bits-1), so 16-bit is
    int16 / 32768 like VGGish; 32/64-bit float data is taken as is. Channels are averaged.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: wav file not found")
    is_float = False
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(n)
    except wave.Error:
        channels, width, rate, raw, is_float = _read_riff(path)
    except (EOFError, OSError) as e:
        raise AudioError(f"{path}: not a readable wav ({e})") from None
    if rate <= 0 or channels <= 0:
        raise AudioError(f"{path}: invalid wav header (rate {rate}, channels {channels})")
    if is_float and width in (4, 8):
        x = np.frombuffer(raw, "<f4" if width == 4 else "<f8").astype(np.float64)
    elif is_float:
        raise AudioError(f"{path}: unsupported float sample width {8 * width} bits")
    elif width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float64) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float64) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        x = v.astype(np.float64) / float(1 << 23)
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float64) / float(1 << 31)
    else:
        raise AudioError(f"{path}: unsupported sample width {8 * width} bits (8/16/24/32-bit PCM)")
    usable = len(x) - len(x) % channels  # a truncated last frame is dropped
    x = x[:usable].reshape(-1, channels)
    return (x[:, 0].copy() if channels == 1 else x.mean(axis=1)), rate


def _kaiser(u: np.ndarray, beta: float) -> np.ndarray:
    """Continuous Kaiser window on [-1, 1] (zero outside)."""
    inside = np.abs(u) <= 1.0
    arg = np.sqrt(np.clip(1.0 - u * u, 0.0, None))
    return np.where(inside, np.i0(beta * arg) / np.i0(beta), 0.0)


def resample(x: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE, zero_crossings: int = 16,
             beta: float = 8.6) -> np.ndarray:
    """Band-limited resampling with a Kaiser-windowed sinc (numpy only).

    Output sample n sits at input time n * sr_in / sr_out. For a rational ratio the
    fractional offsets repeat, so one filter per distinct phase is built and applied with a
    gather. The cutoff is the lower of the two Nyquist frequencies (anti-aliasing when
    downsampling); each phase's taps are normalised to unit DC gain. Output length is
    floor(len(x) * sr_out / sr_in); samples outside the input are taken as zero.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"resample expects a 1-D signal, got shape {x.shape}")
    sr_in, sr_out = int(sr_in), int(sr_out)
    if sr_in <= 0 or sr_out <= 0:
        raise ValueError(f"sample rates must be positive, got {sr_in} -> {sr_out}")
    if sr_in == sr_out:
        return x.copy()
    g = math.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    n_out = len(x) * up // down
    if n_out == 0:
        return np.zeros(0)
    cutoff = min(1.0, sr_out / sr_in)  # as a fraction of the input Nyquist
    half = int(math.ceil(zero_crossings / cutoff))
    offsets = np.arange(-half + 1, half + 1)  # taps relative to floor(t)

    pos = np.arange(n_out, dtype=np.int64) * down
    base, phase = pos // up, pos % up
    phases, inverse = np.unique(phase, return_inverse=True)
    d = offsets[None, :] - (phases[:, None] / up)  # distance of each tap from t, input samples
    taps = cutoff * np.sinc(cutoff * d) * _kaiser(d / half, beta)
    taps /= taps.sum(axis=1, keepdims=True)

    padded = np.concatenate([np.zeros(half), x, np.zeros(half + 1)])
    out = np.empty(n_out)
    chunk = 1 << 15  # bounds the [chunk, taps] gather
    for s in range(0, n_out, chunk):
        e = min(n_out, s + chunk)
        idx = base[s:e, None] + offsets[None, :] + half
        out[s:e] = np.einsum("ij,ij->i", padded[idx], taps[inverse[s:e]])
    return out


# ---------------------------------------------------------------------------------------
# log-mel


def hz_to_mel(f):
    """HTK mel scale, as VGGish uses it."""
    return 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)


@functools.lru_cache(maxsize=1)
def _mel_matrix() -> np.ndarray:
    m = mel_filterbank()
    m.setflags(write=False)
    return m


def mel_filterbank() -> np.ndarray:
    """[257, 64] weights from |rfft| bins to mel bands (a fresh array)."""
    bins_mel = hz_to_mel(np.linspace(0.0, SAMPLE_RATE / 2, FFT_LENGTH // 2 + 1))
    edges = np.linspace(hz_to_mel(MEL_LOW_HZ), hz_to_mel(MEL_HIGH_HZ), NUM_BANDS + 2)
    lo, center, hi = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel[:, None] - lo) / (center - lo)
    falling = (hi - bins_mel[:, None]) / (hi - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0  # VGGish zeroes the DC bin
    return weights


def periodic_hann(n: int = WINDOW) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


def log_mel_frames(samples: np.ndarray) -> np.ndarray:
    """16 kHz mono float samples -> log-mel frames float64 [F, 64] (no example grouping)."""
    x = np.asarray(samples, dtype=np.float64)
    n_frames = 1 + (len(x) - WINDOW) // HOP if len(x) >= WINDOW else 0
    if n_frames == 0:
        return np.zeros((0, NUM_BANDS))
    frames = np.lib.stride_tricks.sliding_window_view(x, WINDOW)[::HOP][:n_frames]
    spectrum = np.abs(np.fft.rfft(frames * periodic_hann(), FFT_LENGTH))
    return np.log(spectrum @ _mel_matrix() + LOG_OFFSET)


def log_mel_examples(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mono samples (any rate) -> float32 [N, 1, 96, 64] VGGish examples (N may be 0)."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 2:  # [n, channels]
        x = x.mean(axis=1)
    if sample_rate != SAMPLE_RATE:
        x = resample(x, sample_rate, SAMPLE_RATE)
    frames = log_mel_frames(x)
    n = len(frames) // EXAMPLE_FRAMES
    return frames[: n * EXAMPLE_FRAMES].reshape(n, 1, EXAMPLE_FRAMES, NUM_BANDS).astype(np.float32)


def pad_examples(x: np.ndarray, n: int = NUM_EXAMPLES, source: str | Path | None = None) -> np.ndarray:
    """Make exactly n examples: repeat the last one (AVSBench) or keep the first n.

    A clip longer than n seconds keeps its first n examples: AVSBench frames are the first
    5 seconds of the clip, so that is the audio that goes with them.
    """
    where = f"{source}: " if source is not None else ""
    if len(x) == 0:
        raise AudioError(f"{where}audio shorter than {MIN_SAMPLES / SAMPLE_RATE:.4f} s gives no 0.96 s example")
    if len(x) >= n:
        return np.ascontiguousarray(x[:n])
    return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)], axis=0)


def logmel_from_wav(path: str | Path) -> np.ndarray:
    """A wav file -> float32 [5, 1, 96, 64], exactly what AVSBench stores in its .pkl."""
    samples, rate = read_wav(path)
    return pad_examples(log_mel_examples(samples, rate), NUM_EXAMPLES, source=path)


# ---------------------------------------------------------------------------------------
# .pkl files


def _load_from_bytes_safe(b: bytes):
    # torch pickles a storage as torch.save bytes; load them without running arbitrary code.
    import torch
    return torch.load(io.BytesIO(b), weights_only=True)


class _TensorUnpickler(pickle.Unpickler):
    """Admits only what a pickled tensor or numpy array needs."""

    _NUMPY = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module, name):
        if (module, name) in self._NUMPY:
            return super().find_class(module, name)
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _load_from_bytes_safe
        if (module, name) in {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
                              ("collections", "OrderedDict"), ("torch", "Size"),
                              ("_codecs", "encode")}:  # protocol 2 stores bytes as latin-1 text
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only tensors and arrays are allowed)")


def _to_numpy(obj, path: Path) -> np.ndarray:
    if isinstance(obj, np.ndarray):
        return obj
    try:
        import torch
        if isinstance(obj, torch.Tensor):
            return obj.detach().cpu().float().numpy()
    except ImportError:
        pass
    raise AudioError(f"{path}: holds a {type(obj).__name__}, expected a tensor or array of shape {list(EXAMPLE_SHAPE)}")


def load_logmel_pkl(path: str | Path) -> np.ndarray:
    """An AVSBench .pkl (pickled torch tensor), a torch.save file or a pickled numpy array
    -> float32 [5, 1, 96, 64]. [5, 96, 64] is accepted and given the channel axis."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: log-mel file not found")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        # torch.save's zip format; is_zipfile alone is fooled by a pickle that embeds a zip
        if head == b"PK\x03\x04" and zipfile.is_zipfile(path):
            import torch
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with open(path, "rb") as f:
                obj = _TensorUnpickler(f).load()
            if isinstance(obj, int):  # legacy torch.save starts with a pickled magic number
                import torch
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except AudioError:
        raise
    except Exception as e:  # unpickling raises many types; all mean "unreadable"
        raise AudioError(f"{path}: cannot read log-mel pickle ({type(e).__name__}: {e})") from None
    x = np.asarray(_to_numpy(obj, path), dtype=np.float32)
    if x.shape == (NUM_EXAMPLES, EXAMPLE_FRAMES, NUM_BANDS):
        x = x[:, None]
    if x.shape != EXAMPLE_SHAPE:
        raise AudioError(f"{path}: log-mel shape {list(x.shape)}, expected {list(EXAMPLE_SHAPE)}")
    if not np.isfinite(x).all():
        raise AudioError(f"{path}: log-mel holds NaN or inf")
    return np.ascontiguousarray(x)


class _TorchPickler(pickle.Pickler):
    """pickle.dump of a tensor, but byte-reproducible.

    torch pickles a storage through the legacy torch.save format, whose key is the storage's
    memory address; the zip format has none, and `pickle.load` reads both the same way.
    """

    def reducer_override(self, obj):
        import torch
        if isinstance(obj, torch.storage.TypedStorage):
            import warnings
            b = io.BytesIO()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.save(obj, b)
            return (torch.storage._load_from_bytes, (b.getvalue(),))
        return NotImplemented


def save_logmel_pkl(path: str | Path, x: np.ndarray) -> None:
    """Write [5, 1, 96, 64] as AVSBench does: a pickled float32 torch tensor."""
    import torch
    x = np.asarray(x, dtype=np.float32)
    if x.shape != EXAMPLE_SHAPE:
        raise AudioError(f"{path}: refusing to write log-mel of shape {list(x.shape)}, expected {list(EXAMPLE_SHAPE)}")
    with open(path, "wb") as f:
        _TorchPickler(f, protocol=4).dump(torch.from_numpy(np.ascontiguousarray(x)))


def load_audio(record) -> tuple[np.ndarray, str]:
    """A VideoRecord's audio as float32 [5, 1, 96, 64] and its source: "pkl" when the .pkl
    exists (what AVSBench trains on), else "wav" computed here."""
    if record.logmel_path is not None and Path(record.logmel_path).is_file():
        return load_logmel_pkl(record.logmel_path), "pkl"
    if record.wav_path is not None and Path(record.wav_path).is_file():
        return logmel_from_wav(record.wav_path), "wav"
    raise AudioError(f"video {record.name!r}: neither {record.logmel_path} nor {record.wav_path} exists")
