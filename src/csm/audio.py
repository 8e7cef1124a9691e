"""Reading and writing audio files: soundfile for wav/flac/ogg, soxr for high-quality resampling.

Every problem with a file raises `AudioError` (a ValueError) that names the file, so a bad prompt file in a batch
job says which one it was.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

DEFAULT_MAX_SECONDS = 600.0  # 10 minutes: far beyond any CSM context; protects against loading hours of audio


class AudioError(ValueError):
    """An audio file is missing, unreadable, empty, too long or holds non-finite samples."""


def load_audio(
    path: str | os.PathLike, sample_rate: int = 24_000, *, max_seconds: float | None = DEFAULT_MAX_SECONDS
) -> torch.Tensor:
    """Read an audio file as mono float32 at `sample_rate`: a [T] tensor in [-1, 1] for PCM files.

    Channels are averaged; other rates are resampled with soxr (very high quality). `max_seconds=None` lifts the
    length limit.
    """
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    try:
        info = sf.info(str(path))
    except Exception as e:
        raise AudioError(f"{path}: not a readable audio file ({type(e).__name__}: {e})") from e
    if max_seconds is not None and info.samplerate > 0 and info.frames / info.samplerate > max_seconds:
        raise AudioError(
            f"{path}: {info.frames / info.samplerate:.1f} s of audio is longer than the limit of {max_seconds:.0f} s"
        )
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # [T, C]
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


def save_audio(path: str | os.PathLike, wav: torch.Tensor | np.ndarray, sample_rate: int = 24_000) -> None:
    """Write [T] mono or [C, T] audio (float, nominally in [-1, 1]); the format follows the extension (.wav -> 16-bit
    PCM, .flac, .ogg). Samples outside [-1, 1] are clipped for integer formats."""
    import soundfile as sf

    path = Path(path)
    x = wav.detach().float().cpu().numpy() if isinstance(wav, torch.Tensor) else np.asarray(wav, dtype=np.float32)
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
