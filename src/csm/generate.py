"""The Generator: speaks lines in context with a CSM model, a tokenizer and (optionally) an audio codec.

What it does, and where:
- text and context become prompt frames here (`prepare`, `request`): the model's text front end, speaker checks,
  context audio encoded by the codec;
- the frames are made by the engine (engine.py: caches, the per-frame step, CUDA graphs / compile, the batched
  frame loop, the one sampling function);
- long text and dialogues are planned sentence by sentence (plan.py: generate_long, stream_long,
  generate_dialogue, fit_history, check_lines, bound here as methods);
- codes become audio here: one shot (`decode_audio`) or streamed chunk by chunk (`stream`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import torch

from . import plan
from .engine import FRAME_MS, ContextTooLongError, Engine, Prepared
from .frames import Segment, conversation_frames, text_frames
from .model import CSM
from .tokenizer import TextTokenizer

__all__ = ["FRAME_MS", "ContextTooLongError", "Generator", "Request", "Speech", "load_generator"]

# Sampling defaults (Sesame's), and the longest line generate_long speaks in one piece (ours: ~10 s of speech, the
# default budget); a model directory may override them with a generation.json (see load_generator).
DEFAULTS = {"speaker": 0, "temperature": 0.9, "topk": 50, "max_words": 30}
# generation.json may also list the speaker ids the model was trained on ({"speakers": {"0": "description", ...}}):
# with such a list an unknown id is an error, not an untrained voice.
GENERATION_KEYS = (*DEFAULTS, "speakers")


class Codec(Protocol):
    """What the generator needs from an audio codec (csm.mimi.Mimi provides it)."""

    sample_rate: int

    def encode(self, wav: torch.Tensor) -> torch.Tensor: ...  # [B, 1, T] float -> [B, K, F] long

    def decode(self, codes: torch.Tensor) -> torch.Tensor: ...  # [B, K, F] long -> [B, 1, T] float

    def decode_stream(self, batch_size: int = 1): ...  # object with .decode(codes [B, K, n]) -> [B, 1, n * hop]


@dataclass
class Request:
    text: str
    speaker: int = 0
    context: Sequence[Segment] = ()
    max_audio_length_ms: float = 10_000
    temperature: float = 0.9
    topk: int = 50
    seed: int | None = None
    # Prompt frames (tokens [S, K + 1] long, mask [S, K + 1] bool) read instead of text + context: for callers that
    # hold token ids rather than text, such as a prepared training corpus.
    frames: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class Speech:
    codes: torch.Tensor  # [K, F] Mimi codes, EOS frame excluded
    audio: torch.Tensor | None  # [T] float waveform when a codec is attached
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return self.codes.shape[1] * FRAME_MS / 1000


class Generator:
    """Speaks lines in context with a CSM model (+ tokenizer, + optional audio codec).

    engine ("eager", "graph", "compile"), fuse and gemv choose how the frames are made: see engine.Engine. The
    model is switched to its inference layout in place (eval mode, fused projections unless fuse=False).
    """

    def __init__(self, model: CSM, tokenizer: TextTokenizer, codec: Codec | None = None, *, engine: str | None = None,
                 fuse: bool = True, gemv: str = "matmul"):
        self.engine = Engine(model, engine, fuse=fuse, gemv=gemv)
        self.model = self.engine.model
        self.tokenizer = tokenizer
        self.codec = codec
        self.defaults = dict(DEFAULTS)  # used for whatever a call leaves as None
        self.speakers: dict[int, str] | None = None  # id -> description, when the model says which it knows
        self.num_codebooks = model.cfg.audio_num_codebooks
        self.sample_rate = codec.sample_rate if codec is not None else 24_000

    @property
    def device(self) -> torch.device:
        return self.engine.device

    # --- text and context in ----------------------------------------------------------------------------
    def request(self, text: str, speaker: int | None = None, context: Sequence[Segment] = (),
                max_audio_length_ms: float = 10_000, temperature: float | None = None, topk: int | None = None,
                seed: int | None = None) -> Request:
        """A Request, with the model's defaults for whatever is None."""
        d = self.defaults
        return Request(text, d["speaker"] if speaker is None else speaker, context, max_audio_length_ms,
                       d["temperature"] if temperature is None else temperature, d["topk"] if topk is None else topk,
                       seed)

    def prepare(self, request: Request) -> Prepared:
        """A request checked and made ready for the engine: its prompt frames, frame budget, sampling settings and
        random generator. Raises ValueError (ContextTooLongError for a prompt + budget over the context)."""
        tokens, mask = (self.prompt_frames(request.text, request.speaker, request.context) if request.frames is None
                        else request.frames)
        return self.engine.prepare(tokens, mask, request.max_audio_length_ms, request.temperature, request.topk,
                                   request.seed)

    def prompt_frames(self, text: str, speaker: int, context: Sequence[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
        """The frames the backbone reads before speaking: every context segment, then the line's text."""
        plan.check_text(text)
        if self.tokenizer.phonemes and not any(c.isalpha() for c in self.tokenizer.phonemize(text)):
            raise ValueError(f"nothing to say in {text!r}: espeak-ng reads no sounds in it")
        self.check_speaker(speaker, "speaker")
        for seg in context:
            self.check_speaker(seg.speaker, "context speaker")
        segments = [self.encoded(seg) for seg in context]
        ctx_tokens, ctx_mask = conversation_frames(self.tokenizer, segments, self.num_codebooks)
        tokens, mask = text_frames(self.tokenizer, text, speaker, self.num_codebooks)
        return torch.cat([ctx_tokens, tokens]), torch.cat([ctx_mask, mask])

    def check_speaker(self, speaker: int, what: str) -> None:
        if not isinstance(speaker, int) or isinstance(speaker, bool) or speaker < 0:
            raise ValueError(f"{what} must be a non-negative integer, got {speaker!r}")
        if self.speakers is not None and speaker not in self.speakers:
            known = "; ".join(f"{i}: {d}" if d else str(i) for i, d in sorted(self.speakers.items()))
            raise ValueError(f"{what} {speaker} is not one this model was trained on ({known})")

    def encoded(self, segment: Segment) -> Segment:
        """The segment with a waveform replaced by its codes (codes and audio-less segments as they are)."""
        audio = segment.audio
        if audio is None or not audio.is_floating_point():
            return segment
        return Segment(segment.speaker, segment.text, self.encode_audio(audio))

    def encode_audio(self, wav: torch.Tensor) -> torch.Tensor:
        """A mono waveform [T] at the codec's sample rate -> Mimi codes [K, F]."""
        if self.codec is None:
            raise ValueError("this generator has no audio codec: give context audio as Mimi codes [K, F]")
        with torch.inference_mode():
            codes = self.codec.encode(wav.to(self.device, torch.float32).reshape(1, 1, -1))[0]
        if codes.shape[0] < self.num_codebooks:
            raise ValueError(f"the codec gives {codes.shape[0]} codebooks, the model needs {self.num_codebooks}")
        return codes[: self.num_codebooks].cpu()

    # --- one line -----------------------------------------------------------------------------------------
    def generate(
        self,
        text: str,
        speaker: int | None = None,
        context: Sequence[Segment] = (),
        max_audio_length_ms: float = 10_000,
        temperature: float | None = None,
        topk: int | None = None,
        seed: int | None = None,
    ) -> Speech:
        """Speak one line. speaker / temperature / topk left as None take `self.defaults`."""
        return self.speak(self.request(text, speaker, context, max_audio_length_ms, temperature, topk, seed))

    def speak(self, request: Request) -> Speech:
        """One request."""
        return self.generate_batch([request])[0]

    def generate_batch(self, requests: Sequence[Request]) -> list[Speech]:
        """Generate several requests in one batch; each stops on its own EOS or budget."""
        return [self.speech(codes) for codes in self.engine.codes([self.prepare(r) for r in requests])]

    def iter_frames(self, requests: Sequence[Request]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Run requests together: (frames [B, K], active [B] bool) per step, as engine.Engine.run yields them."""
        return self.engine.run([self.prepare(r) for r in requests])

    def frames(self, request: Request) -> Iterator[torch.Tensor]:
        """One request's frames [K], as they are made, until its end of utterance or budget."""
        for step, active in self.iter_frames([request]):
            if not bool(active[0]):
                return
            yield step[0]

    # --- long text and dialogue, planned sentence by sentence (plan.py) ------------------------------------
    generate_long = plan.generate_long
    stream_long = plan.stream_long
    generate_dialogue = plan.generate_dialogue
    fit_history = plan.fit_history
    check_lines = plan.check_lines

    # --- audio out ----------------------------------------------------------------------------------------
    def speech(self, codes: torch.Tensor) -> Speech:
        """A line's codes [K, F] with their audio."""
        return Speech(codes=codes, audio=self.decode_audio(codes), sample_rate=self.sample_rate)

    def decode_audio(self, codes: torch.Tensor) -> torch.Tensor | None:
        """Mimi codes [K, F] -> a mono waveform [T] at the codec's sample rate (None without a codec or frames)."""
        if self.codec is None or codes.shape[1] == 0:
            return None
        with torch.inference_mode():
            return self.codec.decode(self.codec_ready(codes[None]))[0, 0].float().cpu()

    def stream(self, request: Request, chunk_frames: int = 4, frames: list[torch.Tensor] | None = None,
               source: Callable[[Request], Iterator[torch.Tensor]] | None = None) -> Iterator[torch.Tensor]:
        """Yield audio chunks [T] (float, codec sample rate) as frames are produced: every `chunk_frames` frames,
        decoded by the codec's streaming decoder, so the concatenation equals the one-shot decode.

        frames: when given, the line's frames [K] (on the CPU) are appended to it. source: what runs the request,
        yielding its frames [K] (default `self.frames`; the server passes its batcher's)."""
        if self.codec is None:
            raise ValueError("streaming audio needs a codec")
        if chunk_frames < 1:
            raise ValueError("chunk_frames must be at least 1")
        decoder = self.codec.decode_stream(1)
        pending: list[torch.Tensor] = []
        for frame in (source or self.frames)(request):
            pending.append(frame)
            if frames is not None:
                frames.append(frame.cpu())
            if len(pending) == chunk_frames:
                yield self._stream_chunk(decoder, pending)
                pending = []
        if pending:
            yield self._stream_chunk(decoder, pending)

    def _stream_chunk(self, decoder, frames: list[torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            return decoder.decode(self.codec_ready(torch.stack(frames, dim=1)[None]))[0, 0].float().cpu()

    def codec_ready(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, K, n] the codec can decode. CSM's vocabulary has 3 ids past the codec's 2048 entries; a trained
        model does not emit them, an untrained one may: they become 0 rather than crash the decoder."""
        size = getattr(getattr(self.codec, "cfg", None), "codebook_size", None)
        if size is not None:
            codes = codes.masked_fill(codes >= size, 0)
        return codes.to(self.device)

    def joined(self, parts: list[Speech], pause_ms: float) -> Speech:
        """Pieces of speech back to back: their codes, and their audio with `pause_ms` of silence between."""
        codes = torch.cat([p.codes for p in parts], dim=1) if parts else \
            torch.zeros(self.num_codebooks, 0, dtype=torch.long)
        audio = None
        if self.codec is not None and parts:
            gap = self.pause(pause_ms)
            audio = torch.cat([x for p in parts for x in (gap, p.audio)][1:])
        return Speech(codes=codes, audio=audio, sample_rate=self.sample_rate)

    def pause(self, pause_ms: float) -> torch.Tensor:
        """pause_ms of silence at the codec's sample rate."""
        return torch.zeros(int(self.sample_rate * pause_ms / 1000))


def load_generator(
    source: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    codec: Codec | None = None,
    engine: str | None = None,
    quantize: str | None = None,
    gemv: str = "matmul",
) -> Generator:
    """Model + tokenizer from a checkpoint directory or hub id (any layout, see checkpoints.py).

    quantize="int8": int8 weight-only transformer linears (quantize.py), ~1.7x faster on a CPU, close to but not
    bit-identical with the full-precision model."""
    from .checkpoints import load_checkpoint

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_checkpoint(source, device=device, dtype=dtype)
    if quantize == "int8":
        from .quantize import quantize_int8

        quantize_int8(model)
    elif quantize is not None:
        raise ValueError(f"unknown quantization {quantize!r}; supported: int8")
    tokenizer = TextTokenizer.from_pretrained(source)
    gen = Generator(model, tokenizer, codec, engine=engine, gemv=gemv)
    found = generation_defaults(source)
    gen.speakers = found.pop("speakers", None)
    gen.defaults.update(found)
    return gen


def generation_defaults(source: str | os.PathLike) -> dict:
    """The defaults a model directory recommends in generation.json ({"speaker", "temperature", "topk",
    "max_words"}, all optional), e.g. the embedded voice, whose tiny model speaks more clearly with a small top-k;
    {} if none. "speakers" ({"id": "description"}), if present, comes back as {int id: description}."""
    import json

    from .hub import ModelFilesNotFound, find_files

    try:
        path = find_files(source, ["generation.json"])
    except ModelFilesNotFound:
        return {}
    try:
        found = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    unknown = set(found) - set(GENERATION_KEYS) if isinstance(found, dict) else {"(not an object)"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected some of {sorted(GENERATION_KEYS)}")
    n = found.get("max_words", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f'{path}: "max_words" must be a positive integer, got {n!r}')
    if "speakers" in found:
        listed = found["speakers"]
        try:
            speakers = {int(k): str(v) for k, v in listed.items()}
        except (AttributeError, ValueError):
            speakers = {}
        if not speakers or min(speakers) < 0:
            raise ValueError(f'{path}: "speakers" must map non-negative ids to descriptions, got {listed!r}')
        if found.get("speaker", DEFAULTS["speaker"]) not in speakers:
            raise ValueError(f"{path}: the default speaker {found.get('speaker', DEFAULTS['speaker'])} is not among "
                             f"its speakers {sorted(speakers)}")
        found["speakers"] = speakers
    return found
