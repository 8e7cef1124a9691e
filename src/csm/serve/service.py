"""What the speech server does, without HTTP: `SpeechService` checks a request body, picks the voice and context,
and yields encoded audio as the continuous batcher makes frames (each sentence in the context of the one before, as
`csm say` speaks). Everything that can be wrong with a request is found before the first byte and raised as an
`ApiError` carrying the status and OpenAI's error body; server.py puts the service behind FastAPI.

Beyond OpenAI's fields (`model`, `input`, `voice`, `response_format`, `speed`, `stream_format`), a request may carry
`context` (earlier turns: speaker or voice, text, and audio as base64 file bytes or Mimi codes) and `conversation`
(an id: the server keeps the turns it spoke under it, with the turns given as context, and speaks the next request
after them); `seed`, `temperature`, `topk` and `max_audio_length_ms` (per sentence) steer generation.
"""

from __future__ import annotations

import base64
import binascii
import collections
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..audio import SPEED_RANGE, AudioError, TimeStretch, load_audio
from ..frames import Segment
from ..generate import ContextTooLongError, Generator
from .batcher import Batcher, Busy
from .encode import STREAM_FORMATS, StreamEncoder

# OpenAI's built-in voice names, given to the model's speaker ids in this order so that clients which hard-code
# them work; a voices file (`csm serve --voices`) names voices of its own.
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse")
MAX_INPUT_CHARS = 4096  # OpenAI's limit on `input`
MAX_BODY_BYTES = 32 << 20  # context audio travels as base64 inside the JSON body
MAX_CONVERSATIONS = 256  # kept in memory, least recently used dropped first
MAX_ADDED_VOICES = 256  # voices added through POST /v1/audio/voices
# Context audio is bounded from its header before it is decoded: a turn of 8 channels at 192 kHz is refused
# before it costs seconds of CPU. The model's own context (CSM-1B: 2048 frames, 164 s) bounds a conversation's.
MAX_CONTEXT_SECONDS = 60.0  # per request, all turns together
MAX_CONTEXT_TURNS = 32
MAX_CHANNELS = 2
MAX_SAMPLE_RATE = 96_000


