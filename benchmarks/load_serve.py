"""`csm serve` under load and abuse: does it keep serving, refuse politely and hold its memory?

Starts `csm serve` as a separate process (so its memory is its own), then:
1. load: N clients stream for T seconds, each asking again as soon as it is answered, with random lines, random
   formats and random hang-ups (a client that closes after the first chunk). Every request must end one of two
   ways: completed (a 200 whose body ended properly, or a hang-up we chose) or refused (429/503 with Retry-After).
   Anything else (a reset, a broken body, another status) counts as failed.
2. abuse: the hostile requests of issue #30, one at a time: each should get a 4xx with OpenAI's error body quickly
   and cost little memory.
It prints a table and, with --json, writes the numbers.

    python benchmarks/load_serve.py                              # embedded voice, 64 clients, 180 s
    python benchmarks/load_serve.py --clients 16 --seconds 30 --slots 8 --json out.json
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

LINES = [
    "I think dinner is at seven.", "We could meet at the station at half past four.",
    "The museum closes early on Sundays.", "Can you call me back this evening?",
    "Hello, my name is Sarah and I live in Boston.", "Let us take a walk in the park after lunch.",
]
FORMATS = ["pcm", "wav", "mp3", "opus", "flac"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(args) -> tuple[subprocess.Popen, tuple[str, int]]:
    cmd = [sys.executable, "-m", "csm", "serve", "--port", str(args.port), "--slots", str(args.slots),
           "--threads", str(args.threads)] + (["--model", args.model] if args.model else []) + \
          (["--max-waiting", str(args.max_waiting)] if args.max_waiting is not None else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    address = ("127.0.0.1", args.port)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection(*address, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, address
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise SystemExit(f"csm serve exited: {proc.stderr.read()[-2000:]}")
    raise SystemExit("csm serve did not come up in 300 s")


LONE = {"input": "Hello, my name is Sarah and I live in Boston.", "response_format": "pcm", "seed": 0}


def first_byte(address, body: dict) -> float:
    """Seconds from sending `body` to the first byte of audio (the rest is read and dropped)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(*address, timeout=300)
    conn.request("POST", "/v1/audio/speech", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = None
    while chunk := resp.read1(65536):
        first = first or time.perf_counter() - t0
    conn.close()
    return first if resp.status == 200 and first else float("nan")


def one(address, rng: random.Random) -> dict:
    body = {"input": rng.choice(LINES), "response_format": rng.choice(FORMATS), "seed": rng.randrange(1000)}
    hang_up = rng.random() < 0.15
    t0 = time.perf_counter()
    try:
        conn = http.client.HTTPConnection(*address, timeout=300)
        conn.request("POST", "/v1/audio/speech", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status in (429, 503):
            resp.read()
            ok = resp.getheader("Retry-After") is not None
            return {"outcome": "refused" if ok else "failed", "why": "no Retry-After" if not ok else ""}
        if resp.status != 200:
            return {"outcome": "failed", "why": f"status {resp.status}: {resp.read()[:200]!r}"}
        first = None
        while chunk := resp.read1(65536):
            first = first or time.perf_counter() - t0
            if hang_up:
                conn.close()
                return {"outcome": "completed", "hung_up": True, "first_s": first}
        conn.close()
        return {"outcome": "completed", "first_s": first}
    except Exception as e:  # noqa: BLE001 - a reset, a broken chunked body, a timeout: all failures
        return {"outcome": "failed", "why": f"{type(e).__name__}: {e}"}


def load(address, pid: int, clients: int, seconds: float) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    stop = time.time() + seconds
    peak = [rss_mb(pid)]

    def client(i: int) -> None:
        rng = random.Random(i)
        while time.time() < stop:
            r = one(address, rng)
            with lock:
                results.append(r)
            if r["outcome"] == "refused":
                time.sleep(rng.uniform(0.5, 2.0))  # a polite client waits (less than Retry-After says, to press)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak.append(rss_mb(pid))
        time.sleep(0.5)
    firsts = sorted(r["first_s"] for r in results if r.get("first_s"))
    q = lambda p: firsts[min(len(firsts) - 1, int(p * len(firsts)))] if firsts else float("nan")  # noqa: E731
    failed = [r["why"] for r in results if r["outcome"] == "failed"]
    return {"requests": len(results), "completed": sum(r["outcome"] == "completed" for r in results),
            "hung_up": sum(bool(r.get("hung_up")) for r in results),
            "refused": sum(r["outcome"] == "refused" for r in results), "failed": len(failed),
            "failures": failed[:5], "first_byte_p50_s": q(0.5), "first_byte_p95_s": q(0.95),
            "rss_peak_mb": max(peak)}


def _flac(channels: int, rate: int, seconds: float) -> str:
    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros((int(rate * seconds), channels), dtype=np.int16), rate, format="FLAC")
    return base64.b64encode(buf.getvalue()).decode()


def abuse(address, pid: int) -> list[dict]:
    big = _flac(8, 192_000, 119)
    cases = [
        ("8-channel 192 kHz FLAC context, 119 s", "POST", {"input": "hi", "context": [
            {"speaker": 0, "text": "hello", "audio": big}]}, None),
        ("four such turns in one body", "POST", {"input": "hi", "context": [
            {"speaker": 0, "text": "hello", "audio": big}] * 4}, None),
        ("a later sentence that cannot be spoken", "POST", {"input": "I think dinner is at seven. ...",
                                                            "response_format": "pcm"}, None),
        ("Content-Length: -1", "RAW", None, b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"),
        ("PUT", "RAW", None, b"PUT /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"),
        ("codes as floats", "POST", {"input": "hi", "context": [{"speaker": 0, "text": "x",
                                                                 "codes": [[1.5] * 4] * 8}]}, None),
        ("seed as a boolean", "POST", {"input": "hi", "seed": True}, None),
        ("not JSON", "RAW", None, b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{nope"),
        ("a 40 MB body", "RAW", None, b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Length: 41943040\r\n\r\n"),
    ]
    import socket

    out = []
    for name, kind, body, raw in cases:
        before = rss_mb(pid)
        t0 = time.perf_counter()
        if kind == "POST":
            conn = http.client.HTTPConnection(*address, timeout=60)
            conn.request("POST", "/v1/audio/speech", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            status = resp.status
            conn.close()
        else:
            sock = socket.create_connection(address, timeout=10)
            sock.sendall(raw)
            data = b""
            try:
                while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                    part = sock.recv(65536)
                    if not part:
                        break
                    data += part
            except socket.timeout:
                pass
            sock.close()
            status = int(data.split()[1]) if data.startswith(b"HTTP/") else 0
            data = data.split(b"\r\n\r\n", 1)[-1]
        seconds = time.perf_counter() - t0
        try:
            openai = "error" in json.loads(data)
        except ValueError:
            openai = False
        out.append({"case": name, "status": status, "seconds": round(seconds, 3), "openai_error_body": openai,
                    "extra_mb": round(rss_mb(pid) - before, 1)})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the embedded voice")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=180)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--warmup", type=float, default=30, help="seconds of the same load before RSS is first read")
    p.add_argument("--max-waiting", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--json", default=None)
    p.add_argument("--lone-only", action="store_true", help="only the lone request's first byte (any server)")
    args = p.parse_args()

    proc, address = start_server(args)
    try:
        lone = sorted(first_byte(address, LONE) for _ in range(4))[1:]  # the first one warms up
        if args.lone_only:
            print(f"lone 10-word request, first byte: {statistics.median(lone) * 1000:.0f} ms (median of 3)")
            return 0
        warm = load(address, proc.pid, args.clients, args.warmup)  # the allocators reach their working size
        time.sleep(2)
        rss_start = rss_mb(proc.pid)
        report = {"machine": f"{os.cpu_count()} CPUs", "clients": args.clients, "seconds": args.seconds,
                  "slots": args.slots, "lone_first_byte_s": statistics.median(lone), "rss_start_mb": rss_start}
        report["warmup"] = {"seconds": args.warmup, "requests": warm["requests"], "failed": warm["failed"]}
        report["load"] = load(address, proc.pid, args.clients, args.seconds)
        time.sleep(2)
        conn = http.client.HTTPConnection(*address, timeout=10)
        conn.request("GET", "/health")
        report["health_after"] = json.loads(conn.getresponse().read())
        report["rss_end_mb"] = rss_mb(proc.pid)
        report["abuse"] = abuse(address, proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    ld = report["load"]
    print(f"load: {args.clients} clients x {args.seconds:.0f} s, {args.slots} slots: {ld['requests']} requests, "
          f"{ld['completed']} completed ({ld['hung_up']} hung up by us), {ld['refused']} refused with Retry-After, "
          f"{ld['failed']} failed {ld['failures'] or ''}")
    print(f"first byte p50 {ld['first_byte_p50_s']:.2f} s, p95 {ld['first_byte_p95_s']:.2f} s; a lone 10-word "
          f"request before the load: {report['lone_first_byte_s'] * 1000:.0f} ms")
    print(f"RSS after {args.warmup:.0f} s of warm-up load: {report['rss_start_mb']:.0f} MB, peak {ld['rss_peak_mb']:.0f} MB, end {report['rss_end_mb']:.0f}"
          f" MB; /health after: {report['health_after']}")
    print("abuse:")
    for c in report["abuse"]:
        print(f"  {c['status']}  {c['seconds']:6.3f} s  {c['extra_mb']:+6.1f} MB  "
              f"{'OpenAI body' if c['openai_error_body'] else 'no JSON body'}  {c['case']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
