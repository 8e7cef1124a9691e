"""An HTTP server speaking OpenAI's text-to-speech API (`POST /v1/audio/speech`), with conversation context.

`SpeechService` is the whole behaviour without HTTP: it checks a request body, picks the voice and context, and
yields encoded audio as the continuous batcher makes frames (each sentence in the context of the one before, as
`csm say` speaks). `create_app` puts it behind FastAPI on uvicorn and only moves bytes: every response is streamed
(chunked transfer, or server-sent events with `"stream_format": "sse"`), and everything that can be wrong with a
request is found before the first byte, so it gets a 4xx with OpenAI's error body while the server goes on serving.
Admission is bounded (429 with Retry-After beyond it), and the playground page is served at `/`.

Beyond OpenAI's fields (`model`, `input`, `voice`, `response_format`, `speed`, `stream_format`), a request may carry
`context` (earlier turns: speaker or voice, text, and audio as base64 file bytes or Mimi codes) and `conversation`
(an id: the server keeps the turns it spoke under it, with the turns given as context, and speaks the next request
after them); `seed`, `temperature`, `topk` and `max_audio_length_ms` (per sentence) steer generation.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import hmac
import itertools
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from ..audio import SPEED_RANGE, STREAM_FORMATS, AudioError, StreamEncoder, TimeStretch, load_audio
from ..frames import Segment
from ..generate import FRAME_MS, ContextTooLongError, Generator
from .batcher import Batcher, Busy

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


# --- HTTP (FastAPI on uvicorn) --------------------------------------------------------------------------------
class TurnModel(BaseModel):
    """An earlier turn of the conversation."""

    model_config = ConfigDict(extra="forbid")
    text: StrictStr = Field(description="what was said")
    speaker: StrictInt | None = Field(None, description="the speaker id (or give 'voice')")
    voice: StrictStr | StrictInt | None = Field(None, description="a voice name instead of 'speaker'")
    audio: StrictStr | None = Field(None, description="base64 bytes of an audio file (wav, flac, ogg, mp3)")
    codes: list[list[StrictInt]] | None = Field(None, description="or its codec codes: K lists of frame codes")


class VoiceRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: StrictStr


class SpeechRequest(BaseModel):
    """OpenAI's speech request, plus conversation context and sampling controls."""

    model_config = ConfigDict(extra="forbid")
    input: StrictStr = Field(description=f"the text to speak (at most {MAX_INPUT_CHARS} characters)")
    model: StrictStr | None = Field(None, description="ignored: the server speaks with its one model")
    voice: StrictStr | StrictInt | VoiceRef | None = Field(None, description="a voice name or speaker id")
    response_format: StrictStr = Field("mp3", description=f"one of {', '.join(STREAM_FORMATS)}")
    speed: StrictFloat | StrictInt = Field(1.0, description=f"{SPEED_RANGE[0]}-{SPEED_RANGE[1]}, pitch kept")
    stream_format: StrictStr = Field("audio", description="audio (the file's bytes) or sse (server-sent events)")
    instructions: StrictStr | None = Field(None, description="not supported: give earlier turns as context")
    context: list[TurnModel] | None = Field(None, description="earlier turns, oldest first")
    conversation: StrictStr | None = Field(None, description="an id: the server remembers the turns spoken under it")
    seed: StrictInt | None = None
    temperature: StrictFloat | StrictInt | None = None
    topk: StrictInt | None = None
    max_audio_length_ms: StrictFloat | StrictInt | None = Field(None, description="budget per sentence (ms)")


class VoiceRequest(BaseModel):
    """A named voice: a prompt turn (text + audio or codes) that fixes how it sounds."""

    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    speaker: StrictInt = 0
    text: StrictStr | None = None
    audio: StrictStr | None = None
    codes: list[list[StrictInt]] | None = None
    description: StrictStr = ""