class ApiError(Exception):
    """A request the server cannot serve: HTTP status + an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass
class Voice:
    speaker: int
    prompt: list[Segment] = field(default_factory=list)  # a turn spoken in this voice, which fixes it (codes)
    description: str = ""


@dataclass
class SpeechJob:
    """A checked request: what to say, how, and where the audio goes."""

    text: str
    speaker: int
    prompt: list[Segment]  # the voice's own prompt turn, if it has one: always first
    context: list[Segment]  # the request's earlier turns
    fmt: str
    sse: bool
    conversation: str | None
    speed: float  # 1.0: as spoken; else time-stretched at the same pitch (TimeStretch)
    options: dict  # max_audio_length_ms, temperature, topk, seed


class SpeechService:
    """The server's behaviour: request checking, voices, conversations, and the audio stream of a request."""

    def __init__(self, gen: Generator, batcher: Batcher, *, voices: dict[str, Voice] | None = None,
                 model_name: str = "csm", chunk_frames: int = 4) -> None:
        if gen.codec is None:
            raise ValueError("the server speaks audio and needs a codec with the model (--codec)")
        self.gen, self.batcher, self.model_name, self.chunk_frames = gen, batcher, model_name, chunk_frames
        self.voices = dict(voices) if voices else default_voices(gen)
        self.fixed_voices = frozenset(self.voices)  # the model's and the voices file's: not replaced at run time
        self.conversations: collections.OrderedDict[str, list[Segment]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._speaking: set[str] = set()  # conversations with a turn being spoken now
        self._speaking_changed = threading.Condition()

    # --- checking a request ----------------------------------------------------------------------------
    def parse(self, body: object) -> SpeechJob:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        unknown = set(body) - {"model", "input", "voice", "response_format", "speed", "stream_format",
                               "instructions", "context", "conversation", "seed", "temperature", "topk",
                               "max_audio_length_ms"}
        if unknown:
            raise ApiError(400, f"unknown field(s) {sorted(unknown)}", sorted(unknown)[0])
        text = body.get("input")
        if not isinstance(text, str) or not text.strip():
            raise ApiError(400, "'input' must be a non-empty string: the text to speak", "input")
        if len(text) > MAX_INPUT_CHARS:
            raise ApiError(400, f"'input' is {len(text)} characters, over the limit of {MAX_INPUT_CHARS}", "input")
        voice = self.voice(body.get("voice"))
        fmt = body.get("response_format", "mp3")
        if fmt not in STREAM_FORMATS:
            raise ApiError(400, f"response_format {fmt!r} is not supported; choose one of "
                                f"{', '.join(STREAM_FORMATS)}", "response_format")
        speed = _number(body, "speed", 1.0, *SPEED_RANGE)
        stream_format = body.get("stream_format", "audio")
        if stream_format not in ("audio", "sse"):
            raise ApiError(400, f"stream_format must be 'audio' or 'sse', got {stream_format!r}", "stream_format")
        if body.get("instructions"):
            raise ApiError(400, "'instructions' are not supported: CSM takes its style from the conversation; "
                                "pass earlier turns as 'context' instead", "instructions")
        conversation = body.get("conversation")
        if conversation is not None and (not isinstance(conversation, str) or not conversation or
                                         len(conversation) > 200):
            raise ApiError(400, "'conversation' must be a non-empty string id of at most 200 characters",
                           "conversation")
        options = {"max_audio_length_ms": _number(body, "max_audio_length_ms", 10_000, 80, 60_000),
                   "temperature": _number(body, "temperature", None, 0, 10),
                   "topk": _integer(body, "topk", None, 1, self.gen.model.cfg.audio_vocab_size),
                   "seed": _integer(body, "seed", None, 0, 2**63 - 1)}
        job = SpeechJob(text, voice.speaker, voice.prompt, self._context(body.get("context")), fmt,
                        stream_format == "sse", conversation, speed, options)
        try:  # every sentence, not only the first, is checked before the response starts
            self.gen.check_lines(text, job.speaker, [*job.prompt, *job.context], options["max_audio_length_ms"])
        except ContextTooLongError as e:
            raise ApiError(400, str(e), "context") from None
        except ValueError as e:
            raise ApiError(400, str(e), "input") from None
        return job

    def voice(self, name: object) -> Voice:
        """A voice by name (a voices-file name, an OpenAI name, or a speaker id); None: the model's default."""
        if name is None:
            return Voice(self.gen.defaults["speaker"])
        if isinstance(name, dict):  # OpenAI's custom-voice form: {"id": "..."}
            name = name.get("id")
        key = str(name) if isinstance(name, (str, int)) and not isinstance(name, bool) else None
        if key in self.voices:
            return self.voices[key]
        if key is not None and key.isdigit() and self.gen.speakers is None:  # a model that takes any speaker id
            return Voice(int(key))
        raise ApiError(400, f"unknown voice {name!r}; this server has: {', '.join(self.voices)}", "voice")

    def add_voice(self, body: object) -> tuple[str, Voice]:
        """POST /v1/audio/voices: {"name", "speaker", "text", "audio" (base64 file bytes) or "codes", "description"}
        -> a named voice whose prompt turn fixes it, usable as `voice` at once (kept in memory; a name added this
        way may be replaced, the model's and the voices file's may not)."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        name = body.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ApiError(400, "'name' must be 1-64 letters, digits, '_', '.' or '-'", "name")
        if name in self.fixed_voices:
            raise ApiError(400, f"voice {name!r} is one of the server's own and cannot be replaced", "name")
        added = [n for n in self.voices if n not in self.fixed_voices]
        if name not in self.voices and len(added) >= MAX_ADDED_VOICES:
            raise ApiError(400, f"{len(added)} voices are already added (the limit); delete one first", "name")
        if "audio" not in body and "codes" not in body:
            raise ApiError(400, "a voice needs its prompt: 'text' and 'audio' (or 'codes')", "audio")
        turn = self._turn({k: body[k] for k in ("speaker", "text", "audio", "codes") if k in body}, "the voice",
                          "voice")
        try:
            self.gen.check_speaker(turn.speaker, "speaker")
        except ValueError as e:
            raise ApiError(400, str(e), "speaker") from None
        voice = Voice(turn.speaker, [turn], str(body.get("description", "")))
        with self._lock:
            self.voices[name] = voice
        return name, voice

    def remove_voice(self, name: str) -> None:
        if name in self.fixed_voices:
            raise ApiError(400, f"voice {name!r} is one of the server's own and cannot be deleted")
        with self._lock:
            if self.voices.pop(name, None) is None:
                raise ApiError(404, f"no voice {name!r} was added")

    def _context(self, turns: object) -> list[Segment]:
        if turns is None:
            return []
        if not isinstance(turns, list):
            raise ApiError(400, "'context' must be a list of turns", "context")
        if len(turns) > MAX_CONTEXT_TURNS:
            raise ApiError(400, f"'context' has {len(turns)} turns, over the limit of {MAX_CONTEXT_TURNS}", "context")
        budget = [MAX_CONTEXT_SECONDS]  # audio seconds left for this request's turns, read from headers first
        return [self._turn(turn, f"context[{i}]", "context", budget) for i, turn in enumerate(turns)]

    def _turn(self, turn: object, where: str, param: str, budget: list[float] | None = None) -> Segment:
        """One turn {"speaker" or "voice", "text", "audio" or "codes" or neither} as a Segment with codes."""
        if not isinstance(turn, dict) or not isinstance(turn.get("text"), str) or not turn["text"].strip():
            raise ApiError(400, f"{where} must be an object with a non-empty 'text'", param)
        if "voice" in turn:
            speaker = self.voice(turn["voice"]).speaker
        elif isinstance(turn.get("speaker"), int) and not isinstance(turn["speaker"], bool):
            speaker = turn["speaker"]
        else:
            raise ApiError(400, f"{where} needs a 'speaker' id or a 'voice'", param)
        return Segment(speaker, turn["text"], self._turn_audio(turn, where, param, budget))

    def _turn_audio(self, turn: dict, where: str, param: str, budget: list[float] | None = None
                    ) -> torch.Tensor | None:
        """A context turn's audio as Mimi codes [K, F]: 'audio' (base64 bytes of an audio file, any format soundfile
        reads) or 'codes' (lists of ints); neither: a text-only turn."""
        if "audio" in turn:
            try:
                data = base64.b64decode(turn["audio"], validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise ApiError(400, f"{where}.audio is not valid base64", param) from None
            left = MAX_CONTEXT_SECONDS if budget is None else budget[0]
            try:  # the header is read and bounded before anything is decoded
                wav = load_audio(data, self.gen.sample_rate, max_seconds=left, max_channels=MAX_CHANNELS,
                                 max_sample_rate=MAX_SAMPLE_RATE, name=f"{where}.audio")
            except AudioError as e:
                raise ApiError(400, f"{e}" + (" (what is left of this request's context audio)"
                                              if budget is not None and left < MAX_CONTEXT_SECONDS else ""),
                               param) from None
            if budget is not None:
                budget[0] -= len(wav) / self.gen.sample_rate
            return self.gen.encode_audio(wav)
        if "codes" in turn:
            try:
                codes = torch.tensor(turn["codes"], dtype=torch.long)
            except (TypeError, ValueError, RuntimeError):
                codes = None
            k, vocab = self.gen.num_codebooks, self.gen.model.cfg.audio_vocab_size
            if codes is None or codes.ndim != 2 or codes.shape[0] != k or codes.shape[1] == 0 or \
                    codes.min() < 0 or codes.max() >= vocab:
                raise ApiError(400, f"{where}.codes must be {k} lists of frame codes in [0, {vocab})", param)
            return codes
        return None

    # --- speaking ---------------------------------------------------------------------------------------
    def speak(self, job: SpeechJob) -> Iterator[bytes]:
        """The request's audio, encoded, as the frames come. The first item is ready before it returns, so errors
        in the request (a context too long, ...) raise here, before a response has started."""
        frames: list[torch.Tensor] = []
        self._begin_turn(job.conversation)
        try:
            try:
                context, spoken = self._fit(job, self._history(job))
                chunks = self.gen.stream_long(job.text, job.speaker, context, chunk_frames=self.chunk_frames,
                                              source=self.batcher.frames, spoken=frames, **job.options)
                first = next(chunks, None)
            except ContextTooLongError as e:
                raise ApiError(400, str(e), "context") from None
            except Busy as e:
                raise ApiError(429, f"the server is busy ({e}); try again shortly", kind="server_busy",
                               retry_after=2) from None
            except ValueError as e:  # a speaker the model does not know, ...
                raise ApiError(400, str(e)) from None
        except BaseException:
            self._end_turn(job.conversation)
            raise
        audio = self._encoded(job, first, chunks, StreamEncoder(job.fmt, self.gen.sample_rate), frames, spoken)
        return _Closing(audio, lambda: self._end_turn(job.conversation))

    def _begin_turn(self, conversation: str | None) -> None:
        """A conversation's requests are spoken one at a time, each after the turns before it have finished."""
        if conversation is None:
            return
        with self._speaking_changed:
            if not self._speaking_changed.wait_for(lambda: conversation not in self._speaking, timeout=600):
                raise ApiError(503, f"conversation {conversation!r} is still speaking another turn",
                               kind="server_busy")
            self._speaking.add(conversation)

    def _end_turn(self, conversation: str | None) -> None:
        if conversation is None:
            return
        with self._speaking_changed:
            self._speaking.discard(conversation)
            self._speaking_changed.notify_all()

    def _encoded(self, job: SpeechJob, first, chunks, encoder: StreamEncoder, frames: list, spoken: list):
        stretch = TimeStretch(job.speed, self.gen.sample_rate) if job.speed != 1.0 else None
        try:
            if first is not None:
                for chunk in itertools.chain([first], chunks):
                    yield encoder.write(stretch.process(chunk) if stretch else chunk)
            if stretch:
                yield encoder.write(stretch.flush())
            yield encoder.close()
        finally:
            chunks.close()  # a client that hung up: the batcher's job is cancelled
        if job.conversation is not None and frames:
            turn = Segment(job.speaker, job.text, torch.stack(frames, dim=1))
            self._remember(job.conversation, [*spoken, turn])

    def _history(self, job: SpeechJob) -> list[Segment]:
        if job.conversation is None:
            return []
        with self._lock:
            return list(self.conversations.get(job.conversation, []))

    def _fit(self, job: SpeechJob, history: list[Segment]) -> tuple[list[Segment], list[Segment]]:
        """The context to speak after (the voice's prompt, then the conversation's latest turns that fit, then the
        request's own turns) and the turns to remember before the new one. The oldest turns are left out when the
        longest sentence would not fit beside them, as `Generator.generate_dialogue` does."""
        history = self.gen.fit_history(job.text, job.speaker, job.prompt, history, job.context,
                                       job.options["max_audio_length_ms"])
        return [*job.prompt, *history, *job.context], [*history, *job.context]

    def _remember(self, conversation: str, turns: list[Segment]) -> None:
        with self._lock:
            self.conversations[conversation] = turns
            self.conversations.move_to_end(conversation)
            while len(self.conversations) > MAX_CONVERSATIONS:
                self.conversations.popitem(last=False)


