"""Planning what is said: text of any length as sentences, a dialogue as turns, and the history that fits.

A line of CSM is one utterance of at most ~10 s, so longer text is spoken one sentence at a time
(`tokenizer.split_sentences`), each sentence a request of its own in the context of the conversation so far: the
given context, then the sentence before it (its text and the codes just generated). A dialogue is its turns spoken
that way one after another, each in the context of the turns before it; the oldest turns are left out when they no
longer fit beside the next one. These functions are `Generator` methods (generate_long, stream_long,
generate_dialogue, fit_history, check_lines); `gen` is the generator.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

from .engine import ContextTooLongError
from .frames import Segment
from .tokenizer import split_sentences

if TYPE_CHECKING:
    from .generate import Generator, Request, Speech


def check_text(text: str) -> None:
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text to speak is empty")


def generate_long(
    gen: Generator,
    text: str,
    speaker: int | None = None,
    context: Sequence[Segment] = (),
    max_audio_length_ms: float = 10_000,
    temperature: float | None = None,
    topk: int | None = None,
    seed: int | None = None,
    *,
    max_words: int | None = None,
    pause_ms: float = 200,
    chain: bool = True,
    progress: bool = False,
) -> Speech:
    """Speak text of any length, one sentence at a time (`tokenizer.split_sentences`).

    Each sentence is a line of its own (`max_audio_length_ms` is its budget, `seed + i` its seed). With `chain`, its
    context is the given context plus the sentence before it, as text and the codes just generated (the
    conversation so far, as CSM is meant to be run); that sentence is left out when it would not fit. The
    sentences' audio is joined with `pause_ms` of silence; `codes` is their frames back to back."""
    from tqdm import tqdm

    lines, spk, context = _setup(gen, text, speaker, context, max_words, pause_ms)
    parts: list[Speech] = []
    previous: Segment | None = None
    for i, line in enumerate(tqdm(lines, unit="sentence", leave=False, disable=not progress or len(lines) < 2)):
        req = _line_request(gen, line, i, spk, context, previous, max_audio_length_ms, temperature, topk, seed)
        speech = gen.speak(req)
        if speech.codes.shape[1] > 0:
            parts.append(speech)
            previous = Segment(spk, line, speech.codes) if chain else None
    return gen.joined(parts, pause_ms)


