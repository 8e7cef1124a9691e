"""Where a generated frame's time goes: ms/frame, then the GPU kernels of a few frames, grouped and summed.

    python benchmarks/profile_step.py --engine compile --json step.json          # full CSM-1B shapes, random weights
    python benchmarks/profile_step.py --engine compile --inductor coordinate_descent_tuning=1

Two profiles of the same frames: `replay` runs the engine as generation does (for `graph` / `compile` on CUDA, one
CUDA-graph replay per frame), `launch` calls the frame step directly, kernel by kernel from Python (no graph). The
kernels' summed GPU time against the frame's wall time says whether the frame is bound by the kernels themselves
(bytes, arithmetic) or by the gaps between them; the per-kernel table says which kernels to fuse or replace.
`--inductor key=value` sets torch._inductor.config options before compiling, to try them without editing the code.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from csm.bench import DEFAULT_TEXT, _sync, bench_ours, build_model  # noqa: E402
from csm.generate import Generator, Request  # noqa: E402


def kernel_kind(name: str) -> str:
    """A coarse class for a kernel name: matrix products, attention, Inductor-fused, or other."""
    n = name.lower()
    if n.startswith("triton"):  # Inductor names kernels after the ops they fuse, attention's neighbours included
        return "inductor"
    if re.search(r"flash|fmha|sdpa", n):
        return "attention"
    if re.search(r"gemv|gemm|cutlass|xmma|splitk|cublas|nvjet|_mm_|matmul", n):
        return "matmul"
    return "other"


def profile_frames(fn, frames: int, device: torch.device) -> dict:
    """Run fn() `frames` times under the profiler; per-frame kernel count, summed kernel time and wall time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()  # warm-up outside the profile
    _sync(device)
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        for _ in range(frames):
            fn()
        _sync(device)
        wall = time.perf_counter() - t
    per_name: dict[str, list[float]] = defaultdict(list)
    for e in prof.events():
        if e.device_type.name == "CUDA" and e.name != "Memcpy HtoD (Pageable -> Device)":
            per_name[e.name].append(e.time_range.elapsed_us())
    kernels = sorted(
        ({"name": n[:120], "kind": kernel_kind(n), "per_frame": len(t) / frames, "us_per_frame": sum(t) / frames,
          "mean_us": sum(t) / len(t)} for n, t in per_name.items()),
        key=lambda k: -k["us_per_frame"],
    )
    kinds: dict[str, dict[str, float]] = defaultdict(lambda: {"per_frame": 0.0, "us_per_frame": 0.0})
    for k in kernels:
        kinds[k["kind"]]["per_frame"] += k["per_frame"]
        kinds[k["kind"]]["us_per_frame"] += k["us_per_frame"]
    return {
        "wall_ms_per_frame": wall / frames * 1e3,
        "kernels_per_frame": sum(k["per_frame"] for k in kernels),
        "kernel_ms_per_frame": sum(k["us_per_frame"] for k in kernels) / 1e3,
        "kinds": dict(kinds),
        "top": kernels[:40],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="csm-1b")
    p.add_argument("--model", default=None, help="a real checkpoint instead of random weights")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--engine", choices=["eager", "graph", "compile"], default="compile")
    p.add_argument("--no-fuse", action="store_true", help="keep q/k/v and gate/up as separate projections")
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8 weight-only transformer linears")
    p.add_argument("--gemv", choices=["matmul", "inductor"], default="matmul",
                   help="inductor: single-token linears as multiply + sum, so Inductor writes (and fuses) the GEMVs")
    p.add_argument("--gemv-chunk", type=int, default=None, metavar="N",
                   help="with --gemv inductor or --quantize int8 on CUDA: products over more than N inputs summed in "
                        "chunks of N (quantize._multiply_sum)")
    p.add_argument("--frames", type=int, default=100, help="frames for the ms/frame measurement")
    p.add_argument("--profile-frames", type=int, default=5, help="frames per profile (0: no profile)")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="set torch._inductor.config.KEY (repeatable; ints, floats, true/false, strings)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.gemv_chunk and args.gemv != "inductor" and not args.quantize:  # before building a full-size model
        p.error("--gemv-chunk needs --gemv inductor or --quantize int8")

    import torch._inductor.config as inductor_config

    for item in args.inductor:
        key, _, value = item.partition("=")
        parsed: object = {"true": True, "false": False}.get(value.lower(), value)
        if isinstance(parsed, str):
            for cast in (int, float):
                try:
                    parsed = cast(value)
                    break
                except ValueError:
                    pass
        *path, name = key.split(".")  # nested keys such as triton.cudagraphs
        target = inductor_config
        for part in path:
            target = getattr(target, part, None)
        if target is None or not hasattr(target, name):
            p.error(f"torch._inductor.config has no option {key!r}")
        setattr(target, name, parsed)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    model, tokenizer = build_model(argparse.Namespace(model=args.model, preset=args.preset, text=DEFAULT_TEXT), device, dtype)
    if args.quantize:
        from csm.quantize import quantize_int8

        quantize_int8(model if args.no_fuse else model.fuse_projections())
    gen = Generator(model, tokenizer, None, engine=args.engine, fuse=not args.no_fuse, gemv=args.gemv)
    if args.gemv_chunk:
        from csm.quantize import Int8Linear, SumLinear

        for m in gen.model.modules():
            if isinstance(m, (SumLinear, Int8Linear)):
                m.chunk = args.gemv_chunk
    t = time.perf_counter()
    timing = bench_ours(gen, DEFAULT_TEXT, args.frames, [], 1)
    timing.pop("codes")
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "engine": gen.engine.kind,
              "fused_projections": not args.no_fuse, "quantize": args.quantize, "gemv": args.gemv,
              "gemv_chunk": args.gemv_chunk,
              "inductor": args.inductor, "timing": timing,
              "setup_and_timing_s": time.perf_counter() - t}
    print(f"{result['device']} {args.engine} fused={not args.no_fuse} quantize={args.quantize} gemv={args.gemv} "
          f"chunk={args.gemv_chunk} {args.inductor}: "
          f"{timing['ms_per_frame']:.2f} ms/frame (RTF {timing['rtf']:.3f}), first frame {timing['first_frame_ms']:.1f} ms",
          flush=True)
    if args.json:  # written now too, so a failing profile keeps the timing
        Path(args.json).write_text(json.dumps(result, indent=2))

    if args.profile_frames:
        with torch.inference_mode():
            req = Request(DEFAULT_TEXT, 0, max_audio_length_ms=(args.profile_frames + 2) * 80, topk=1)
            frames = gen.iter_frames([req])
            next(frames)  # prefill + first frame happen before the profiled ones
            result["replay"] = profile_frames(lambda: next(frames), args.profile_frames, device)
            # The step called directly: for graph/compile engines, the same kernels launched one by one.
            step = gen.engine.step_fns(1)[0]
            k, vocab = gen.num_codebooks, model.cfg.audio_vocab_size
            full = model.cfg.backbone.max_seq_len
            inputs = (torch.ones(1, k, dtype=torch.long, device=device), torch.full((1, 1), 40, device=device), full,
                      torch.ones(1, k, vocab, device=device), torch.ones(1, 1, device=device),
                      torch.ones(1, 1, dtype=torch.long, device=device), 1)
            result["launch"] = profile_frames(lambda: step(*inputs), args.profile_frames, device)
        for which in ("replay", "launch"):
            r = result[which]
            kinds = ", ".join(f"{n} {v['per_frame']:.0f} ({v['us_per_frame'] / 1e3:.2f} ms)"
                              for n, v in sorted(r["kinds"].items()))
            print(f"{which}: {r['wall_ms_per_frame']:.2f} ms/frame wall, {r['kernels_per_frame']:.0f} kernels "
                  f"summing {r['kernel_ms_per_frame']:.2f} ms: {kinds}")
        print("top kernels (launch):")
        for kk in result["launch"]["top"][:25]:
            print(f"  {kk['us_per_frame']:8.1f} us/frame {kk['per_frame']:6.1f}x {kk['mean_us']:7.2f} us  "
                  f"{kk['kind']:9s} {kk['name'][:90]}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
