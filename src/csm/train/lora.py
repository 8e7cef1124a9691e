"""LoRA: train a low-rank update W + (alpha / r) * B @ A of the attention and MLP weights, the rest frozen.

LoRALinear subclasses nn.Linear and keeps the base weight under the same key, so a LoRA model's state dict is the
plain model's plus `*.lora_a` / `*.lora_b`; `merge_state_dict` folds the updates back into plain weights that
csm.checkpoints saves and loads like any CSM.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w2", "mlp.w3")
HEADS = ("codebook0_head.weight", "audio_head")
STACKS = ("backbone", "decoder")
_GROUPS = {"attn": TARGETS[:4], "mlp": TARGETS[4:], "all": TARGETS}


def parse_targets(spec: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """"all" / "attn,mlp" / "decoder:all" / "backbone:attn.wq,attn.wv" -> (stacks, linears) to adapt. A stack
    prefix limits the adapters to the backbone or the decoder (default: both)."""
    stacks, _, names = spec.rpartition(":")
    stacks = tuple(s for s in stacks.split("+") if s) or STACKS
    linears: list[str] = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        linears += _GROUPS.get(name, (name,))
    bad = [s for s in stacks if s not in STACKS] + [t for t in linears if t not in TARGETS]
    if bad or not linears:
        raise ValueError(f"bad LoRA targets {spec!r}: use [backbone|decoder|backbone+decoder:]attn,mlp,all or "
                         f"linears among {', '.join(TARGETS)}")
    return stacks, tuple(dict.fromkeys(linears))


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same (frozen) parameters, same state-dict keys
        self.scale = alpha / rank
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # B = 0: training starts from the base model exactly
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, train_heads: bool = False,
               targets: str = "all") -> int:
    """Wrap the `targets` linears (see parse_targets; default: every attention and MLP linear of backbone and
    decoder) in place and freeze everything but the adapters (and the output heads if `train_heads`). Returns the
    number of trainable parameters."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    stacks, linears = parse_targets(targets)
    for stack in (getattr(model, name) for name in stacks):
        for block in stack.layers:
            if block.attn.fused or block.mlp.fused:
                raise ValueError("this model's projections were fused for inference (a Generator does that); "
                                 "apply LoRA to a freshly loaded model")
            for target in linears:
                parent_name, name = target.split(".")
                parent = getattr(block, parent_name)
                setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, dropout))
    for key, p in model.named_parameters():
        p.requires_grad_(".lora_" in key or (train_heads and key in HEADS))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What LoRA training changed: the adapters and any trained heads (everything with requires_grad)."""
    return {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}


def merge_state_dict(state_dict: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A LoRA model's state dict -> the plain CSM state dict with W + scale * B @ A (computed in float32)."""
    out = {k: v for k, v in state_dict.items() if ".lora_" not in k}
    for key in state_dict:
        if key.endswith(".lora_a"):
            prefix = key[: -len("lora_a")]
            w = out[prefix + "weight"]
            delta = state_dict[prefix + "lora_b"].float() @ state_dict[key].float()
            out[prefix + "weight"] = (w.float() + scale * delta).to(w.dtype)
    return out
