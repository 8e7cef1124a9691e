"""Mimi's encoder/decoder transformer: pre-norm LayerNorm blocks, RoPE, sliding-window causal attention, layer scale.

It runs at the SEANet rate (25 Hz, two steps per code frame). Attention sees the last `context` steps (250 = 10 s),
the query itself included. Streaming keeps a fixed-size KV cache of exactly those `context` past steps: new keys are
attended together with the cache, then the cache rolls forward. This reproduces the one-shot sliding window exactly
(moshi's ring cache of `context` slots drops one key for the first step of each chunk once full; we do not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MimiConfig


@dataclass
class KVCache:
    k: Tensor  # [layers, B, heads, context, head_dim], oldest first; post-RoPE keys
    v: Tensor
    pos: Tensor  # 0-dim long: steps seen so far (absolute position of the next step)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), 0.01))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x


class Attention(nn.Module):
    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        # Separate q/k/v in transformers' (rotate-half) RoPE order; Kyutai's fused, interleaved in_proj is converted.
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, window: int,
                cache: tuple[Tensor, Tensor] | None = None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            ck, cv = cache
            k, v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
            ck.copy_(k[:, :, T:])  # keep the newest `context` keys
            cv.copy_(v[:, :, T:])
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:  # long one-shot input: query blocks against their window only, O(T * window) memory, not O(T^2)
            blocks = []
            for start in range(0, T, ATTN_BLOCK):
                end, first_key = min(T, start + ATTN_BLOCK), max(0, start - window + 1)
                mask = window_mask(start, end, first_key, end, window, x.device)
                blocks.append(F.scaled_dot_product_attention(
                    q[:, :, start:end], k[:, :, first_key:end], v[:, :, first_key:end], attn_mask=mask))
            y = torch.cat(blocks, dim=2)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


ATTN_BLOCK = 512  # one-shot sequences longer than this attend block by block


def window_mask(q0: int, q1: int, k0: int, k1: int, window: int, device: torch.device) -> Tensor:
    """Sliding-window causal mask for query positions [q0, q1) and key positions [k0, k1)."""
    delta = torch.arange(q0, q1, device=device)[:, None] - torch.arange(k0, k1, device=device)[None, :]
    return (delta >= 0) & (delta < window)


class MLP(nn.Module):
    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.self_attn_layer_scale = LayerScale(cfg.dim)
        self.post_attention_layernorm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.mlp_layer_scale = LayerScale(cfg.dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, window: int, cache=None) -> Tensor:
        x = x + self.self_attn_layer_scale(self.self_attn(self.input_layernorm(x), cos, sin, mask, window, cache))
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    """[B, T, dim] -> [B, T, dim]."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg.num_layers)])

    def _rope(self, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # Recomputed per call (a few dozen numbers) rather than a buffer, so models built on `meta` need no fix-up.
        d = self.cfg.head_dim
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float, device=pos.device) / d))
        freqs = pos.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        c = self.cfg
        shape = (c.num_layers, batch, c.num_heads, c.context, c.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                       torch.zeros((), dtype=torch.long, device=device))

    def forward(self, x: Tensor, state: KVCache | None = None) -> Tensor:
        T, W = x.shape[1], self.cfg.context
        steps = torch.arange(T, device=x.device)
        if state is None:
            q_pos = steps
            mask = window_mask(0, T, 0, T, W, x.device) if T <= ATTN_BLOCK else None
        else:  # keys: the cache (positions pos-W .. pos-1, not yet written when negative) then the T new steps
            q_pos = state.pos + steps
            k_pos = torch.cat([state.pos - W + torch.arange(W, device=x.device), q_pos])
            delta = q_pos[:, None] - k_pos[None, :]
            mask = (delta >= 0) & (delta < W) & (k_pos[None, :] >= 0)
        cos, sin = self._rope(q_pos, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, W, None if state is None else (state.k[i], state.v[i]))
        if state is not None:
            state.pos.add_(T)
        return x
