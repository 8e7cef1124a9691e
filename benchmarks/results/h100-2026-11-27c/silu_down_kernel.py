"""The split-K Triton kernel measured in call2_gemv_triton.json: it is not in the package (it was slower).

It replaced the MLP down projection W2 @ (silu(gate) * up) for 1-2 rows: each program gated a block of inputs
once for BLOCK_N output rows, the 8,192 inputs were split 8 ways across programs, and the float32 partial sums came
back as [8, M, N] for a `.sum(0)` by Inductor. It was reached through `torch.library.triton_op` (so torch.compile
and the frame's CUDA graph kept it), with a TritonDownMLP whose forward called `silu_down(self.w13(x), self.w2.weight)`.
On the H100 it ran at 11.9 us per call (140 per frame), no faster than Inductor's kernel that re-gates per row, and
Inductor did not fuse the partial sum into the residual add (68 extra 2.1 us kernels): 8.02 ms/frame vs 7.81.
"""

import torch
import triton
import triton.language as tl

SPLIT_K = 8

_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
    for bn, bk, w in [(8, 256, 4), (16, 256, 4), (16, 128, 4), (32, 128, 4), (16, 512, 8), (32, 256, 8), (8, 512, 4),
                      (64, 128, 8)]
]


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _silu_down_kernel(gu_ptr, w_ptr, out_ptr, M, N, K, M_PAD: tl.constexpr, PER_SPLIT: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, M_PAD)
    row_ok = rm[:, None] < M
    start = pid_s * PER_SPLIT
    acc = tl.zeros([M_PAD, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, PER_SPLIT, BLOCK_K):
        rk = start + k0 + tl.arange(0, BLOCK_K)
        k_ok = (rk[None, :] < start + PER_SPLIT) & (rk[None, :] < K)
        act = gu_ptr + rm[:, None] * (2 * K) + rk[None, :]
        gate = tl.load(act, mask=row_ok & k_ok, other=0.0).to(tl.float32)
        up = tl.load(act + K, mask=row_ok & k_ok, other=0.0).to(tl.float32)
        silu = (gate * tl.sigmoid(gate)).to(gu_ptr.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)
        h = (silu * up).to(gu_ptr.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & k_ok, other=0.0).to(tl.float32)
        acc += h[:, None, :] * w[None, :, :]
    out = tl.sum(acc, axis=2)
    tl.store(out_ptr + pid_s * M * N + rm[:, None] * N + rn[None, :], out, mask=row_ok & (rn[None, :] < N))


@torch.library.triton_op("csm::silu_down_partials", mutates_args={})
def silu_down_partials(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    m, n, k = gate_up.shape[0], weight.shape[0], weight.shape[1]
    out = torch.empty((SPLIT_K, m, n), device=gate_up.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), SPLIT_K)  # noqa: E731
    torch.library.wrap_triton(_silu_down_kernel)[grid](gate_up, weight, out, m, n, k,
                                                       M_PAD=triton.next_power_of_2(m), PER_SPLIT=triton.cdiv(k, SPLIT_K))
    return out
