"""An HTTP server speaking OpenAI's text-to-speech API (`POST /v1/audio/speech`), with conversation context.

`create_app` puts a `SpeechService` (service.py: request checking, voices, conversations, the audio stream) behind
FastAPI on uvicorn and only moves bytes: every response is streamed (chunked transfer, or server-sent events with
`"stream_format": "sse"`), and a bad request gets a 4xx with OpenAI's error body before any audio while the server
goes on serving. Admission is bounded (429 with Retry-After beyond it), and the playground page is served at `/`.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import logging
import threading
import time
from pathlib import Path
from typing import Iterator

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from ..audio import SPEED_RANGE
from ..generate import FRAME_MS, Generator
from .batcher import Batcher
from .encode import STREAM_FORMATS
from .service import MAX_BODY_BYTES, MAX_INPUT_CHARS, ApiError, SpeechJob, SpeechService, Voice


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

    Admission: at most `slots + max_waiting` speech requests are taken at once (default max_waiting: 2 x slots);
    past that a request gets 429 with Retry-After at once, without touching a thread or the model."""
    import anyio.to_thread
    from fastapi import Depends
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
    from starlette.exceptions import HTTPException

    slots = service.batcher.slots
    capacity = max(1, slots + (2 * slots if max_waiting is None else max_waiting))
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
            response = _Stream(_chunks(job, audio), _closer(audio), headers={"Cache-Control": "no-cache"},
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
    batcher = Batcher(gen, slots=slots, max_waiting=waiting).start()
    service = SpeechService(gen, batcher, voices=voices, model_name=model_name, chunk_frames=chunk_frames)
    server = SpeechServer(create_app(service, api_key=api_key, max_waiting=waiting, quiet=quiet), service, host,
                          port, quiet=quiet)
    # Warm up before the first client: a compiled step compiles and a CUDA graph is captured here, not in a request.
    for _ in batcher.frames(gen.request("Hello.", max_audio_length_ms=3 * FRAME_MS, seed=0)):
        pass
    return server
