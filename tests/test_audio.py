"""VGGish log-mel features, wav reading, resampling and .pkl files (avs_dist.data.audio)."""
import math
import pickle
import wave
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from avs_dist.data import audio as A

SR = 16000


def band_centers_hz():
    # Independently of the module: HTK mel, 66 equally spaced edges from 125 to 7500 Hz.
    lo, hi = 1127 * math.log(1 + 125 / 700), 1127 * math.log(1 + 7500 / 700)
    edges = [lo + (hi - lo) * i / 65 for i in range(66)]
    return [700 * (math.exp(m / 1127) - 1) for m in edges[1:-1]]


def tone(f, seconds, sr=SR, amp=0.5):
    return amp * np.sin(2 * np.pi * f * np.arange(int(round(seconds * sr))) / sr)


def write_wav(path, samples_int, sr=SR, width=2, channels=1):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(sr)
        w.writeframes(samples_int.tobytes())
    return path


def test_filterbank_rows_single_peak_and_zero_dc():
    m = A.mel_filterbank()
    assert m.shape == (257, 64)
    assert np.all(m[0] == 0)
    for b in range(64):
        col = m[:, b]
        nz = np.flatnonzero(col)
        assert len(nz) >= 1
        assert np.all(np.diff(nz) == 1), f"band {b} support is not contiguous"
        d = np.diff(col[nz[0]:nz[-1] + 1])
        # rises then falls: the sign of the slope changes at most once
        signs = np.sign(d[d != 0])
        assert np.sum(signs[1:] != signs[:-1]) <= 1, f"band {b} has more than one peak"
        assert col.max() <= 1.0


@pytest.mark.parametrize("band", [0, 5, 17, 30, 44, 58, 63])
def test_tone_peaks_in_band_with_nearest_center(band):
    centers = band_centers_hz()
    f = centers[band] * 1.004  # a little off-centre: still closest to this band's centre
    assert int(np.argmin([abs(c - f) for c in centers])) == band
    x = A.log_mel_examples(tone(f, 1.0), SR)
    assert x.shape == (1, 1, 96, 64) and x.dtype == np.float32
    assert int(np.argmax(x[0, 0].mean(axis=0))) == band


def test_frame_and_example_counts():
    assert len(A.log_mel_frames(np.zeros(SR))) == 98  # 1 + (16000 - 400) // 160
    assert A.log_mel_examples(np.zeros(SR), SR).shape[0] == 1
    assert A.log_mel_examples(np.zeros(int(5.3 * SR)), SR).shape[0] == 5  # 528 frames
    assert A.log_mel_examples(np.zeros(int(4.2 * SR)), SR).shape[0] == 4  # 418 frames
    assert A.log_mel_examples(np.zeros(15600), SR).shape[0] == 1  # exactly 96 frames
    assert A.log_mel_examples(np.zeros(15599), SR).shape[0] == 0
    assert A.log_mel_examples(np.zeros(399), SR).shape == (0, 1, 96, 64)


def test_pad_examples_repeats_last_and_truncates():
    x = np.arange(3, dtype=np.float32)[:, None, None, None] * np.ones((3, 1, 96, 64), np.float32)
    p = A.pad_examples(x)
    assert p.shape == (5, 1, 96, 64)
    assert np.array_equal(p[:3], x) and np.all(p[3] == 2) and np.all(p[4] == 2)
    y = np.arange(7, dtype=np.float32)[:, None, None, None] * np.ones((7, 1, 96, 64), np.float32)
    assert np.array_equal(A.pad_examples(y), y[:5])
    with pytest.raises(A.AudioError, match="clip.wav"):
        A.pad_examples(np.zeros((0, 1, 96, 64), np.float32), source="clip.wav")


def test_silence_is_log_offset():
    x = A.log_mel_examples(np.zeros(2 * SR), SR)
    assert np.all(x == np.float32(math.log(0.01)))


def test_one_frame_matches_naive_computation():
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, 0.5, 2000) + tone(1234.5, 2000 / SR)
    j = 3
    frame = x[j * 160: j * 160 + 400]
    windowed = [frame[n] * (0.5 - 0.5 * math.cos(2 * math.pi * n / 400)) for n in range(400)]
    mags = []
    for k in range(257):
        re = sum(windowed[n] * math.cos(2 * math.pi * k * n / 512) for n in range(400))
        im = sum(windowed[n] * math.sin(2 * math.pi * k * n / 512) for n in range(400))
        mags.append(math.hypot(re, im))
    mel = lambda f: 1127 * math.log(1 + f / 700)
    lo, hi = mel(125), mel(7500)
    edges = [lo + (hi - lo) * i / 65 for i in range(66)]
    expected = []
    for b in range(64):
        total = 0.0
        for k in range(1, 257):  # the DC bin has weight 0
            m = mel(k * 8000 / 256)
            w = max(0.0, min((m - edges[b]) / (edges[b + 1] - edges[b]), (edges[b + 2] - m) / (edges[b + 2] - edges[b + 1])))
            total += w * mags[k]
        expected.append(math.log(total + 0.01))
    got = A.log_mel_frames(x)[j]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("sr", [44100, 48000, 22050])
