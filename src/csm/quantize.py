"""Other forms of the transformer linears, for memory-bound decoding: int8 weights, and GEMVs written by Inductor.

Each frame reads every decoder weight 31 times and every backbone weight once, one token at a time: on a CPU (and
at batch 1 on a GPU) that is bound by memory traffic, not arithmetic.

- `quantize_int8`: the linear weights stored as int8 with one scale per output row, a quarter of fp32's traffic (half
  of bf16's). On a CPU activations run in bf16 through PyTorch's int8 weight-pack matmul; on CUDA that kernel is slow
  (72.8 ms/frame on an H100), so the CUDA form is the multiply-and-sum below, reading the int8 weight directly
  (7.45 ms/frame compiled, against 8.13 for bf16 through cuBLAS). Outputs are close to, not identical with, the
  full-precision model, so parity tests run unquantized.
- `inductor_gemv`: bf16/fp32 weights kept, but a one- or two-token product written as multiply + sum over the input
  dimension. Under the `compile` engine Inductor then writes the matrix-vector kernel itself and fuses the RMSNorm and
  residual add before it, or the SiLU gate, into it: 1,775 kernels per frame instead of 2,047, 7.33 ms/frame instead
  of 8.13 on an H100 (benchmarks/results/h100-2026-11-27b). Same maths, different summation order.

Embeddings, the codebook heads and norms are left alone. Longer inputs (prefill) use an ordinary matmul.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import CSM


class Int8Linear(nn.Module):
    """y = x @ (scale * w_int8).T, with symmetric per-row scales."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear supports bias-free linears only (CSM has no biases)")
        w = linear.weight.detach().float()
        # the kernel takes bf16 scales: round them first, so rounding w / scale is against the scale actually used
        scale = (w.abs().amax(dim=1).clamp(min=1e-8) / 127.0).to(torch.bfloat16)
        self.register_buffer("weight", (w / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    chunk: int | None = None  # split-K for the CUDA form: see _multiply_sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if x.is_cuda:
            return int8_matmul_gpu(x, self.weight, self.scale, self.chunk)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.weight, self.scale)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale.float()[:, None]


REDUCE_MAX_ROWS = 2  # the decoder's first step has 2 positions; each extra row re-reads the weight


def _few_rows(x: torch.Tensor) -> bool:
    return x.shape[:-1].numel() <= REDUCE_MAX_ROWS


def _multiply_sum(x: torch.Tensor, weight: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """x @ weight.T as one multiply and a float32 sum over the input dimension: the form Inductor turns into a
    single matrix-vector kernel that reads `weight` once and takes the ops before it as its prologue.

    chunk (None: off): sum the input dimension in chunks of this many, then the chunk sums (split-K). On an H100
    Inductor's kernels for 1,024 inputs run near bandwidth (~2.8 TB/s) but the looped ones for 8,192 at ~1.4; with
    chunks the long products become short ones plus a small sum. An experiment for profile_step.py --gemv-chunk."""
    k = weight.shape[-1]
    if chunk and k > chunk and k % chunk == 0:
        parts = x.unsqueeze(-2).unflatten(-1, (-1, chunk)) * weight.unflatten(-1, (-1, chunk))
        return parts.sum(-1, dtype=torch.float32).sum(-1)
    return (x.unsqueeze(-2) * weight).sum(-1, dtype=torch.float32)


def int8_matmul_gpu(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    chunk: int | None = None) -> torch.Tensor:
    """x @ (scale * weight).T for CUDA. Up to REDUCE_MAX_ROWS input rows (decoding) as multiply + sum, so that a
    compiled step reads each int8 weight once, in one fused kernel; more rows (prefill) through a bf16 matmul."""
    if _few_rows(x):
        return (_multiply_sum(x, weight.to(x.dtype), chunk) * scale.float()).to(x.dtype)
    return F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)


class SumLinear(nn.Linear):
    """nn.Linear (same parameters and keys) whose product for up to REDUCE_MAX_ROWS rows is multiply + sum
    (chunk: see _multiply_sum)."""

    chunk: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _few_rows(x):
            return _multiply_sum(x, self.weight, self.chunk).to(x.dtype)
        return super().forward(x)


def _decode_linears(model: CSM):
    """(parent, name, linear) for every linear of the backbone and decoder blocks, and the 2048->1024 projection
    that runs at every decoder step: the weights a frame reads."""
    for stack in (model.backbone, model.decoder):
        for block in stack.layers:
            for parent in (block.attn, block.mlp):
                for name, child in list(parent.named_children()):
                    yield parent, name, child
    yield model, "projection", model.projection


def quantize_int8(model: CSM) -> CSM:
    """Replace the decode linears (see _decode_linears) with Int8Linear, in place."""
    for parent, name, child in _decode_linears(model):
        if isinstance(child, nn.Linear):
            setattr(parent, name, Int8Linear(child))
    return model


def inductor_gemv(model: CSM) -> CSM:
    """Turn the decode linears into SumLinear, in place (the weights stay the same tensors); for the compile engine."""
    for _, _, child in _decode_linears(model):
        if type(child) is nn.Linear:
            child.__class__ = SumLinear
    return model