class _Closing:
    """An iterator that calls `on_close` once, when it is exhausted or closed, even if it never started (a
    generator's own `finally` would not run then)."""

    def __init__(self, it: Iterator[bytes], on_close) -> None:
        self.it, self.on_close = it, on_close

    def __iter__(self) -> _Closing:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self.it)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            self.it.close()
        finally:
            if self.on_close is not None:
                self.on_close, on_close = None, self.on_close
                on_close()


def default_voices(gen: Generator) -> dict[str, Voice]:
    """The model's speakers by id ("0", "1", ...) and by OpenAI's names in order: its listed speakers, or the first
    eleven ids of a model that lists none (CSM-1B: any id works, and a context turn fixes the voice)."""
    ids = sorted(gen.speakers) if gen.speakers is not None else list(range(len(OPENAI_VOICES)))
    described = gen.speakers or {}
    voices = {str(i): Voice(i, description=described.get(i, "")) for i in ids}
    for name, i in zip(OPENAI_VOICES, ids):
        voices[name] = Voice(i, description=f"speaker {i}" + (f": {described[i]}" if i in described else ""))
    return voices


def load_voices(path: str | Path, gen: Generator) -> dict[str, Voice]:
    """A voices file: {"name": {"speaker": 0, "text": "what the prompt says", "audio": "prompt.wav",
    "description": "..."}, ...}; "text" + "audio" (relative to the file) are optional and make a prompt turn
    that fixes the voice. The model's own voices stay available beside them."""
    path = Path(path)
    try:
        listed = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the voices file ({e})") from None
    if not isinstance(listed, dict) or not listed:
        raise ValueError(f"{path}: expected a JSON object of voices by name")
    voices = default_voices(gen)
    for name, spec in listed.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("speaker"), int):
            raise ValueError(f"{path}: voice {name!r} needs an integer 'speaker'")
        gen.check_speaker(spec["speaker"], f"voice {name!r}: speaker")
        prompt = []
        if "audio" in spec or "text" in spec:
            if not isinstance(spec.get("text"), str) or not isinstance(spec.get("audio"), str):
                raise ValueError(f"{path}: voice {name!r} needs both 'text' and 'audio' for its prompt")
            wav = load_audio(path.parent / spec["audio"], gen.sample_rate)
            prompt = [Segment(spec["speaker"], spec["text"], gen.encode_audio(wav))]
        voices[name] = Voice(spec["speaker"], prompt, str(spec.get("description", "")))
    return voices


def _number(body: dict, key: str, default, low: float, high: float):
    value = body.get(key, default)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(400, f"'{key}' must be a number in [{low}, {high}], got {value!r}", key)
    return float(value)


def _integer(body: dict, key: str, default, low: int, high: int):
    value = body.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(400, f"'{key}' must be an integer in [{low}, {high}], got {value!r}", key)
    return value
