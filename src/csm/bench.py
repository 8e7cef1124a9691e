"""`csm bench`: generation speed of our engine, and of transformers' CSM on identical weights in the same run.

Defaults to the full CSM-1B shapes with random weights, so it runs anywhere without downloads. Both sides decode
greedily, so their codes can be compared for equality too. Reports prefill time, time to first frame and to
first audio chunk, ms/frame and real-time factor at batch 1, aggregate frames/s at larger batches, and peak
memory; writes JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time

import torch

FRAME_S = 0.08
DEFAULT_TEXT = "Hello there, it is a pleasure to finally meet you today."  # 10 words


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build_model(args, device, dtype):
    """args.model loaded, else random weights of args.preset's shapes with a small BPE over args.text."""
    from .checkpoints import load_checkpoint
    from .config import get_config
    from .model import CSM
    from .tokenizer import TextTokenizer, train_tokenizer

    if args.model:
        model, _ = load_checkpoint(args.model, device=device, dtype=dtype)
        return model, TextTokenizer.from_pretrained(args.model)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = CSM(get_config(args.preset))
    model = model.to_empty(device=device)
    model.reset_buffers(device)
    model.init_weights(std=0.02)
    model = model.to(dtype).eval()
    return model, train_tokenizer([DEFAULT_TEXT, args.text] * 4, vocab_size=300)


def build_codec(args, device):
    """A random-weight full-size Mimi (None with args.no_codec)."""
    if args.no_codec:
        return None
    try:
        from .mimi import Mimi, preset
    except ImportError:
        return None
    torch.manual_seed(0)
    return Mimi(preset("kyutai/mimi")).to(device).eval()


def _timed_frames(gen, text: str, frames: int, **sampling) -> tuple[list[float], list[torch.Tensor]]:
    """Warm up (captures / compiles the step for these sampling settings, fills allocator caches), then generate
    up to `frames` frames: (seconds since the start at each frame, the frames)."""
    from .generate import Request

    list(gen.iter_frames([Request(text, 0, max_audio_length_ms=3 * 80, **sampling)]))
    _sync(gen.device)
    t0 = time.perf_counter()
    stamps, codes = [], []
    for frame, _ in gen.iter_frames([Request(text, 0, max_audio_length_ms=frames * 80, **sampling)]):
        codes.append(frame[0].cpu())
        stamps.append(time.perf_counter() - t0)
    return stamps, codes


def _seconds_per_frame(stamps: list[float]) -> float:
    """Steady-state time per frame: the first frame (prefill included) is left out."""
    return (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)


def bench_ours(gen, text: str, frames: int, batch_sizes: list[int], chunk_frames: int) -> dict:
    from .generate import Request

    dev = gen.device
    stamps, codes = _timed_frames(gen, text, frames, topk=1)
    per_frame = _seconds_per_frame(stamps)
    out = {
        "frames": len(stamps),
        "first_frame_ms": stamps[0] * 1e3,  # prefill + the first frame
        "ms_per_frame": per_frame * 1e3,
        "rtf": per_frame / FRAME_S,
        "codes": torch.stack(codes, dim=1) if codes else None,
    }
    # The same, sampled with the default top-k 50 / temperature 0.9: greedy batches skip the top-k select and
    # softmax, so the greedy figure flatters what `csm say` pays per frame.
    stamps, _ = _timed_frames(gen, text, frames, seed=0)
    out["sampled_ms_per_frame"] = _seconds_per_frame(stamps) * 1e3
    # prefill alone: the backbone over the prompt
    tokens, mask = gen.prompt_frames(text, 0, ())
    step = gen.engine.step_fns(1)[0]
    tokens, mask = tokens[None].to(dev), mask[None].to(dev)
    pos = torch.arange(tokens.shape[1], device=dev)[None]
    from .model import causal_mask

    with torch.inference_mode():
        _sync(dev)
        t = time.perf_counter()
        gen.model.backbone_forward(tokens, mask, pos, causal_mask(pos, tokens.shape[1]), step.backbone_cache)
        _sync(dev)
    out["prefill_ms"] = (time.perf_counter() - t) * 1e3
    out["prompt_frames"] = tokens.shape[1]

    if gen.codec is not None:
        req = Request(text, 0, max_audio_length_ms=frames * 80, topk=1)
        for _ in range(2):  # the first pass initialises the codec's kernels; the second is what a server sees
            _sync(dev)
            t = time.perf_counter()
            chunk = next(iter(gen.stream(req, chunk_frames=chunk_frames)))
            _sync(dev)
            out["first_chunk_ms"] = (time.perf_counter() - t) * 1e3
        out["chunk_frames"] = chunk_frames
        out["chunk_samples"] = int(chunk.numel())

    out["batches"] = {}
    for b in batch_sizes:
        reqs = [Request(text, i % 4, max_audio_length_ms=frames * 80, topk=1) for i in range(b)]
        list(gen.iter_frames([Request(text, 0, max_audio_length_ms=2 * 80, topk=1)] * b))  # warm-up this size
        _sync(dev)
        t = time.perf_counter()
        produced = 0
        for _, active in gen.iter_frames(reqs):
            produced += int(active.sum())
        _sync(dev)
        dt = time.perf_counter() - t
        out["batches"][b] = {"frames_per_s": produced / dt, "x_realtime": produced * FRAME_S / dt}
    out["peak_mb"] = _peak_mb(dev)
    return out