def test_resampled_tone_keeps_its_band(sr):
    centers = band_centers_hz()
    f = centers[40]
    x = A.log_mel_examples(tone(f, 2.0, sr=sr), sr)
    ref = A.log_mel_examples(tone(f, 2.0), SR)
    assert x.shape == ref.shape == (2, 1, 96, 64)
    assert int(np.argmax(x[0, 0].mean(axis=0))) == 40
    # a band-limited resampler reproduces the 16 kHz features closely
    assert np.abs(x[:, :, 5:-5, 35:46] - ref[:, :, 5:-5, 35:46]).max() < 0.05


def test_resample_rejects_aliases_and_keeps_length():
    sr = 44100
    x = tone(10000, 1.0, sr=sr)  # above the 8 kHz output Nyquist
    y = A.resample(x, sr, SR)
    assert len(y) == SR
    assert np.sqrt(np.mean(y[100:-100] ** 2)) < 1e-3
    assert np.array_equal(A.resample(x, sr, sr), x)


def test_read_wav_16bit_scale_and_stereo_mean(tmp_path):
    left = np.array([0, 16384, -32768, 32767, 100], dtype="<i2")
    right = np.array([0, -16384, -32768, 1, 101], dtype="<i2")
    mono, sr = A.read_wav(write_wav(tmp_path / "m.wav", left))
    assert sr == SR and mono.dtype == np.float64
    assert np.array_equal(mono, left / 32768.0)
    inter = np.stack([left, right], axis=1).reshape(-1)
    st, _ = A.read_wav(write_wav(tmp_path / "s.wav", inter, sr=44100, channels=2))
    assert np.array_equal(st, (left.astype(float) + right) / 2 / 32768.0)


def test_read_wav_8_24_32_bit(tmp_path):
    u8 = np.array([128, 255, 0, 192], dtype=np.uint8)
    x, _ = A.read_wav(write_wav(tmp_path / "a.wav", u8, width=1))
    assert np.array_equal(x, [0.0, 127 / 128, -1.0, 0.5])
    v24 = np.array([0, 1 << 22, -(1 << 23), (1 << 23) - 1])
    raw = np.array([[(v >> s) & 0xFF for s in (0, 8, 16)] for v in (v24 % (1 << 24))], dtype=np.uint8)
    x, _ = A.read_wav(write_wav(tmp_path / "b.wav", raw, width=3))
    assert np.array_equal(x, v24 / float(1 << 23))
    v32 = np.array([0, 1 << 30, -(1 << 31)], dtype="<i4")
    x, _ = A.read_wav(write_wav(tmp_path / "c.wav", v32, width=4))
    assert np.array_equal(x, [0.0, 0.5, -1.0])


def riff(path, tag, channels, width, rate, data, extensible=False):
    import struct
    block = channels * width
    if extensible:  # WAVE_FORMAT_EXTENSIBLE: the real tag leads the sub-format GUID
        fmt = struct.pack("<HHIIHH", 0xFFFE, channels, rate, rate * block, block, 8 * width)
        fmt += struct.pack("<HHI", 22, 8 * width, 0) + struct.pack("<H", tag) + bytes(14)
    else:
        fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, 8 * width)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"LIST" + struct.pack("<I", 3) + b"abc\x00"  # odd-sized chunk, padded
    body += b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def test_read_wav_float_and_extensible(tmp_path):
    f32 = np.array([0.0, 0.25, -0.5, 0.75, 0.125, -1.0], dtype="<f4")
    x, sr = A.read_wav(riff(tmp_path / "f.wav", 3, 2, 4, 22050, f32.tobytes()))
    assert sr == 22050 and np.array_equal(x, [0.125, 0.125, -0.4375])
    x, _ = A.read_wav(riff(tmp_path / "fx.wav", 3, 1, 4, SR, f32.tobytes(), extensible=True))
    assert np.array_equal(x, f32.astype(np.float64))
    i16 = np.array([1, -2, 16384], dtype="<i2")
    x, _ = A.read_wav(riff(tmp_path / "ix.wav", 1, 1, 2, SR, i16.tobytes(), extensible=True))
    assert np.array_equal(x, i16 / 32768.0)
    with pytest.raises(A.AudioError, match="alaw.wav.*format tag 6"):
        A.read_wav(riff(tmp_path / "alaw.wav", 6, 1, 1, 8000, bytes(10)))


