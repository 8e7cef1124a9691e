"""Continuous batching and the OpenAI-compatible server, on a tiny random model and codec.

The oracle for every generated frame is the generator running the request alone (`Generator.generate_batch`,
`generate_long`): a request must come out the same whatever it was batched with, and however it was delivered.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import torch

from csm.config import get_config
from csm.frames import Segment
from csm.generate import ContextTooLongError, Generator, Request
from csm.mimi import Mimi, preset
from csm.model import CSM
from csm.serve.batcher import Batcher, Busy
from csm.serve.server import make_server


@pytest.fixture(scope="module")
def gen(tokenizer):
    torch.manual_seed(0)
    codec = Mimi(replace(preset("tiny"), num_codebooks=32, codebook_size=2048)).eval()
    return Generator(CSM(get_config("tiny")), tokenizer, codec)


def _codes(seed: int, frames: int) -> torch.Tensor:
    return torch.randint(1, 2048, (32, frames), generator=torch.Generator().manual_seed(seed))


REQUESTS = [
    Request("hello there", 0, max_audio_length_ms=560, topk=1),  # greedy
    Request("how are you?", 1, context=[Segment(1, "fine thanks", _codes(2, 6))], max_audio_length_ms=400, seed=5),
    Request("fine", 0, max_audio_length_ms=240, temperature=0.7, topk=20, seed=9),
    Request("and you?", 1, max_audio_length_ms=800, seed=3),
]


def test_batched_requests_joining_at_any_frame_equal_their_runs_alone(gen):
    alone = [gen.generate_batch([r])[0].codes for r in REQUESTS]
    assert {a.shape[1] for a in alone} != {0}
    b = Batcher(gen, slots=2)
    jobs = [b.submit(REQUESTS[0]), b.submit(REQUESTS[1])]
    b.step()
    b.step()
    jobs += [b.submit(REQUESTS[2]), b.submit(REQUESTS[3])]  # wait for a slot, then join mid-flight
    assert b.stats() == {"slots": 2, "busy": 2, "waiting": 2}
    b.drain()
    assert b.stats() == {"slots": 2, "busy": 0, "waiting": 0}
    for job, want in zip(jobs, alone):
        got = list(job)
        assert torch.equal(torch.stack(got, 1) if got else torch.zeros(32, 0, dtype=torch.long), want)


def test_batcher_thread_serves_concurrent_callers(gen):
    alone = [gen.generate_batch([r])[0].codes for r in REQUESTS]
    b = Batcher(gen, slots=3).start()
    results: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        frames = list(b.frames(REQUESTS[i]))
        results[i] = torch.stack(frames, 1) if frames else torch.zeros(32, 0, dtype=torch.long)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    b.close()
    assert all(torch.equal(results[i], alone[i]) for i in range(len(REQUESTS)))


def test_cancel_frees_the_slot_and_bad_requests_fail_at_submit(gen):
    b = Batcher(gen, slots=1, max_waiting=1)
    long = Request("hello there", 0, max_audio_length_ms=4000, topk=1)
    job = b.submit(long)
    b.step()
    assert b.stats()["busy"] == 1
    job.cancel()
    b.step()
    assert b.stats()["busy"] == 0
    assert len(list(job)) >= 1  # the frames made before the cancel, then the end
    with pytest.raises(ContextTooLongError):
        b.submit(Request("hello", 0, max_audio_length_ms=10_000_000))
    with pytest.raises(ValueError, match="empty"):
        b.submit(Request(" ", 0))
    b.submit(long)  # takes the free slot at the next step
    b.submit(long)  # waits
    with pytest.raises(Busy):
        b.submit(long)


# --- the HTTP server -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(gen):
    srv = make_server(gen, port=0, slots=4, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.service.batcher.close()


def _post(server, body, raw: bytes | None = None):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=120)
    conn.request("POST", "/v1/audio/speech", raw if raw is not None else json.dumps(body),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp, data


def _get(server, path):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out


def _pcm16(audio: torch.Tensor) -> np.ndarray:
    return (np.clip(audio.numpy(), -1, 1) * 32767).round().astype(np.int16)


LINE = {"input": "Hello there. How are you?", "voice": "1", "seed": 11, "max_audio_length_ms": 640}


def test_speech_streams_the_generators_audio(server, gen):
    want = gen.generate_long(LINE["input"], 1, max_audio_length_ms=640, seed=11)
    assert want.audio is not None
    resp, data = _post(server, {**LINE, "response_format": "pcm"})
    assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked"
    got = np.frombuffer(data, "<i2")
    assert len(got) == len(want.audio) and np.abs(got.astype(int) - _pcm16(want.audio)).max() <= 1
    # wav: the same samples behind a header; "alloy" is speaker 0
    resp, data = _post(server, {**LINE, "voice": "alloy", "response_format": "wav"})
    wav, sr = sf.read(io.BytesIO(data), dtype="int16")
    zero = gen.generate_long(LINE["input"], 0, max_audio_length_ms=640, seed=11)
    assert sr == 24_000 and np.abs(wav.astype(int) - _pcm16(zero.audio)).max() <= 1
    # server-sent events: base64 deltas of the same bytes, then a done event
    resp, data = _post(server, {**LINE, "response_format": "pcm", "stream_format": "sse"})
    events = [json.loads(line[6:]) for line in data.decode().split("\n\n") if line.startswith("data: ")]
    assert resp.getheader("Content-Type").startswith("text/event-stream") and events[-1]["type"] == "speech.audio.done"
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert np.array_equal(np.frombuffer(pcm, "<i2"), got)


def test_speed_stretches_the_stream_at_the_same_pitch(server, gen):
    from csm.audio import TimeStretch

    want = gen.generate_long(LINE["input"], 1, max_audio_length_ms=640, seed=11).audio
    _, data = _post(server, {**LINE, "response_format": "pcm", "speed": 2.0})
    got = np.frombuffer(data, "<i2")
    stretched = torch.from_numpy(TimeStretch(2.0).process(want, final=True))
    assert len(got) == round(len(want) / 2) and np.abs(got.astype(int) - _pcm16(stretched)).max() <= 1


@pytest.mark.parametrize("fmt", ["mp3", "opus", "flac"])
def test_compressed_formats_decode(server, gen, fmt):
    want = gen.generate_long(LINE["input"], 1, max_audio_length_ms=640, seed=11).audio
    resp, data = _post(server, {**LINE, "response_format": fmt})
    audio, sr = sf.read(io.BytesIO(data))
    assert resp.status == 200 and sr == 24_000
    assert abs(len(audio) - len(want)) <= 2400  # mp3 adds its encoder delay and padding (~0.1 s at most)
    if fmt == "flac":  # lossless at 16 bits
        assert np.abs(audio - want.numpy()).max() < 1e-4 + 1 / 32767


def test_context_and_conversation_memory(server, gen):
    ctx_codes = _codes(4, 5)
    body = {**LINE, "response_format": "pcm", "context": [{"speaker": 0, "text": "fine thanks",
                                                           "codes": ctx_codes.tolist()}]}
    want = gen.generate_long(LINE["input"], 1, [Segment(0, "fine thanks", ctx_codes)], 640, seed=11)
    _, data = _post(server, body)
    assert np.abs(np.frombuffer(data, "<i2").astype(int) - _pcm16(want.audio)).max() <= 1
    # context audio as base64 file bytes: encoded by the server's codec, as the generator would
    buf = io.BytesIO()
    sf.write(buf, gen.decode_audio(ctx_codes).numpy(), 24_000, format="WAV", subtype="FLOAT")
    body["context"] = [{"speaker": 0, "text": "fine thanks", "audio": base64.b64encode(buf.getvalue()).decode()}]
    wav_ctx = Segment(0, "fine thanks", gen.decode_audio(ctx_codes))
    _, data = _post(server, body)
    want = gen.generate_long(LINE["input"], 1, [wav_ctx], 640, seed=11)
    assert np.abs(np.frombuffer(data, "<i2").astype(int) - _pcm16(want.audio)).max() <= 1
    # a conversation: the second request is spoken after the first, as the turns of a dialogue
    first = {"input": "hello there", "voice": "0", "seed": 1, "conversation": "c1", "response_format": "pcm",
             "max_audio_length_ms": 480}
    _post(server, first)
    _, data = _post(server, {**first, "input": "fine thanks", "voice": "1", "seed": 2})
    turn = gen.generate_long("hello there", 0, max_audio_length_ms=480, seed=1)
    assert turn.codes.shape[1] > 0
    want = gen.generate_long("fine thanks", 1, [Segment(0, "hello there", turn.codes)], 480, seed=2)
    assert np.abs(np.frombuffer(data, "<i2").astype(int) - _pcm16(want.audio)).max() <= 1
    assert len(server.service.conversations["c1"]) == 2


@pytest.mark.parametrize("body, status, words", [
    ({"voice": "0"}, 400, "'input' must be a non-empty string"),
    ({"input": "  ", "voice": "0"}, 400, "non-empty"),
    ({"input": "x" * 5000}, 400, "over the limit of 4096"),
    ({"input": "hi", "voice": "zebra"}, 400, "unknown voice 'zebra'"),
    ({"input": "hi", "response_format": "aac"}, 400, "response_format 'aac' is not supported"),
    ({"input": "hi", "speed": 5}, 400, "'speed' must be a number in [0.25, 4.0]"),
    ({"input": "hi", "instructions": "whisper"}, 400, "pass earlier turns as 'context'"),
    ({"input": "hi", "temperature": -1}, 400, "'temperature' must be a number"),
    ({"input": "hi", "colour": "red"}, 400, "unknown field(s) ['colour']"),
    ({"input": "hi", "max_audio_length_ms": 50_000,
      "context": [{"speaker": 0, "text": "hello", "codes": _codes(1, 2000).tolist()}]}, 400, "shorten the context"),
    ({"input": "hi", "context": [{"speaker": 0, "text": "hello", "audio": "not base64!"}]}, 400, "not valid base64"),
    ({"input": "hi", "context": [{"speaker": 0, "text": "hello",
                                  "audio": base64.b64encode(b"RIFF junk").decode()}]}, 400, "not a readable audio"),
    ({"input": "hi", "context": [{"speaker": 0, "text": "hello", "codes": [[1, 2]]}]}, 400, "must be 32 lists"),
    ({"input": "hi", "context": [{"text": "hello"}]}, 400, "needs a 'speaker' id or a 'voice'"),
    ([1, 2], 400, "must be a JSON object"),
])
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, body, status, words):
    resp, data = _post(server, body)
    error = json.loads(data)["error"]
    assert resp.status == status and words in error["message"], error
    assert _post(server, {**LINE, "response_format": "pcm"})[0].status == 200


def test_other_endpoints_and_malformed_http(server):
    status, models = _get(server, "/v1/models")
    assert status == 200 and models["data"][0]["id"] == "csm"
    status, voices = _get(server, "/v1/audio/voices")
    names = [v["id"] for v in voices["voices"]]
    assert names[:11] == [str(i) for i in range(11)] and "alloy" in names and "verse" in names
    assert _get(server, "/health")[1]["status"] == "ok"
    assert _get(server, "/nope")[0] == 404 and _get(server, "/v1/audio/speech")[0] == 405
    resp, data = _post(server, None, raw=b"{not json")
    assert resp.status == 400 and "not valid JSON" in json.loads(data)["error"]["message"]


def test_a_client_that_hangs_up_frees_its_slot(server, monkeypatch):
    batcher, made = server.service.batcher, []
    emit = batcher._emit
    monkeypatch.setattr(batcher, "_emit", lambda i, frame: (made.append(i), emit(i, frame)))
    body = json.dumps({"input": "hello there", "response_format": "pcm", "max_audio_length_ms": 38_000,
                       "topk": 1}).encode()  # 475 frames: a random model hardly ever ends a line itself
    sock = socket.create_connection(server.server_address[:2])
    sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert sock.recv(64).startswith(b"HTTP/1.1 200")
    sock.close()
    deadline = time.time() + 60
    while server.service.batcher.stats()["busy"] and time.time() < deadline:
        time.sleep(0.05)
    assert server.service.batcher.stats() == {"slots": 4, "busy": 0, "waiting": 0}
    assert 0 < len(made) < 400  # cancelled, not run to its budget
    assert _post(server, {**LINE, "response_format": "pcm"})[0].status == 200


def test_batcher_with_the_compiled_step_equals_eager_runs_alone(tokenizer, joins_midway):
    """The static path (every slot stepped, attention over the full cache length, one compiled step) on a micro
    model (4 codebooks, 1 layer) so the CPU compile stays short; on CUDA the same path is captured as a graph."""
    from csm.config import CSMConfig, TransformerConfig

    micro = TransformerConfig(n_layers=1, dim=32, n_heads=2, n_kv_heads=1, intermediate_size=64, max_seq_len=64)
    cfg = CSMConfig(backbone=micro, decoder=replace(micro, max_seq_len=4), text_vocab_size=300,
                    audio_vocab_size=67, audio_num_codebooks=4)
    torch._dynamo.reset()  # the compile tests before this one must not use up its recompile limit
    torch.manual_seed(0)
    model = CSM(cfg)
    reqs = [Request("hello there", 0, max_audio_length_ms=640, topk=1), Request("fine", 1, max_audio_length_ms=480,
                                                                                 seed=3),
            Request("how are you?", 0, max_audio_length_ms=400, temperature=0.8, topk=10, seed=4)]
    b = joins_midway(Generator(model, tokenizer), Generator(model, tokenizer, engine="compile"), reqs)
    assert b.static


def test_a_voices_file_gives_named_voices_with_a_prompt_turn(server, gen, tmp_path):
    from csm.serve.service import SpeechService, load_voices

    sf.write(tmp_path / "maya.wav", gen.decode_audio(_codes(6, 4)).numpy(), 24_000)
    (tmp_path / "voices.json").write_text(json.dumps({"maya": {"speaker": 2, "text": "fine thanks",
                                                               "audio": "maya.wav", "description": "test"}}))
    voices = load_voices(tmp_path / "voices.json", gen)
    assert voices["maya"].speaker == 2 and voices["alloy"].speaker == 0  # the model's own voices stay
    service = SpeechService(gen, server.service.batcher, voices=voices)
    job = service.parse({**LINE, "voice": "maya", "response_format": "pcm"})
    pcm = np.frombuffer(b"".join(service.speak(job)), "<i2")
    from csm.audio import load_audio

    prompt = Segment(2, "fine thanks", gen.encode_audio(load_audio(tmp_path / "maya.wav")))  # the file as stored
    want = gen.generate_long(LINE["input"], 2, [prompt], 640, seed=11)
    assert np.abs(pcm.astype(int) - _pcm16(want.audio)).max() <= 1
    (tmp_path / "bad.json").write_text(json.dumps({"maya": {"speaker": 2, "text": "no audio"}}))
    with pytest.raises(ValueError, match="needs both 'text' and 'audio'"):
        load_voices(tmp_path / "bad.json", gen)


def test_an_api_key_guards_every_endpoint_but_health(gen):
    srv = make_server(gen, port=0, slots=1, quiet=True, api_key="s3cret")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        def call(method, path, headers, body=None):
            conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=60)
            conn.request(method, path, body, headers)
            resp = conn.getresponse()
            out = resp.status, resp.read()
            conn.close()
            return out

        body = json.dumps({**LINE, "response_format": "pcm"})
        assert call("POST", "/v1/audio/speech", {}, body)[0] == 401
        status, data = call("POST", "/v1/audio/speech", {"Authorization": "Bearer wrong"}, body)
        assert status == 401 and "API key" in json.loads(data)["error"]["message"]
        assert call("GET", "/v1/models", {})[0] == 401
        assert call("GET", "/health", {})[0] == 200
        assert call("POST", "/v1/audio/speech", {"Authorization": "Bearer s3cret"}, body)[0] == 200
    finally:
        srv.shutdown()
        srv.service.batcher.close()


def test_voices_added_at_run_time(server, gen):
    def call(method, path, body=None):
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
        conn.request(method, path, None if body is None else json.dumps(body))
        resp = conn.getresponse()
        out = resp.status, json.loads(resp.read())
        conn.close()
        return out

    prompt = _codes(8, 4)
    status, made = call("POST", "/v1/audio/voices", {"name": "maya", "speaker": 1, "text": "fine thanks",
                                                     "codes": prompt.tolist(), "description": "added"})
    assert status == 201 and made == {"id": "maya", "speaker": 1, "description": "added", "prompt": True}
    assert "maya" in [v["id"] for v in _get(server, "/v1/audio/voices")[1]["voices"]]
    _, data = _post(server, {**LINE, "voice": "maya", "response_format": "pcm"})
    want = gen.generate_long(LINE["input"], 1, [Segment(1, "fine thanks", prompt)], 640, seed=11)
    assert np.abs(np.frombuffer(data, "<i2").astype(int) - _pcm16(want.audio)).max() <= 1
    for body, words in [({"name": "alloy", "speaker": 0, "text": "x", "codes": prompt.tolist()}, "cannot be replaced"),
                        ({"name": "a b", "speaker": 0, "text": "x", "codes": prompt.tolist()}, "'name' must be"),
                        ({"name": "ok", "speaker": 0, "text": "x"}, "needs its prompt"),
                        ({"name": "ok", "speaker": 0, "codes": prompt.tolist()}, "non-empty 'text'")]:
        status, error = call("POST", "/v1/audio/voices", body)
        assert status == 400 and words in error["error"]["message"], error
    assert call("DELETE", "/v1/audio/voices/maya")[0] == 200
    assert call("DELETE", "/v1/audio/voices/maya")[0] == 404 and call("DELETE", "/v1/audio/voices/alloy")[0] == 400
    assert _post(server, {**LINE, "voice": "maya"})[0].status == 400


def test_a_conversations_turns_are_spoken_one_after_another(server, gen):
    """The second turn arrives while the first is still being spoken: it waits, and is spoken after it."""
    first = {"input": "hello there. how are you?", "voice": "0", "seed": 5, "conversation": "c2",
             "response_format": "pcm", "max_audio_length_ms": 800}
    second = {**first, "input": "fine thanks", "voice": "1", "seed": 6}
    results = {}
    a = threading.Thread(target=lambda: results.update(a=_post(server, first)[1]))
    a.start()
    deadline = time.time() + 30
    while not server.service.batcher.stats()["busy"] and time.time() < deadline:
        time.sleep(0.005)
    b = threading.Thread(target=lambda: results.update(b=_post(server, second)[1]))
    b.start()
    a.join(60)
    b.join(60)
    turn = gen.generate_long(first["input"], 0, max_audio_length_ms=800, seed=5)
    want = gen.generate_long("fine thanks", 1, [Segment(0, first["input"], turn.codes)], 800, seed=6)
    assert np.abs(np.frombuffer(results["b"], "<i2").astype(int) - _pcm16(want.audio)).max() <= 1
    assert "c2" not in server.service._speaking


def _flac(channels: int, rate: int, seconds: float) -> str:
    buf = io.BytesIO()
    sf.write(buf, np.zeros((int(rate * seconds), channels), dtype=np.int16), rate, format="FLAC")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("turns, words", [
    ([_flac(8, 192_000, 0.5)], "8 channels, over the limit of 2"),
    ([_flac(1, 24_000, 40), _flac(1, 24_000, 40)], "longer than the limit of 20 s"),  # 60 s per request in all
])
def test_context_audio_is_bounded_from_its_header(server, turns, words, monkeypatch):
    decoded = []
    real = sf.read
    monkeypatch.setattr(sf, "read", lambda *a, **k: decoded.append(1) or real(*a, **k))
    body = {"input": "hi", "context": [{"speaker": 0, "text": "hello", "audio": a} for a in turns]}
    resp, data = _post(server, body)
    assert resp.status == 400 and words in json.loads(data)["error"]["message"]
    assert len(decoded) == len(turns) - 1  # the turns before it were decoded; the refused one only read its header


@pytest.mark.parametrize("raw, status, words", [
    (b"PUT /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 405, "PUT is not allowed"),
    (b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400, None),
    (b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n", 413, "over the limit"),
])
def test_malformed_http_gets_a_quick_answer(server, raw, status, words):
    sock = socket.create_connection(server.server_address[:2], timeout=5)
    sock.sendall(raw)
    answer = b""
    while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _content_length(answer):
        chunk = sock.recv(65536)  # head and body may come in separate segments
        if not chunk:
            break
        answer += chunk
    sock.close()
    assert answer.startswith(b"HTTP/1.1 %d" % status), answer[:80]
    if words:
        assert words.encode() in answer


def _content_length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_values_of_the_wrong_type_are_refused_not_cast(server):
    for body, param in [({"input": "hi", "seed": True}, "seed"), ({"input": "hi", "seed": 1.5}, "seed"),
                        ({"input": "hi", "context": [{"speaker": 0, "text": "x", "codes": [[1.0] * 3] * 32}]},
                         "context"), ({"input": "hi", "topk": "5"}, "topk")]:
        resp, data = _post(server, body)
        error = json.loads(data)["error"]
        assert resp.status == 400 and error["param"] == param, error


def test_a_full_server_says_429_with_retry_after(gen):
    srv = make_server(gen, port=0, slots=1, max_waiting=0, quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        body = json.dumps({"input": "hello there", "response_format": "pcm", "max_audio_length_ms": 38_000,
                           "topk": 1}).encode()
        hog = socket.create_connection(srv.server_address[:2])  # streams while we ask again, unread
        hog.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert hog.recv(64).startswith(b"HTTP/1.1 200")
        conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
        conn.request("POST", "/v1/audio/speech", json.dumps({**LINE, "response_format": "pcm"}))
        resp = conn.getresponse()
        error = json.loads(resp.read())["error"]
        assert resp.status == 429 and resp.getheader("Retry-After") == "2" and error["type"] == "server_busy"
        conn.request("GET", "/health")
        health = json.loads(conn.getresponse().read())
        assert health["admitted"] == 1 and health["capacity"] == 1
        hog.close()
        deadline = time.time() + 60
        while srv.service.batcher.stats()["busy"] and time.time() < deadline:
            time.sleep(0.05)
        conn.request("POST", "/v1/audio/speech", json.dumps({**LINE, "response_format": "pcm"}))
        assert conn.getresponse().status == 200
    finally:
        srv.shutdown()
        srv.service.batcher.close()


def test_every_sentence_is_checked_before_the_first_byte(gen, tokenizer):
    """A line whose second sentence cannot be spoken fails with a 400 before any audio, not mid-stream."""
    pytest.importorskip("piper.phonemize_espeak")
    from csm.serve.service import ApiError, SpeechService
    from csm.tokenizer import train_phoneme_tokenizer

    phonemes = Generator(gen.model, train_phoneme_tokenizer(["[0]I think dinner is at seven."]), gen.codec)
    service = SpeechService(phonemes, Batcher(phonemes, slots=1))
    with pytest.raises(ApiError, match=r"sentence '\.\.\.': nothing to say"):
        service.parse({"input": "I think dinner is at seven. ...", "voice": "0"})
    assert service.parse({"input": "I think dinner is at seven. At 7:30!", "voice": "0"}).text


def test_a_client_gone_before_the_first_byte_is_released(server):
    """Admission and slot are given back however a stream ends, also when the client left before the response
    started (the body's generator then never runs)."""
    body = json.dumps({"input": "hello there", "response_format": "pcm", "max_audio_length_ms": 38_000,
                       "topk": 1}).encode()
    for _ in range(3):
        sock = socket.create_connection(server.server_address[:2])
        sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        sock.close()
    deadline = time.time() + 60
    while time.time() < deadline:
        health = _get(server, "/health")[1]
        if health["admitted"] == 0 and health["busy"] == 0 and health["waiting"] == 0:
            break
        time.sleep(0.1)
    assert health["admitted"] == 0 and health["busy"] == 0, health
    assert _post(server, {**LINE, "response_format": "pcm"})[0].status == 200