def create_app(service: SpeechService, *, api_key: str | None = None, max_waiting: int | None = None,
               quiet: bool = False) -> FastAPI:
    """The HTTP face of `service`: OpenAI's routes, /health, the playground at / and OpenAPI docs at /docs.

    Admission: at most `(slots + max_waiting) / best_of` speech requests are taken at once (default max_waiting:
    2 x slots; best_of draws per sentence, 1 for most models); past that a request gets 429 with Retry-After at
    once, without touching a thread or the model."""
    import anyio.to_thread
    from fastapi import Depends
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
    from starlette.exceptions import HTTPException

    slots = service.batcher.slots
    # A request runs best_of draws of each sentence at once: slots and the wait queue count draws.
    capacity = max(1, (slots + (2 * slots if max_waiting is None else max_waiting)) // service.gen._best_of())
    admitted = {"speech": 0}
    log = logging.getLogger("csm.serve")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # Every admitted stream may block a worker thread while it waits for frames: room for all, plus the rest.
        anyio.to_thread.current_default_thread_limiter().total_tokens = max(40, capacity + 16)
        yield

    app = FastAPI(title="csm", version=_version(), lifespan=lifespan,
                  description="Conversational speech: OpenAI's /v1/audio/speech with conversation context.")

    def authorized(request: Request) -> None:
        if api_key is not None and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                                           f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'")

    guarded = [Depends(authorized)]

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
        return JSONResponse(e.body(), e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return await api_error(request, _validation_error(e.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return await api_error(request, ApiError(e.status_code, message))

    @app.middleware("http")
    async def bounded_body(request: Request, call_next):
        """Refuse a body over the limit from its Content-Length, before reading it."""
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None and "chunked" in request.headers.get("transfer-encoding", ""):
                return await api_error(request, ApiError(411, "a Content-Length header is required"))
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
                return await api_error(request, ApiError(413 if length.isdigit() else 400, (
                    f"the request body is {length} bytes, over the limit of {MAX_BODY_BYTES}" if length.isdigit()
                    else f"bad Content-Length {length!r}")))
        return await call_next(request)

    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse((Path(__file__).parent / "playground.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict:
        """Liveness and load: slots busy, requests waiting for a slot, speech requests admitted, capacity."""
        return {"status": "ok", **service.batcher.stats(), "admitted": admitted["speech"], "capacity": capacity}

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0,
                                            "owned_by": "csm"}]}

    @app.get("/v1/audio/voices", dependencies=guarded)
    async def voices() -> dict:
        return {"voices": [_voice_json(name, v) for name, v in list(service.voices.items())]}

    @app.post("/v1/audio/voices", dependencies=guarded, status_code=201, openapi_extra=_schema(VoiceRequest))
    async def add_voice(request: Request) -> dict:
        body = await _parsed(request, VoiceRequest)
        name, voice = await run_in_threadpool(service.add_voice, body)
        return _voice_json(name, voice)

    @app.delete("/v1/audio/voices/{name}", dependencies=guarded)
    async def remove_voice(name: str) -> dict:
        service.remove_voice(name)
        return {"deleted": True}

    @app.post("/v1/audio/speech", dependencies=guarded, openapi_extra=_schema(SpeechRequest),
              responses={200: {"content": {STREAM_FORMATS[f][2]: {} for f in STREAM_FORMATS}}})
    async def speech(request: Request):
        """Speak `input` (sentence by sentence, each in the context of the last) as a streamed audio file."""
        if admitted["speech"] >= capacity:
            raise ApiError(429, f"the server is busy: {admitted['speech']} requests are being served or waiting "
                                f"(the limit is {capacity}); try again shortly", kind="server_busy", retry_after=2)
        admitted["speech"] += 1
        audio = response = None
        try:
            job = await run_in_threadpool(service.parse, await _parsed(request, SpeechRequest))
            audio = await run_in_threadpool(service.speak, job)
            headers = {"Cache-Control": "no-cache"}
            unknown = service.gen.unknown_words(job.text)
            if unknown:  # a small voice mumbles words it never heard: say which (ASCII, as headers must be)
                headers["X-CSM-Unknown-Words"] = ",".join(unknown).encode("ascii", "replace").decode()
            response = _Stream(_chunks(job, audio), _closer(audio), headers=headers,
                               media_type="text/event-stream" if job.sse else STREAM_FORMATS[job.fmt][2])
            audio = None  # the response owns it now, and releases it however it ends
            return response
        except (ApiError, RequestValidationError):
            raise
        except Exception as e:  # a bug or the device failing: this request fails, the server stays up
            log.exception("speech request failed")
            raise ApiError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error") from None
        finally:
            if audio is not None:  # failed after speak(): free its slot and conversation
                await _closer(audio)()
            elif response is None:  # failed before: only the admission to give back
                admitted["speech"] -= 1

    def _closer(audio: Iterator[bytes]):
        async def close() -> None:
            admitted["speech"] -= 1
            await run_in_threadpool(audio.close)  # the batcher's job cancelled, the conversation freed
        return close

    async def _chunks(job: SpeechJob, audio: Iterator[bytes]):
        t0, sent = time.perf_counter(), 0
        async for data in iterate_in_threadpool(audio):
            if data:
                sent += len(data)
                yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}) \
                    if job.sse else data
        if job.sse:
            yield _sse({"type": "speech.audio.done", "usage": {
                "input_tokens": len(job.text), "output_tokens": sent, "total_tokens": len(job.text) + sent}})
        if not quiet:
            log.info("spoke %d chars as %s in %.2f s", len(job.text), job.fmt, time.perf_counter() - t0)

    return app


async def _parsed(request: Request, model: type[BaseModel]) -> dict:
    """The JSON body checked against `model` (whatever Content-Type the client sent: curl -d says form data), as
    the dict of the fields it set."""
    from pydantic import ValidationError

    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data).model_dump(exclude_unset=True)
    except ValidationError as e:
        raise _validation_error(e.errors()) from None