def bench_transformers(model, tokenizer, text: str, frames: int, batch_sizes: list[int] = ()) -> dict:
    """The same weights in transformers' CsmForConditionalGeneration (greedy generate)."""
    from transformers import CsmConfig, CsmForConditionalGeneration, MimiConfig

    from .checkpoints import config_to_json, convert_from_ours

    dev = model.text_embeddings.weight.device
    cfg = config_to_json(model.cfg, "transformers")
    cfg.pop("model_type"), cfg.pop("architectures")
    # a minimal codec: the benchmark measures code generation, and the codec is not run
    cfg["codec_config"] = MimiConfig(hidden_size=32, num_filters=4, codebook_dim=16, num_hidden_layers=1,
                                     intermediate_size=32, upsample_groups=32,
                                     vector_quantization_hidden_dimension=16).to_dict()
    with torch.device("meta"):
        hf = CsmForConditionalGeneration(CsmConfig(**cfg))
    sd = convert_from_ours(model.state_dict(), model.cfg, "transformers")
    missing = hf.load_state_dict(sd, strict=False, assign=True).missing_keys
    assert all(k.startswith("codec_model.") for k in missing), missing
    hf.codec_model.to_empty(device=dev)
    # Non-persistent buffers were built on meta: rebuild them (RoPE tables, codebook offsets) on the device.
    with torch.device(dev):
        for mod in hf.modules():
            if type(mod).__name__.endswith("RotaryEmbedding"):
                type(mod).__init__(mod, mod.config)
            if hasattr(mod, "audio_tokens_offsets"):
                mod.audio_tokens_offsets = torch.arange(model.cfg.audio_num_codebooks) * model.cfg.audio_vocab_size
    leftover = [name for name, b in hf.named_buffers() if b.is_meta]
    if leftover:
        raise RuntimeError(f"transformers buffers left on the meta device: {leftover}")
    hf = hf.to(dev).eval()
    ids = torch.tensor([tokenizer.encode(f"[0]{text}")], device=dev)

    def generate(batch: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
        with torch.inference_mode():
            _sync(dev)
            t = time.perf_counter()
            out = hf.generate(input_ids=batch, do_sample=False, depth_decoder_do_sample=False, max_new_tokens=n)
            _sync(dev)
        return out, time.perf_counter() - t

    generate(ids, 3)  # warm-up
    out, dt = generate(ids, frames)
    n = out.shape[1]
    result = {"frames": n, "ms_per_frame": dt / n * 1e3, "rtf": dt / n / FRAME_S, "codes": out[0].T.cpu(),
              "batches": {}}
    for b in batch_sizes:
        if b == 1:
            continue
        generate(ids.expand(b, -1), 2)
        out, dt = generate(ids.expand(b, -1), frames)
        produced = out.shape[0] * out.shape[1]
        result["batches"][b] = {"frames_per_s": produced / dt, "x_realtime": produced * FRAME_S / dt}
    return result


def run(args: argparse.Namespace) -> int:
    from .generate import Generator

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    frames = args.frames or (100 if device.type == "cuda" else 10)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    engine = None if args.engine == "auto" else args.engine

    model, tokenizer = build_model(args, device, dtype)
    ref_batches = batch_sizes if args.transformers_batches else []
    n_params = model.num_parameters()  # before quantization turns weights into int8 buffers
    reference = None
    if args.quantize:
        from .quantize import quantize_int8

        if not args.no_transformers:  # transformers runs the unquantized weights, built before we quantize
            reference = bench_transformers(model, tokenizer, args.text, frames, ref_batches)
        if not args.no_fuse:  # fuse first, so the fused q/k/v and gate/up matrices are what gets quantized
            model.fuse_projections()
        quantize_int8(model)
    gen = Generator(model, tokenizer, build_codec(args, device), engine=engine, fuse=not args.no_fuse,
                    gemv=args.gemv)
    print(f"benchmarking {args.model or args.preset} ({n_params / 1e6:.0f} M params, {dtype}) on "
          f"{_device_name(device)}; engine={gen.engine.kind}; {frames} frames", file=sys.stderr)
    ours = bench_ours(gen, args.text, frames, batch_sizes, args.chunk_frames)
    result = {
        "device": _device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "model": args.model or args.preset,
        "engine": gen.engine.kind,
        "quantize": args.quantize,
        "gemv": args.gemv,
        "fused_projections": not args.no_fuse,
        "text": args.text,
        "ours": {k: v for k, v in ours.items() if k != "codes"},
    }
    if not args.no_transformers:
        ref = reference or bench_transformers(model, tokenizer, args.text, frames, ref_batches)
        n = min(ref["codes"].shape[1], ours["codes"].shape[1])
        same = (ref["codes"][:, :n] == ours["codes"][:, :n]).all(dim=0).tolist() + [False]
        result["transformers"] = {k: v for k, v in ref.items() if k != "codes"}
        result["transformers"]["same_codes"] = same.index(False) == n
        # In bf16 two correct implementations round differently, and a greedy argmax flips once logits tie closely:
        # the frames that agree before the first difference say how close the two are.
        result["transformers"]["same_leading_frames"] = same.index(False)
        result["speedup_vs_transformers"] = ref["ms_per_frame"] / ours["ms_per_frame"]
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_table(r: dict) -> str:
    o = r["ours"]
    rows = [
        ("prefill", f"{o['prefill_ms']:.1f} ms ({o['prompt_frames']} frames)"),
        ("first frame", f"{o['first_frame_ms']:.1f} ms"),
        ("ms/frame (batch 1)", f"{o['ms_per_frame']:.1f}"),
        ("RTF (batch 1)", f"{o['rtf']:.3f}"),
        ("ms/frame sampled", f"{o['sampled_ms_per_frame']:.1f} (top-k 50; the rows above are greedy)"),
    ]
    if "first_chunk_ms" in o:
        rows.append(("first audio chunk", f"{o['first_chunk_ms']:.1f} ms ({o['chunk_frames']} frames)"))
    for b, v in o["batches"].items():
        rows.append((f"batch {b}", f"{v['frames_per_s']:.1f} frames/s = {v['x_realtime']:.2f}x real time"))
    rows.append(("peak memory", f"{o['peak_mb']:.0f} MB"))
    if "transformers" in r:
        t = r["transformers"]
        rows.append(("transformers ms/frame", f"{t['ms_per_frame']:.1f} (RTF {t['rtf']:.3f})"))
        for b, v in t.get("batches", {}).items():
            rows.append((f"transformers batch {b}", f"{v['frames_per_s']:.1f} frames/s = {v['x_realtime']:.2f}x"))
        agree = "yes" if t["same_codes"] else f"first {t['same_leading_frames']} of {t['frames']} frames"
        rows.append(("speedup", f"{r['speedup_vs_transformers']:.2f}x; same greedy codes: {agree}"))
    width = max(len(k) for k, _ in rows)
    head = f"{r['model']} on {r['device']} ({r['dtype']}, engine={r['engine']}, quantize={r['quantize']}, "
    head += f"fused={r.get('fused_projections', True)})"
    return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows])


