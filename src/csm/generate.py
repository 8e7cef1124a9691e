"""Sampling and the generation loop.

Per 80 ms frame: one cached backbone step predicts codebook 0, then the decoder runs 31 short cached steps inside
the frame (its cache is simply overwritten from position 0 every frame), and the finished frame is fed back to the
backbone. Generation stops at an all-zero frame (end of utterance) or at the length budget.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import torch

from .frames import Segment, conversation_frames, text_frames
from .model import CSM, causal_mask
from .tokenizer import TextTokenizer

FRAME_MS = 80  # Mimi: 12.5 frames per second


class Codec(Protocol):
    """What the generator needs from an audio codec (csm.mimi provides it)."""

    sample_rate: int

    def encode(self, wav: torch.Tensor) -> torch.Tensor: ...  # [B, 1, T] float -> [B, K, F] long

    def decode(self, codes: torch.Tensor) -> torch.Tensor: ...  # [B, K, F] long -> [B, 1, T] float


class ContextTooLongError(ValueError):
    """The conversation plus the generation budget does not fit the backbone's context."""


def sample_topk(
    logits: torch.Tensor,
    topk: int,
    temperature: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample one id per row of logits [B, V] -> [B, 1] from the top-k after temperature scaling.

    temperature <= 0 or topk == 1 is greedy (argmax). Sampling uses the exponential-race trick
    (argmax of p / Exp(1) noise), which is a draw from p without a host synchronisation.
    """
    if temperature <= 0 or topk == 1:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if 0 < topk < logits.shape[-1]:
        kth = torch.topk(logits, topk, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1, keepdim=True)


@dataclass
class Speech:
    codes: torch.Tensor  # [K, F] Mimi codes, EOS frame excluded
    audio: torch.Tensor | None  # [T] float waveform when a codec is attached
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return self.codes.shape[1] * FRAME_MS / 1000


class Generator:
    def __init__(self, model: CSM, tokenizer: TextTokenizer, codec: Codec | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.codec = codec
        self.num_codebooks = model.cfg.audio_num_codebooks
        self.sample_rate = codec.sample_rate if codec is not None else 24_000
        self._caches: tuple[torch.nn.ModuleList, torch.nn.ModuleList] | None = None

    @property
    def device(self) -> torch.device:
        return self.model.text_embeddings.weight.device

    # --- inputs -----------------------------------------------------------------------------------------
    def encode_audio(self, wav: torch.Tensor) -> torch.Tensor:
        """A 24 kHz mono waveform [T] -> Mimi codes [K, F]."""
        if self.codec is None:
            raise ValueError("this generator has no audio codec: give context audio as Mimi codes [K, F]")
        codes = self.codec.encode(wav.to(self.device, torch.float32).reshape(1, 1, -1))[0]
        return codes[: self.num_codebooks]

    def prompt_frames(self, text: str, speaker: int, context: Sequence[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text to speak is empty")
        if not isinstance(speaker, int) or speaker < 0:
            raise ValueError(f"speaker must be a non-negative integer, got {speaker!r}")
        segments = []
        for seg in context:
            audio = seg.audio
            if audio is not None and audio.is_floating_point():
                audio = self.encode_audio(audio)
            segments.append(Segment(seg.speaker, seg.text, audio))
        ctx_tokens, ctx_mask = conversation_frames(self.tokenizer, segments, self.num_codebooks)
        tokens, mask = text_frames(self.tokenizer, text, speaker, self.num_codebooks)
        return torch.cat([ctx_tokens, tokens]), torch.cat([ctx_mask, mask])

    # --- the loop ---------------------------------------------------------------------------------------
    def _get_caches(self, batch_size: int) -> tuple[torch.nn.ModuleList, torch.nn.ModuleList]:
        """Backbone and decoder KV caches, allocated once per batch size and reused across calls."""
        if self._caches is None or self._caches[0][0].k.shape[0] != batch_size:
            self._caches = (self.model.backbone.new_cache(batch_size), self.model.decoder.new_cache(batch_size))
        return self._caches

    def _frame(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        input_pos: torch.Tensor,
        kv_len: int,
        temperature: float,
        topk: int,
        rng: torch.Generator | None,
        caches: tuple[torch.nn.ModuleList, torch.nn.ModuleList],
    ) -> torch.Tensor:
        """One frame for each batch row: backbone step + K-1 decoder steps -> codes [B, K]."""
        m = self.model
        h, _ = m.backbone_forward(tokens, mask, input_pos, causal_mask(input_pos, kv_len), caches[0])
        last = h[:, -1]
        code = sample_topk(m.codebook0_head(last), topk, temperature, rng)
        codes = [code]
        x = torch.cat([last[:, None], m.embed_audio(0, code)], dim=1)  # decoder positions 0 (h) and 1 (c0)
        pos = torch.arange(2, device=x.device).expand(x.shape[0], 2)
        for i in range(1, self.num_codebooks):
            out = m.decoder(m.projection(x), pos, causal_mask(pos, i + 1), caches[1])
            code = sample_topk(m.decoder_head(i, out[:, -1]), topk, temperature, rng)
            codes.append(code)
            x, pos = m.embed_audio(i, code), pos[:, -1:] + 1
        return torch.cat(codes, dim=1)

    @torch.inference_mode()
    def iter_frames(
        self,
        text: str,
        speaker: int,
        context: Sequence[Segment] = (),
        max_audio_length_ms: float = 10_000,
        temperature: float = 0.9,
        topk: int = 50,
        seed: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the generated frames ([K] codes each) as they are produced; stops before the EOS frame."""
        tokens, mask = self.prompt_frames(text, speaker, context)
        max_frames = int(max_audio_length_ms // FRAME_MS)
        if max_frames < 1:
            raise ValueError(f"max_audio_length_ms={max_audio_length_ms} is shorter than one {FRAME_MS} ms frame")
        limit = self.model.cfg.backbone.max_seq_len
        need = tokens.shape[0] + max_frames
        if need > limit:
            raise ContextTooLongError(
                f"prompt ({tokens.shape[0]} frames of context and text) + generation budget ({max_frames} frames = "
                f"{max_audio_length_ms:g} ms) needs {need} positions, {need - limit} over the model's {limit}; "
                "shorten the context or max_audio_length_ms"
            )
        rng = None
        if seed is not None:
            rng = torch.Generator(device=self.device).manual_seed(seed)
        caches = self._get_caches(1)
        dev = self.device
        tokens, mask = tokens[None].to(dev), mask[None].to(dev)
        input_pos = torch.arange(tokens.shape[1], device=dev)[None]
        zero_text = torch.zeros(1, 1, 1, dtype=torch.long, device=dev)
        frame_mask = torch.ones(1, 1, self.num_codebooks + 1, dtype=torch.bool, device=dev)
        frame_mask[..., -1] = False
        kv_len = tokens.shape[1]
        for _ in range(max_frames):
            frame = self._frame(tokens, mask, input_pos, kv_len, temperature, topk, rng, caches)
            if not frame.any():  # all-zero frame: end of utterance
                return
            yield frame[0]
            tokens, mask = torch.cat([frame[:, None], zero_text], dim=-1), frame_mask
            input_pos = input_pos[:, -1:] + 1
            kv_len += 1

    def generate(
        self,
        text: str,
        speaker: int = 0,
        context: Sequence[Segment] = (),
        max_audio_length_ms: float = 10_000,
        temperature: float = 0.9,
        topk: int = 50,
        seed: int | None = None,
    ) -> Speech:
        frames = list(self.iter_frames(text, speaker, context, max_audio_length_ms, temperature, topk, seed))
        codes = torch.stack(frames, dim=1) if frames else torch.zeros(self.num_codebooks, 0, dtype=torch.long)
        audio = None
        if self.codec is not None and codes.shape[1]:
            with torch.inference_mode():
                audio = self.codec.decode(codes[None].to(self.device))[0, 0].float().cpu()
        return Speech(codes=codes.cpu(), audio=audio, sample_rate=self.sample_rate)


def load_generator(
    source: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    codec: Codec | None = None,
) -> Generator:
    """Model + tokenizer from a checkpoint directory or hub id (any layout, see checkpoints.py)."""
    from .checkpoints import load_checkpoint

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_checkpoint(source, device=device, dtype=dtype)
    tokenizer = TextTokenizer.from_pretrained(source)
    return Generator(model, tokenizer, codec)
