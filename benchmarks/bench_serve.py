"""`csm serve` under load: N clients at once, with and without continuous batching.

Starts the server in this process (port 0), sends N concurrent `/v1/audio/speech` requests (pcm, fixed seeds) for
each N, once with `--slots` slots and once with one slot (requests served one after another), and reports per
request time to first audio byte and the aggregate audio seconds per wall second.

    python benchmarks/bench_serve.py                          # the embedded voice, N = 1, 4, 8
    python benchmarks/bench_serve.py --model DIR --clients 1,8,32 --slots 32 --json out.json
    python benchmarks/bench_serve.py --preset csm-1b --clients 1,8,32 --slots 32 --max-ms 4000   # random weights

Random weights never end a line, so with --preset every request runs its whole --max-ms budget.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import threading
import time

import torch

LINES = [  # ten words each: the first-audio target is for a 10-word line
    "I think dinner will be ready at seven this evening.", "We could meet at the station and walk from there.",
    "The museum closes at five thirty today, so come early.", "Can you call me back this evening after the meeting?",
    "The train to the city leaves at nine every morning.", "I left my keys in the kitchen by the bread.",
    "Let us take a walk in the park after lunch.", "The weather will be warm and sunny again tomorrow afternoon.",
]


def one_request(address, body: dict, out: dict) -> None:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(*address, timeout=600)
    conn.request("POST", "/v1/audio/speech", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first, size = None, 0
    while chunk := resp.read1(65536):
        first = first or time.perf_counter() - t0
        size += len(chunk)
    conn.close()
    out.update(status=resp.status, first_s=first, total_s=time.perf_counter() - t0, audio_s=size / 2 / 24_000)


def run(gen, slots: int, clients: int, max_ms: float = 10_000) -> dict:
    from csm.serve.server import make_server

    server = make_server(gen, port=0, slots=slots, max_waiting=clients, quiet=True)  # every client admitted
    threading.Thread(target=server.serve_forever, daemon=True).start()
    results = [{} for _ in range(clients)]
    bodies = [{"input": LINES[i % len(LINES)], "response_format": "pcm", "seed": i, "max_audio_length_ms": max_ms}
              for i in range(clients)]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=one_request, args=(server.server_address[:2], b, r))
               for b, r in zip(bodies, results)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    server.shutdown()
    server.service.batcher.close()
    assert all(r["status"] == 200 for r in results), results
    audio = sum(r["audio_s"] for r in results)
    return {"slots": slots, "clients": clients, "wall_s": wall, "audio_s": audio, "x_real_time": audio / wall,
            "first_audio_ms_median": 1000 * statistics.median(r["first_s"] for r in results),
            "first_audio_ms_max": 1000 * max(r["first_s"] for r in results)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded voice")
    p.add_argument("--preset", default=None, help="random weights of these shapes instead (csm-1b, tiny)")
    p.add_argument("--max-ms", type=float, default=10_000, help="each request's budget per sentence")
    p.add_argument("--clients", default="1,4,8", help="concurrent requests, comma-separated")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from csm.assets import default_model
    from csm.bench import build_codec, build_model
    from csm.generate import Generator, load_generator
    from csm.mimi import load_model_codec

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.preset:
        spec = argparse.Namespace(model=None, preset=args.preset, text=LINES[0], no_codec=False)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = args.preset
        gen = Generator(*build_model(spec, device, dtype), build_codec(spec, device))
    else:
        model = args.model or default_model()
        gen = load_generator(model, device=device, codec=load_model_codec(model, device=device))
    run(gen, 1, 1, args.max_ms)  # warm-up
    rows = []
    for n in (int(c) for c in args.clients.split(",")):
        for slots in sorted({1, min(args.slots, n)}):
            rows.append(run(gen, slots, n, args.max_ms))
            r = rows[-1]
            print(f"clients {n:3d}  slots {slots:3d}  {r['x_real_time']:6.2f}x real time  first audio "
                  f"{r['first_audio_ms_median']:7.0f} ms median, {r['first_audio_ms_max']:7.0f} max  "
                  f"({r['audio_s']:.1f} s of audio in {r['wall_s']:.1f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model, "device": str(device), "threads": torch.get_num_threads(), "runs": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