def test_read_wav_errors_name_the_file(tmp_path):
    bad = tmp_path / "garbage.wav"
    bad.write_bytes(b"this is not a wav file at all")
    with pytest.raises(A.AudioError, match="garbage.wav"):
        A.read_wav(bad)
    with pytest.raises(A.AudioError, match="missing.wav"):
        A.read_wav(tmp_path / "missing.wav")


def test_logmel_from_wav_pads_short_clip(tmp_path):
    pcm = np.round(tone(1000, 4.2) * 32767).astype("<i2")
    x = A.logmel_from_wav(write_wav(tmp_path / "short.wav", pcm))
    assert x.shape == (5, 1, 96, 64) and x.dtype == np.float32
    assert np.array_equal(x[:4], A.log_mel_examples(pcm / 32768.0, SR))
    assert np.array_equal(x[4], x[3])
    with pytest.raises(A.AudioError, match="tiny.wav"):
        A.logmel_from_wav(write_wav(tmp_path / "tiny.wav", pcm[:15000]))


def test_load_pkl_formats(tmp_path):
    x = np.random.default_rng(1).normal(size=(5, 1, 96, 64)).astype(np.float32)
    with open(tmp_path / "pickled.pkl", "wb") as f:  # how AVSBench wrote its features
        pickle.dump(torch.from_numpy(x), f)
    with open(tmp_path / "pickled2.pkl", "wb") as f:  # Python 2 era protocol
        pickle.dump(torch.from_numpy(x), f, protocol=2)
    torch.save(torch.from_numpy(x), tmp_path / "saved.pkl")
    torch.save(torch.from_numpy(x), tmp_path / "legacy.pkl", _use_new_zipfile_serialization=False)
    with open(tmp_path / "array.pkl", "wb") as f:
        pickle.dump(x[:, 0], f)  # [5, 96, 64] is accepted too
    A.save_logmel_pkl(tmp_path / "ours.pkl", x)
    for name in ("pickled.pkl", "pickled2.pkl", "saved.pkl", "legacy.pkl", "array.pkl", "ours.pkl"):
        y = A.load_logmel_pkl(tmp_path / name)
        assert y.shape == (5, 1, 96, 64) and y.dtype == np.float32
        assert np.array_equal(y, x), name
    with open(tmp_path / "ours.pkl", "rb") as f:  # readable the AVSBench way
        assert torch.equal(pickle.load(f), torch.from_numpy(x))


def test_save_pkl_is_byte_reproducible(tmp_path):
    x = np.random.default_rng(2).normal(size=(5, 1, 96, 64)).astype(np.float32)
    A.save_logmel_pkl(tmp_path / "a.pkl", x)
    A.save_logmel_pkl(tmp_path / "b.pkl", x.copy())
    assert (tmp_path / "a.pkl").read_bytes() == (tmp_path / "b.pkl").read_bytes()


class _Evil:
    def __reduce__(self):
        return (exec, ("raise SystemExit('executed')",))


def test_load_pkl_errors_name_the_file(tmp_path):
    with open(tmp_path / "wrong.pkl", "wb") as f:
        pickle.dump(torch.zeros(4, 1, 96, 64), f)
    with pytest.raises(A.AudioError, match=r"wrong.pkl.*\[4, 1, 96, 64\]"):
        A.load_logmel_pkl(tmp_path / "wrong.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"\x00\x01 not a pickle")
    with pytest.raises(A.AudioError, match="junk.pkl"):
        A.load_logmel_pkl(tmp_path / "junk.pkl")
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(A.AudioError, match="evil.pkl.*refusing"):
        A.load_logmel_pkl(tmp_path / "evil.pkl")
    with open(tmp_path / "dict.pkl", "wb") as f:
        pickle.dump({"a": 1}, f)
    with pytest.raises(A.AudioError, match="dict.pkl"):
        A.load_logmel_pkl(tmp_path / "dict.pkl")
    with pytest.raises(A.AudioError, match="absent.pkl"):
        A.load_logmel_pkl(tmp_path / "absent.pkl")


def test_load_audio_prefers_pkl_then_wav(tmp_path):
    wav = write_wav(tmp_path / "v.wav", np.round(tone(700, 5.0) * 32767).astype("<i2"))
    pkl = tmp_path / "v.pkl"
    rec = SimpleNamespace(name="-v_1", logmel_path=pkl, wav_path=wav)
    x, src = A.load_audio(rec)
    assert src == "wav" and np.array_equal(x, A.logmel_from_wav(wav))
    A.save_logmel_pkl(pkl, np.zeros((5, 1, 96, 64), np.float32))
    x, src = A.load_audio(rec)
    assert src == "pkl" and np.all(x == 0)
    gone = SimpleNamespace(name="-v_2", logmel_path=tmp_path / "no.pkl", wav_path=tmp_path / "no.wav")
    with pytest.raises(A.AudioError, match="-v_2"):
        A.load_audio(gone)
