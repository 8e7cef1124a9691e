"""Conversations as frames: the CSM input format.

A frame has K+1 columns (K = 32 Mimi codebooks, then one text token) and a boolean mask of the columns present.
A text segment "[{speaker}]{text}" becomes one text-only frame per token; its audio becomes one audio-only frame
per Mimi frame, followed by an all-zero end-of-utterance frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tokenizer import TextTokenizer


@dataclass
class Segment:
    """One utterance of a conversation. `audio` is either Mimi codes [K, F] (int) or a 24 kHz waveform [T]
    (float) that the generator encodes; None for the line to be spoken."""

    speaker: int
    text: str
    audio: torch.Tensor | None = None


def text_frames(tokenizer: TextTokenizer, text: str, speaker: int, num_codebooks: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(tokenizer.encode(f"[{speaker}]{text}"), dtype=torch.long)
    tokens = torch.zeros(len(ids), num_codebooks + 1, dtype=torch.long)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    tokens[:, -1], mask[:, -1] = ids, True
    return tokens, mask


def audio_frames(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mimi codes [K, F] -> F + 1 frames (the last one all-zero: end of utterance)."""
    if codes.dim() != 2 or codes.is_floating_point():
        raise ValueError(f"audio codes must be an integer tensor [codebooks, frames], got {tuple(codes.shape)} {codes.dtype}")
    k, f = codes.shape
    tokens = torch.zeros(f + 1, k + 1, dtype=torch.long)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    tokens[:f, :-1], mask[:, :-1] = codes.T.long(), True
    return tokens, mask


def segment_frames(tokenizer: TextTokenizer, segment: Segment, num_codebooks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Text frames, then (if the segment has codes) audio frames. Waveforms must be encoded before this."""
    tokens, mask = text_frames(tokenizer, segment.text, segment.speaker, num_codebooks)
    if segment.audio is not None:
        if segment.audio.shape[0] != num_codebooks:
            raise ValueError(f"segment audio has {segment.audio.shape[0]} codebooks, the model expects {num_codebooks}")
        a_tokens, a_mask = audio_frames(segment.audio)
        tokens, mask = torch.cat([tokens, a_tokens]), torch.cat([mask, a_mask])
    return tokens, mask


def conversation_frames(
    tokenizer: TextTokenizer, segments: list[Segment], num_codebooks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """All segments' frames, concatenated in order: [S, K+1] tokens and mask."""
    parts = [segment_frames(tokenizer, s, num_codebooks) for s in segments]
    if not parts:
        return torch.zeros(0, num_codebooks + 1, dtype=torch.long), torch.zeros(0, num_codebooks + 1, dtype=torch.bool)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