def stream_long(
    gen: Generator,
    text: str,
    speaker: int | None = None,
    context: Sequence[Segment] = (),
    max_audio_length_ms: float = 10_000,
    temperature: float | None = None,
    topk: int | None = None,
    seed: int | None = None,
    *,
    chunk_frames: int = 4,
    max_words: int | None = None,
    pause_ms: float = 200,
    chain: bool = True,
    source: Callable[[Request], Iterator[torch.Tensor]] | None = None,
    spoken: list[torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    """`generate_long` as a stream: audio chunks [T] as `stream` yields them, sentence after sentence, with the
    pause as a chunk of its own between sentences. The chunks concatenate to generate_long's audio.

    source: what runs each sentence's request, yielding its frames [K] (default: this generator, alone; the server
    passes its continuous batcher's, which gives the same frames). spoken: when given, each sentence's frames [K]
    are appended to it as they are streamed."""
    if gen.codec is None:
        raise ValueError("streaming audio needs a codec")
    lines, spk, context = _setup(gen, text, speaker, context, max_words, pause_ms)
    previous: Segment | None = None
    started = False
    for i, line in enumerate(lines):
        req = _line_request(gen, line, i, spk, context, previous, max_audio_length_ms, temperature, topk, seed)
        frames: list[torch.Tensor] = []
        for j, chunk in enumerate(gen.stream(req, chunk_frames, frames, source)):
            if j == 0 and started:
                yield gen.pause(pause_ms)
            yield chunk
        if spoken is not None:
            spoken.extend(frames)
        if frames:
            started = True
            previous = Segment(spk, line, torch.stack(frames, dim=1)) if chain else None


def generate_dialogue(
    gen: Generator,
    turns: Sequence[tuple[int | None, str]],
    context: Sequence[Segment] = (),
    max_audio_length_ms: float = 10_000,
    temperature: float | None = None,
    topk: int | None = None,
    seed: int | None = None,
    *,
    max_words: int | None = None,
    pause_ms: float = 200,
    progress: bool = False,
) -> Speech:
    """Speak a conversation: each (speaker, text) turn as `generate_long` speaks it, in the context of `context` and
    of the turns before it (their text as the model read it and the codes just generated), what CSM is made for.
    The oldest turns are left out when they do not fit beside the turn's longest sentence. Turn i uses
    seed + 1000 * i; the turns' audio is joined with `pause_ms` of silence."""
    from tqdm import tqdm

    if not turns:
        raise ValueError("the dialogue has no turns")
    for _, text in turns:  # before any work
        check_text(text)
    context = [gen.encoded(c) for c in context]
    history: list[Segment] = []
    parts: list[Speech] = []
    for i, (speaker, text) in enumerate(tqdm(turns, unit="turn", leave=False, disable=not progress)):
        lines, spk, _ = _setup(gen, text, speaker, (), max_words, pause_ms)
        history = gen.fit_history(text, spk, context, history, (), max_audio_length_ms, max_words)
        speech = gen.generate_long(text, spk, [*context, *history], max_audio_length_ms, temperature, topk,
                                   None if seed is None else seed + 1000 * i, max_words=max_words, pause_ms=pause_ms)
        if speech.codes.shape[1] > 0:
            history.append(Segment(spk, " ".join(lines), speech.codes))
            parts.append(speech)
    return gen.joined(parts, pause_ms)


def fit_history(gen: Generator, text: str, speaker: int | None, before: Sequence[Segment],
                history: Sequence[Segment], after: Sequence[Segment] = (), max_audio_length_ms: float = 10_000,
                max_words: int | None = None) -> list[Segment]:
    """The latest turns of `history` that fit in the context between `before` and `after` (all as codes), so that
    each sentence of `text` still fits the backbone with its generation budget: the oldest go first."""
    lines, spk, _ = _setup(gen, text, speaker, (), max_words, 0)
    history = list(history)
    while history and not all(_has_room(gen, gen.request(line, spk, [*before, *history, *after],
                                                          max_audio_length_ms)) for line in lines):
        history.pop(0)
    return history


def check_lines(gen: Generator, text: str, speaker: int | None = None, context: Sequence[Segment] = (),
                max_audio_length_ms: float = 10_000, max_words: int | None = None) -> list[str]:
    """The sentences `generate_long` / `stream_long` would speak, each checked as its request will be (text,
    speaker, context, budget; the previous sentence aside), so that a request that would fail at its third
    sentence fails before any audio. Context audio must already be codes. Raises ValueError naming the sentence."""
    lines, spk, _ = _setup(gen, text, speaker, (), max_words, 0)
    for line in lines:
        try:
            gen.prepare(gen.request(line, spk, context, max_audio_length_ms))
        except ContextTooLongError:
            raise
        except ValueError as e:
            raise ValueError(f"sentence {line!r}: {e}") from None
    return lines


def _setup(gen: Generator, text: str, speaker: int | None, context: Sequence[Segment], max_words: int | None,
           pause_ms: float) -> tuple[list[str], int, list[Segment]]:
    """The checks for long text: (sentences, speaker, context with waveforms encoded once for all sentences)."""
    check_text(text)
    if pause_ms < 0:
        raise ValueError(f"pause_ms must be >= 0, got {pause_ms}")
    context = [gen.encoded(c) for c in context]
    lines = split_sentences(text, gen.defaults["max_words"] if max_words is None else max_words)
    return lines, gen.defaults["speaker"] if speaker is None else speaker, context


def _line_request(gen: Generator, line: str, i: int, speaker: int, context: list[Segment], previous: Segment | None,
                  max_audio_length_ms: float, temperature: float | None, topk: int | None,
                  seed: int | None) -> Request:
    """Sentence i's request: seed + i, and the previous sentence after the context if it fits."""
    line_seed = None if seed is None else seed + i
    req = gen.request(line, speaker, context, max_audio_length_ms, temperature, topk, line_seed)
    if previous is not None:
        chained = replace(req, context=[*req.context, previous])
        if _has_room(gen, chained):  # else no room beside the given context: this sentence goes without it
            return chained
    return req


def _has_room(gen: Generator, req: Request) -> bool:
    """Whether the request's prompt and generation budget fit the backbone's context."""
    try:
        gen.engine.budget(len(gen.prompt_frames(req.text, req.speaker, req.context)[0]), req.max_audio_length_ms)
    except ContextTooLongError:
        return False
    return True
