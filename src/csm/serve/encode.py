"""Audio as the server sends it: chunks encoded as they come (wav with an open length, raw pcm, mp3, opus, flac).
Nothing is buffered beyond what an encoder needs, so the first bytes leave with the first audio."""

from __future__ import annotations

import io

import numpy as np
import torch

from ..audio import AudioError, _samples

# The formats StreamEncoder writes (OpenAI's names): soundfile (format, subtype) and the HTTP content type.
STREAM_FORMATS = {
    "wav": (None, None, "audio/wav"),  # written by hand: a header with an open length, then 16-bit PCM
    "pcm": (None, None, "audio/pcm"),  # raw 16-bit little-endian mono, as OpenAI's "pcm"
    "mp3": ("MP3", None, "audio/mpeg"),
    "opus": ("OGG", "OPUS", "audio/ogg"),
    "flac": ("FLAC", "PCM_16", "audio/flac"),  # whole file at the end: readers need its sample count up front
}


class _Appended:
    """A write-only file that keeps what was appended since the last `take()`. The MP3 encoder seeks back at the
    end to fill in its info frame; bytes already taken were sent and stay a silent frame, which is what a stream of
    unknown length looks like (and, at a constant bit rate, readers still get the length right)."""

    def __init__(self) -> None:
        self.buf, self.pos, self.taken = bytearray(), 0, 0

    def write(self, data) -> int:
        data = bytes(data)
        self.buf[self.pos : self.pos + len(data)] = data
        self.pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else len(self.buf) + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:  # soundfile asks for it; an encoder never reads
        return b""

    def take(self) -> bytes:
        out = bytes(self.buf[self.taken :])
        self.taken = len(self.buf)
        return out


class StreamEncoder:
    """Encodes audio chunks as they come: `write(chunk)` returns the bytes ready to send (maybe none), `close()`
    the rest. fmt: one of STREAM_FORMATS."""

    def __init__(self, fmt: str, sample_rate: int = 24_000) -> None:
        if fmt not in STREAM_FORMATS:
            raise AudioError(f"unsupported audio format {fmt!r}; choose one of {', '.join(STREAM_FORMATS)}")
        self.fmt, self.sample_rate = fmt, sample_rate
        self._header = fmt == "wav"
        self._file = self._sink = None
        if fmt in ("mp3", "opus", "flac"):
            import soundfile as sf

            format_, subtype, _ = STREAM_FORMATS[fmt]
            self._sink = io.BytesIO() if fmt == "flac" else _Appended()
            extra = dict(bitrate_mode="CONSTANT", compression_level=0.5) if fmt == "mp3" else {}  # 80 kb/s
            self._file = sf.SoundFile(self._sink, "w", sample_rate, 1, format=format_, subtype=subtype, **extra)

    def write(self, chunk: torch.Tensor | np.ndarray) -> bytes:
        x = _samples(chunk)
        x = np.clip(np.nan_to_num(x.reshape(-1), nan=0.0), -1.0, 1.0)
        if self._file is not None:
            self._file.write(x)
            return b"" if self.fmt == "flac" else self._sink.take()
        pcm = (x * 32767).round().astype("<i2").tobytes()
        if self._header:
            self._header = False
            return _wav_header(self.sample_rate) + pcm
        return pcm

    def close(self) -> bytes:
        if self._file is not None:
            self._file.close()
            return self._sink.getvalue() if self.fmt == "flac" else self._sink.take()
        return _wav_header(self.sample_rate) if self._header else b""


def _wav_header(sample_rate: int) -> bytes:
    """A 16-bit mono WAV header whose lengths say "unknown" (0xFFFFFFFF), for a stream whose end is not known yet."""
    import struct

    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16) +
            b"data" + struct.pack("<I", 0xFFFFFFFF))
