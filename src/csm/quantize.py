"""Int8 weight-only quantization of the transformer linears, for memory-bound decoding.

Each frame reads every decoder weight 31 times and every backbone weight once, one token at a time: on a CPU (and
at batch 1 on a GPU) that is bound by memory traffic, not arithmetic. Storing the linear weights as int8 with one
scale per output row quarters that traffic; activations run in bf16 through PyTorch's int8 weight-pack matmul.
Embeddings, the codebook heads and norms stay in the model's dtype. Outputs are close to, not identical with, the full-precision
model, so parity tests run unquantized.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.weight, self.scale)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale.float()[:, None]


def quantize_int8(model: CSM) -> CSM:
    """Replace every linear of the backbone and decoder blocks, and the 2048->1024 projection that runs at every
    decoder step, with an Int8Linear, in place."""
    if model.audio_head.device.type == "cuda":
        # PyTorch's CUDA kernel for this op is a plain one: ~110 us per matrix-vector product at CSM-1B's shapes.
        warnings.warn("int8 weight-only quantization is for CPUs: on CUDA PyTorch's int8 kernel is ~9x slower than "
                      "bf16 (H100, compiled CSM-1B: 72.8 vs 8.1 ms/frame)", stacklevel=2)
    for stack in (model.backbone, model.decoder):
        for block in stack.layers:
            for parent in (block.attn, block.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(parent, name, Int8Linear(child))
    model.projection = Int8Linear(model.projection)
    return model
