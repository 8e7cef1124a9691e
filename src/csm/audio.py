"""Reading and writing audio files: soundfile for wav/flac/ogg, soxr for high-quality resampling.

Every problem with a file raises `AudioError` (a ValueError) that names the file, so a bad prompt file in a batch
job says which one it was.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

DEFAULT_MAX_SECONDS = 600.0  # 10 minutes: far beyond any CSM context; protects against loading hours of audio


class AudioError(ValueError):
    """An audio file is missing, unreadable, empty, too long or holds non-finite samples."""


def load_audio(
    path: str | os.PathLike | bytes, sample_rate: int = 24_000, *, max_seconds: float | None = DEFAULT_MAX_SECONDS,
    name: str = "audio data", max_channels: int | None = None, max_sample_rate: int | None = None,
) -> torch.Tensor:
    """Read an audio file (a path, or the file's bytes, called `name` in errors) as mono float32 at `sample_rate`:
    a [T] tensor in [-1, 1] for PCM files.

    Channels are averaged; other rates are resampled with soxr (very high quality). `max_seconds=None` lifts the
    length limit. The limits (length, `max_channels`, `max_sample_rate`) are checked on the file's header, before
    anything is decoded.
    """
    import soundfile as sf

    if isinstance(path, bytes):
        data = path
        opened = lambda: io.BytesIO(data)  # noqa: E731 (soundfile reads a file object from where it stands)
        path = name
    else:
        path = Path(path)
        if not path.is_file():
            raise AudioError(f"{path}: no such audio file")
        opened = lambda: str(path)  # noqa: E731
    try:
        info = sf.info(opened())
    except Exception as e:
        raise AudioError(f"{path}: not a readable audio file ({type(e).__name__}: {e})") from e
    if max_channels is not None and info.channels > max_channels:
        raise AudioError(f"{path}: {info.channels} channels, over the limit of {max_channels} (send mono or stereo)")
    if max_sample_rate is not None and info.samplerate > max_sample_rate:
        raise AudioError(f"{path}: {info.samplerate} Hz, over the limit of {max_sample_rate} Hz")
    if max_seconds is not None and info.samplerate > 0 and info.frames / info.samplerate > max_seconds:
        raise AudioError(
            f"{path}: {info.frames / info.samplerate:.1f} s of audio is longer than the limit of {max_seconds:.0f} s"
        )
    try:
        data, sr = sf.read(opened(), dtype="float32", always_2d=True)  # [T, C]
    except Exception as e:
        raise AudioError(f"{path}: could not decode audio ({type(e).__name__}: {e})") from e
    if data.size == 0:
        raise AudioError(f"{path}: the file holds no audio samples")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: the audio holds NaN or infinite samples")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sr != sample_rate:
        import soxr

        mono = soxr.resample(mono, sr, sample_rate, quality="VHQ")
    return torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))


def _samples(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Audio as a float32 numpy array, whatever it came as."""
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


def save_audio(path: str | os.PathLike, wav: torch.Tensor | np.ndarray, sample_rate: int = 24_000) -> None:
    """Write [T] mono or [C, T] audio (float, nominally in [-1, 1]); the format follows the extension (.wav -> 16-bit
    PCM, .flac, .ogg). Samples outside [-1, 1] are clipped for integer formats."""
    import soundfile as sf

    path = Path(path)
    x = _samples(wav)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise AudioError(f"{path}: expected audio of shape [T] or [C, T], got {tuple(x.shape)}")
    if x.size == 0:
        raise AudioError(f"{path}: refusing to write empty audio")
    if not np.isfinite(x).all():
        raise AudioError(f"{path}: refusing to write NaN or infinite samples")
    try:
        sf.write(str(path), np.clip(x, -1.0, 1.0).T, sample_rate)
    except Exception as e:
        raise AudioError(f"{path}: could not write audio ({type(e).__name__}: {e})") from e


SPEED_RANGE = (0.25, 4.0)  # OpenAI's bounds on `speed`; the time-stretch's too


def check_speed(rate: float, name: str = "speed") -> None:
    low, high = SPEED_RANGE
    if not low <= rate <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {rate}")


class TimeStretch:
    """Speech faster or slower at the same pitch, chunk by chunk: WSOLA (waveform-similarity overlap-add).

    Output frames of 40 ms are laid down every 20 ms under a Hann window; each is read from the input `rate` times
    further on than the last, shifted by up to ±10 ms to where the input best continues the previous frame, so
    pitch periods line up instead of smearing as in plain overlap-add. `process(chunk)` returns what is final so
    far, `flush()` the rest; the pieces concatenate to the one-shot result. rate: 2.0 = twice as fast.
    """

    def __init__(self, rate: float, sample_rate: int = 24_000) -> None:
        check_speed(rate)
        self.rate = rate
        self.n = int(0.04 * sample_rate) // 2 * 2  # frame length (even)
        self.hop = self.n // 2  # synthesis hop
        self.tol = self.n // 4  # search range either way
        self.window = np.hanning(self.n + 2)[1:-1].astype(np.float32)  # sums to ~1 at 50 % overlap
        self.buf = np.zeros(self.tol, np.float32)  # input from absolute position `start` on, led by `tol` zeros
        self.start = -self.tol
        self.k = 0  # next output frame
        self.prev: int | None = None  # input position the last frame was read from
        self.tail = np.zeros(self.hop, np.float32)  # overlap carried to the next output block
        self.taken = self.given = 0  # samples in and out, so that the whole output is len(input) / rate long

    def process(self, chunk: torch.Tensor | np.ndarray, final: bool = False) -> np.ndarray:
        x = _samples(chunk)
        self.buf = np.concatenate([self.buf, x.reshape(-1)])
        self.taken += x.size
        out = []
        while True:
            nominal = int(round(self.k * self.hop * self.rate))
            end = self.start + len(self.buf)
            # the frame reads up to nominal + tol + n, and what continues the last frame up to prev + hop + n
            need = max(nominal + self.tol, nominal if self.prev is None else self.prev + self.hop) + self.n
            if (nominal >= end) if final else (need > end):
                break
            pos = nominal if self.prev is None else self._best(nominal)
            frame = self._read(pos) * self.window
            block = np.concatenate([self.tail, np.zeros(self.hop, np.float32)]) + frame
            out.append(block[: self.hop])
            self.tail = block[self.hop :]
            self.prev, self.k = pos, self.k + 1
            # keep input from the earliest position a later frame may read (its nominal start minus the search)
            keep = min(int(round(self.k * self.hop * self.rate)), self.prev + self.hop) - self.tol
            if keep > self.start:
                self.buf, self.start = self.buf[keep - self.start :], keep
        if final:
            out.append(self.tail)
            self.tail = np.zeros(0, np.float32)
        y = np.concatenate(out) if out else np.zeros(0, np.float32)
        if final:  # the last frame's fade-out runs past the input's end
            y = y[: max(int(round(self.taken / self.rate)) - self.given, 0)]
        self.given += len(y)
        return y

    def flush(self) -> np.ndarray:
        return self.process(np.zeros(0, np.float32), final=True)

    def _read(self, pos: int) -> np.ndarray:
        seg = self.buf[max(pos - self.start, 0) : pos - self.start + self.n]
        return np.pad(seg, (0, self.n - len(seg)))

    def _best(self, nominal: int) -> int:
        """The read position within ±tol of `nominal` whose frame best continues the previous one."""
        target = self._read(self.prev + self.hop)
        lo = max(nominal - self.tol, self.start)
        region = self.buf[lo - self.start : nominal + self.tol - self.start + self.n]
        if len(region) < self.n:
            return nominal
        scores = np.correlate(region, target, mode="valid")
        return lo + int(np.argmax(scores))