def _schema(model: type[BaseModel]) -> dict:
    """OpenAPI request body of a route that reads its JSON itself (`_parsed`), nested models inlined."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


class _Stream(StreamingResponse):
    """A streamed response that runs `on_close` however it ends: sent whole, failed, or cancelled because the client
    left, even before its first chunk (a body generator that never started would run no `finally`)."""

    def __init__(self, content, on_close, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


def _validation_error(errors) -> ApiError:
    """Pydantic's first complaint as OpenAI's error body: `param` is the top-level field."""
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    kind = e.get("type", "")
    if kind == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])})")
    if not loc or (kind in ("model_attributes_type", "dict_type") and len(loc) == 0):
        return ApiError(400, "the request body must be a JSON object")
    if kind == "extra_forbidden":
        return ApiError(400, f"unknown field(s) [{loc[-1]!r}]", loc[0])
    if kind == "missing" and loc == ["input"]:
        return ApiError(400, "'input' must be a non-empty string: the text to speak", "input")
    return ApiError(400, f"{'.'.join(loc)}: {e['msg']} (got {e.get('input')!r:.80})", loc[0])


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("csm")
    except PackageNotFoundError:
        return "0"


def _voice_json(name: str, voice: Voice) -> dict:
    return {"id": name, "speaker": voice.speaker, "description": voice.description, "prompt": bool(voice.prompt)}


def _sse(event: dict) -> bytes:
    return b"data: " + json.dumps(event).encode() + b"\n\n"


class SpeechServer:
    """uvicorn serving `create_app` on a socket bound at construction (port 0: any free port, see
    `server_address`). `serve_forever()` runs it in the calling thread; `shutdown()` stops it gracefully (streams
    in flight get `grace` seconds) from another."""

    def __init__(self, app: FastAPI, service: SpeechService, host: str, port: int, quiet: bool = False,
                 grace: float = 5.0) -> None:
        import socket

        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.socket.listen(1024)  # connections queue from here on, before uvicorn starts accepting them
        self.server_address = self.socket.getsockname()
        self.service, self.app = service, app
        config = uvicorn.Config(app, log_level="warning" if quiet else "info", timeout_graceful_shutdown=grace,
                                access_log=not quiet, timeout_keep_alive=30, http=_protocol())
        self.server = uvicorn.Server(config)
        self._done = threading.Event()

    def serve_forever(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self._done.set()

    def shutdown(self, timeout: float = 30) -> None:
        self.server.should_exit = True
        self._done.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()


def _protocol():
    """uvicorn's h11 protocol, answering a request it cannot parse (Content-Length: -1, ...) with OpenAI's error
    body instead of plain text: such requests never reach the app."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps(ApiError(400, f"malformed HTTP request: {msg}").body()).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return Protocol


def make_server(gen: Generator, host: str = "127.0.0.1", port: int = 8000, *, slots: int = 8,
                max_waiting: int | None = None, voices: dict[str, Voice] | None = None, model_name: str = "csm",
                chunk_frames: int = 4, quiet: bool = False, api_key: str | None = None) -> SpeechServer:
    """A ready server with its batcher started and warmed up. `serve_forever()` runs it; `shutdown()` then
    `server.service.batcher.close()` stop it."""
    waiting = 2 * slots if max_waiting is None else max_waiting
    batcher = Batcher(gen, slots=slots, max_waiting=waiting).start()  # counts draws, as admission does
    service = SpeechService(gen, batcher, voices=voices, model_name=model_name, chunk_frames=chunk_frames)
    server = SpeechServer(create_app(service, api_key=api_key, max_waiting=waiting, quiet=quiet), service, host,
                          port, quiet=quiet)
    # Warm up before the first client: a compiled step compiles and a CUDA graph is captured here, not in a request.
    for _ in batcher.frames(gen.request("Hello.", max_audio_length_ms=3 * FRAME_MS, seed=0)):
        pass
    return server
