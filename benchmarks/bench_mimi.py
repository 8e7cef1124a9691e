"""Mimi speed: encode / decode throughput in frames per second (12.5 frames = 1 s of audio), full-size config with
random weights. One-shot on a whole clip, and streaming frame by frame (the latency-bound path of generation).

    python benchmarks/bench_mimi.py [--seconds 10] [--stream-frames 50] [--device cpu] [--dtype float32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch

from csm.mimi import Mimi, preset


def random_mimi(device: str, dtype: torch.dtype, num_codebooks: int) -> Mimi:
    torch.manual_seed(0)
    model = Mimi(preset("kyutai/mimi").with_codebooks(num_codebooks))
    with torch.no_grad():  # fan-in scaled weights keep activations finite, like a trained model
        for p in model.state_dict(keep_vars=True).values():
            if p.dim() > 1:
                p.normal_(0, 1 / math.sqrt(p[0].numel()))
    return model.to(device=device, dtype=dtype).eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="clip length for one-shot encode/decode")
    ap.add_argument("--stream-frames", type=int, default=50, help="frames decoded/encoded one at a time")
    ap.add_argument("--repeats", type=int, default=3, help="best of N timed runs")
    ap.add_argument("--num-codebooks", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    mimi = random_mimi(args.device, dtype, args.num_codebooks)
    fs = mimi.frame_size
    frames = round(args.seconds * mimi.cfg.frame_rate)
    wav = (0.1 * torch.randn(1, 1, frames * fs)).to(args.device, dtype)
    codes = mimi.encode(wav)
    sf = args.stream_frames

    def stream_decode():
        s = mimi.decode_stream()
        for i in range(sf):
            s.decode(codes[..., i % frames : i % frames + 1])

    def stream_encode():
        s = mimi.encode_stream()
        for i in range(sf):
            s.encode(wav[..., (i % frames) * fs : (i % frames + 1) * fs])

    rows = [
        ("encode, one-shot", frames, timed(lambda: mimi.encode(wav), args.device, args.repeats)),
        ("decode, one-shot", frames, timed(lambda: mimi.decode(codes), args.device, args.repeats)),
        ("encode, streaming 1 frame", sf, timed(stream_encode, args.device, args.repeats)),
        ("decode, streaming 1 frame", sf, timed(stream_decode, args.device, args.repeats)),
    ]
    results = []
    print(f"Mimi full size, {args.num_codebooks} codebooks, {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'mode':<28}{'frames':>8}{'seconds':>10}{'frames/s':>10}{'x realtime':>12}{'ms/frame':>10}")
    for name, n, sec in rows:
        fps = n / sec
        results.append({"mode": name, "frames": n, "seconds": sec, "frames_per_s": fps,
                        "realtime_factor": fps / mimi.cfg.frame_rate, "ms_per_frame": 1000 * sec / n})
        print(f"{name:<28}{n:>8}{sec:>10.3f}{fps:>10.1f}{fps / mimi.cfg.frame_rate:>12.2f}{1000 * sec / n:>10.1f}")
    if args.json:
        meta = {"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
                "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                "num_codebooks": args.num_codebooks}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