def add_subcommand(sub) -> None:
    p = sub.add_parser("bench", help="measure generation speed (ours and transformers on the same weights)")
    p.add_argument("--preset", default="csm-1b", help="random-weight model shapes (default: the full csm-1b)")
    p.add_argument("--model", default=None, help="benchmark a real checkpoint instead of random weights")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--frames", type=int, default=0, help="frames per measurement (default: 100 GPU, 10 CPU)")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--chunk-frames", type=int, default=1, help="frames in the first streamed audio chunk")
    p.add_argument("--engine", choices=["auto", "eager", "graph", "compile"], default="auto",
                   help="how our frame step runs (auto: CUDA graph on GPU, eager on CPU)")
    p.add_argument("--transformers-batches", action="store_true",
                   help="also time transformers at --batch-sizes (slow on a CPU)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weight-only linears for our engine (transformers keeps full precision)")
    p.add_argument("--gemv", choices=["matmul", "inductor"], default="matmul",
                   help="with --engine compile: matrix-vector products written by Inductor, fused (quantize.py)")
    p.add_argument("--no-fuse", action="store_true",
                   help="keep q/k/v and gate/up as separate projections (to measure what fusing them buys)")
    p.add_argument("--text", default=DEFAULT_TEXT)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    p.add_argument("--no-codec", action="store_true", help="skip the streaming-audio measurement")
    p.add_argument("--json", default=None, help="write the results here")
    p.set_defaults(func=run)
