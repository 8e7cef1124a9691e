"""What a codec trains on: whole clips in memory with random crops (`ClipSet`), or clips with their codes and a
CSM's teacher-forced draws, frame-aligned (`CodeSet`, from `scripts/gta_codes.py`). Every crop is a function of the
generator it is given, so a resumed run draws the same batches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor


def audio_paths(source: str | os.PathLike) -> list[Path]:
    """Audio files of a manifest (.jsonl / .csv with an `audio` field, relative to the manifest) or a folder; several
    sources joined by commas are concatenated (a mix of corpora, weighted by their sizes)."""
    from .data import AUDIO_EXTENSIONS

    if isinstance(source, str) and "," in source and not Path(source).exists():
        return [p for part in source.split(",") if part for p in audio_paths(part)]
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    elif source.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
        paths = [source.parent / r["audio"] for r in rows]
    elif source.suffix.lower() == ".csv":
        import csv

        with open(source, newline="", encoding="utf-8") as f:
            paths = [source.parent / r["audio"] for r in csv.DictReader(f)]
    else:
        raise FileNotFoundError(f"{source}: expected a folder of audio files or a .jsonl/.csv manifest")
    if not paths:
        raise ValueError(f"{source}: no audio files")
    return paths


class ClipSet:
    """Whole clips held in memory (24 kHz mono float32); random fixed-length crops as a function of (seed, step)."""

    def __init__(self, clips: list[Tensor], sample_rate: int = 24_000):
        if not clips:
            raise ValueError("no clips")
        self.clips, self.sample_rate = clips, sample_rate
        self.lengths = torch.tensor([len(c) for c in clips], dtype=torch.float64)

    @classmethod
    def load(cls, paths: list[Path], sample_rate: int, progress: bool = False) -> ClipSet:
        from ..audio import load_audio

        it = paths
        if progress:
            from tqdm import tqdm

            it = tqdm(paths, desc="loading audio", leave=False)
        return cls([load_audio(p, sample_rate) for p in it], sample_rate)

    def __len__(self) -> int:
        return len(self.clips)

    @property
    def seconds(self) -> float:
        return float(self.lengths.sum()) / self.sample_rate

    def batch(self, batch_size: int, length: int, gen: torch.Generator) -> Tensor:
        """[B, 1, length]: clips drawn in proportion to their length, random offsets, zero-padded if short."""
        idx = torch.multinomial(self.lengths, batch_size, replacement=True, generator=gen)
        out = torch.zeros(batch_size, 1, length)
        for b, i in enumerate(idx.tolist()):
            clip = self.clips[i]
            start = int(torch.randint(0, max(1, len(clip) - length + 1), (1,), generator=gen))
            piece = clip[start : start + length]
            out[b, 0, : len(piece)] = piece
        return out



def is_code_folder(source: str | os.PathLike) -> bool:
    """`scripts/gta_codes.py` output folders (codes.safetensors + manifest.jsonl; several joined by commas) rather
    than audio."""
    parts = [p for p in str(source).split(",") if p]
    return bool(parts) and all((Path(p) / "codes.safetensors").is_file() for p in parts)


class CodeSet:
    """Clips with their codes, frame-aligned (a `scripts/gta_codes.py` folder): the codec's own codes `true.i` [K, F]
    and a CSM's draws `gta.i` [R, K, F]. Crops start on frame boundaries so codes and audio stay aligned."""

    def __init__(self, clips: list[Tensor], true: list[Tensor], gta: list[Tensor], frame_size: int,
                 sample_rate: int = 24_000):
        if not clips:
            raise ValueError("no clips")
        self.clips, self.true, self.gta = clips, true, gta
        self.frame_size, self.sample_rate = frame_size, sample_rate
        self.lengths = torch.tensor([t.shape[-1] for t in true], dtype=torch.float64)

    @classmethod
    def load(cls, folder: str | os.PathLike, sample_rate: int, frame_size: int, progress: bool = False) -> CodeSet:
        from safetensors.torch import load_file

        from ..audio import load_audio

        if "," in str(folder):  # several folders: one set
            sets = [cls.load(f, sample_rate, frame_size, progress) for f in str(folder).split(",") if f]
            return cls(*([x for c in sets for x in getattr(c, name)] for name in ("clips", "true", "gta")),
                       frame_size, sample_rate)
        folder = Path(folder)
        if not (folder / "codes.safetensors").is_file() or not (folder / "manifest.jsonl").is_file():
            raise FileNotFoundError(f"{folder}: expected codes.safetensors and manifest.jsonl "
                                    "(written by scripts/gta_codes.py)")
        rows = [json.loads(x) for x in (folder / "manifest.jsonl").read_text(encoding="utf-8").splitlines() if x]
        codes = load_file(str(folder / "codes.safetensors"))
        it = range(len(rows))
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc="loading audio", leave=False)
        clips, true, gta = [], [], []
        for i in it:
            t = codes[f"true.{i}"].long()
            wav = load_audio(rows[i]["audio"], sample_rate)
            # the codec pads the last frame: pad the audio to whole frames so every code has its samples
            clips.append(F.pad(wav, (0, max(0, t.shape[-1] * frame_size - len(wav))))[: t.shape[-1] * frame_size])
            true.append(t)
            gta.append(codes[f"gta.{i}"].long())
        return cls(clips, true, gta, frame_size, sample_rate)

    def split(self, n_eval: int, seed: int) -> tuple[CodeSet, CodeSet | None]:
        """(train, held-out): the last n_eval clips of a seeded shuffle are held out."""
        order = torch.randperm(len(self.clips), generator=torch.Generator().manual_seed(seed)).tolist()
        n_eval = min(n_eval, max(0, len(order) - 1))

        def pick(idx: list[int]) -> CodeSet:
            return CodeSet([self.clips[i] for i in idx], [self.true[i] for i in idx], [self.gta[i] for i in idx],
                           self.frame_size, self.sample_rate)

        return pick(order[: len(order) - n_eval]), (pick(order[len(order) - n_eval:]) if n_eval else None)

    def __len__(self) -> int:
        return len(self.clips)

    @property
    def seconds(self) -> float:
        return sum(len(c) for c in self.clips) / self.sample_rate

    def batch(self, batch_size: int, frames: int, gta_share: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """(audio [B, 1, frames * frame_size], codes [B, K, frames]): clips drawn in proportion to their length, a
        random whole-frame offset, the CSM's draw with probability gta_share (a random one of them), else the clip's
        own codes; short clips are zero-padded (audio) and padded with their last frame's codes."""
        idx = torch.multinomial(self.lengths, batch_size, replacement=True, generator=gen)
        k = self.true[0].shape[0]
        wav = torch.zeros(batch_size, 1, frames * self.frame_size)
        codes = torch.zeros(batch_size, k, frames, dtype=torch.long)
        for b, i in enumerate(idx.tolist()):
            n = self.true[i].shape[-1]
            start = int(torch.randint(0, max(1, n - frames + 1), (1,), generator=gen))
            src = self.true[i]
            if float(torch.rand((), generator=gen)) < gta_share:
                src = self.gta[i][int(torch.randint(0, self.gta[i].shape[0], (1,), generator=gen))]
            piece = src[:, start: start + frames]
            codes[b, :, : piece.shape[-1]] = piece
            codes[b, :, piece.shape[-1]:] = piece[:, -1:]
            audio = self.clips[i][start * self.frame_size: (start + frames) * self.frame_size]
            wav[b, 0, : len(audio)] = audio
        return wav, codes
