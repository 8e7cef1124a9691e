"""One-token matrix-vector products of CSM-1B's shapes, in each form the engine can give them, timed alone.

    python benchmarks/gemv_forms.py --json gemv.json                      # on a GPU: bf16, CSM-1B shapes
    python benchmarks/gemv_forms.py --shapes 64x256 --device cpu          # a smoke run

A decoding frame is bound by reading weights, so each product's effective bandwidth (weight bytes / time) says how
close it is to the memory floor. Forms, for y = x @ W.T with W [N, K]:
- `matmul`: F.linear (cuBLAS on CUDA), what `--gemv matmul` runs;
- `sum`: multiply + float32 sum over K, compiled by Inductor, what `--gemv inductor` runs;
- `sum/C`: the same summed in chunks of C inputs, then over the chunks (SumLinear.chunk: split-K);
- `sum+cdt`: `sum` compiled with Inductor's coordinate-descent tuning of the kernel's block sizes;
- `silu ...`: the MLP down projection's real input, silu(gate) * up from a [1, 2K] gate/up vector, in the form
  named after it (Inductor fuses the gate into the product's loads).
The weights of each timing cycle through copies totalling over 256 MB, so the product reads them from memory, not
from the GPU's 50 MB L2 cache, as a decoding step does. On a CPU the timings are only a check that every form runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from csm.quantize import _multiply_sum  # noqa: E402

# (name, N, K): CSM-1B's decoding products (the fused layouts: q/k/v and gate/up as one matrix each)
SHAPES = [("decoder down", 1024, 8192), ("decoder gate/up", 16384, 1024), ("decoder qkv", 1536, 1024),
          ("backbone down", 2048, 8192), ("backbone gate/up", 16384, 2048), ("backbone qkv", 3072, 2048)]
FORMS = ["matmul", "sum", "sum/512", "sum/1024", "sum/2048", "sum+cdt", "silu sum", "silu sum/1024"]


def product(form: str):
    """The function for a form: (x [1, K] or gate/up [1, 2K], W [N, K]) -> [1, N] in x's dtype."""
    silu, _, form = form.rpartition(" ")
    chunk = int(form.partition("/")[2] or 0)

    def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if silu:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        if form == "matmul":
            return F.linear(x, w)
        return _multiply_sum(x, w, chunk or None).to(x.dtype)  # the engine's own form (SumLinear)

    return fn if form == "matmul" else torch.compile(fn, fullgraph=True, dynamic=False)


def time_form(form: str, n: int, k: int, device: torch.device, dtype: torch.dtype, calls: int) -> dict:
    """Mean time of one product over `calls`, cycling through enough weight copies to miss the L2 cache."""
    copies = max(1, min(64, (256 << 20) // (n * k * dtype.itemsize) + 1)) if device.type == "cuda" else 1
    ws = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(copies)]
    x = torch.randn(1, 2 * k if form.startswith("silu") else k, device=device, dtype=dtype)
    torch._dynamo.reset()  # every form compiles the same inner function: keep its recompile count at zero
    fn = product(form)
    if form.endswith("+cdt"):
        import torch._inductor.config as inductor_config

        with inductor_config.patch(coordinate_descent_tuning=True):
            fn(x, ws[0])  # compiles (and tunes) now
    ref = product("silu matmul" if form.startswith("silu") else "matmul")
    err = (fn(x, ws[0]).float() - ref(x, ws[0]).float()).abs().max().item()
    for i in range(3):
        fn(x, ws[i % copies])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for i in range(calls):
        fn(x, ws[i % copies])
    sync()
    us = (time.perf_counter() - t) / calls * 1e6
    return {"form": form, "n": n, "k": k, "us": us, "gb_per_s": n * k * dtype.itemsize / us / 1e3, "max_abs_err": err}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--shapes", default=None,
                   help="comma-separated shape names (as in SHAPES) or NxK sizes (default: all of SHAPES)")
    p.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated, of: {', '.join(FORMS)}")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    named = {name: (name, n, k) for name, n, k in SHAPES}
    shapes = SHAPES
    if args.shapes:
        try:
            shapes = [named.get(s) or (s, *map(int, s.split("x"))) for s in args.shapes.split(",")]
        except ValueError:
            p.error(f"--shapes takes names from {list(named)} or NxK sizes, got {args.shapes!r}")
    forms = args.forms.split(",")
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        p.error(f"unknown forms {unknown}; choose from {FORMS}")
    rows = []
    with torch.inference_mode():
        for name, n, k in shapes:
            for form in forms:
                if form.startswith("silu") and name in named and "down" not in name:
                    continue  # the gated input only feeds the down projections
                r = {"shape": name, **time_form(form, n, k, device, dtype, args.calls)}
                rows.append(r)
                print(f"{name:>18} {n:>6}x{k:<5} {form:>14}: {r['us']:8.2f} us  {r['gb_per_s']:7.1f} GB/s  "
                      f"(max |diff| vs matmul {r['max_abs_err']:.2e})", flush=True)
    if args.json:
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        Path(args.json).write_text(json.dumps({"device": device_name, "torch": torch.__version__,
                                               "dtype": str(dtype).removeprefix("torch."), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
