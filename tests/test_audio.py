from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from csm.audio import AudioError, load_audio, save_audio


def _sine(seconds: float, sr: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def test_resample_16k_to_24k(tmp_path):
    sf.write(tmp_path / "a.wav", _sine(0.5, 16_000), 16_000, subtype="FLOAT")
    wav = load_audio(tmp_path / "a.wav")
    assert wav.dtype == torch.float32 and wav.dim() == 1
    assert wav.shape[0] == 12_000
    ref = torch.from_numpy(_sine(0.5, 24_000))
    assert torch.allclose(wav[500:-500], ref[500:-500], atol=2e-3)  # soxr very high quality


def test_stereo_is_mixed_to_mono(tmp_path):
    left, right = _sine(0.1, 24_000), np.zeros(2400, np.float32)
    sf.write(tmp_path / "s.flac", np.stack([left, right], 1), 24_000)
    wav = load_audio(tmp_path / "s.flac")
    assert wav.shape == (2400,)
    assert torch.allclose(wav, torch.from_numpy(left) / 2, atol=1e-4)  # 16-bit flac


def test_ogg_and_save_roundtrip(tmp_path):
    save_audio(tmp_path / "o.ogg", torch.from_numpy(_sine(0.2, 24_000)), 24_000)
    assert load_audio(tmp_path / "o.ogg").shape[0] == pytest.approx(4800, abs=100)
    save_audio(tmp_path / "w.wav", torch.from_numpy(_sine(0.2, 24_000)) * 3)  # clipped, not wrapped
    back = load_audio(tmp_path / "w.wav")
    assert back.abs().max() <= 1.0 and back.shape == (4800,)


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match="nope.wav"):
        load_audio(tmp_path / "nope.wav")


def test_empty_file(tmp_path):
    sf.write(tmp_path / "e.wav", np.zeros(0, np.float32), 24_000)
    with pytest.raises(AudioError, match="e.wav.*no audio"):
        load_audio(tmp_path / "e.wav")


def test_corrupt_file(tmp_path):
    (tmp_path / "c.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" + bytes(range(256)))
    with pytest.raises(AudioError, match="c.wav"):
        load_audio(tmp_path / "c.wav")
    (tmp_path / "z.flac").write_bytes(b"")
    with pytest.raises(AudioError, match="z.flac"):
        load_audio(tmp_path / "z.flac")


def test_too_long_file(tmp_path):
    sf.write(tmp_path / "l.wav", np.zeros(8000 * 3, np.float32), 8000)
    with pytest.raises(AudioError, match="l.wav.*longer than"):
        load_audio(tmp_path / "l.wav", max_seconds=2)
    assert load_audio(tmp_path / "l.wav", sample_rate=8000, max_seconds=None).shape == (24_000,)


def test_non_finite_samples(tmp_path):
    x = _sine(0.1, 24_000)
    x[10] = np.nan
    sf.write(tmp_path / "n.wav", x, 24_000, subtype="FLOAT")
    with pytest.raises(AudioError, match="n.wav.*NaN"):
        load_audio(tmp_path / "n.wav")
    with pytest.raises(AudioError, match="NaN"):
        save_audio(tmp_path / "out.wav", torch.from_numpy(x))


@pytest.mark.parametrize("rate", [0.5, 0.8, 1.5, 4.0])
def test_time_stretch_keeps_pitch_and_streams_like_one_shot(rate):
    from csm.audio import TimeStretch

    sr = 24_000
    t = np.arange(2 * sr) / sr
    x = (0.5 * np.sin(2 * np.pi * 220 * t) + 0.02 * np.random.default_rng(0).standard_normal(len(t))).astype("f4")
    one = TimeStretch(rate).process(x, final=True)
    ts = TimeStretch(rate)
    pieces = [ts.process(x[i : i + 777]) for i in range(0, len(x), 777)] + [ts.flush()]
    assert np.array_equal(np.concatenate(pieces), one)  # chunks of any size give the one-shot samples
    assert len(one) == round(len(x) / rate)
    mid = one[len(one) // 4 : 3 * len(one) // 4]
    peak = np.argmax(np.abs(np.fft.rfft(mid * np.hanning(len(mid))))) * sr / len(mid)
    assert abs(peak - 220) < 3  # the same pitch (plain resampling would move it to 220 x rate)
    assert abs(np.sqrt(np.mean(mid**2)) / np.sqrt(np.mean(x**2)) - 1) < 0.05  # and the same loudness
    with pytest.raises(ValueError, match="between 0.25 and 4.0"):
        TimeStretch(5.0)
