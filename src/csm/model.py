"""The CSM network: a Llama backbone over frames and a small Llama decoder inside each frame.

A frame is 33 columns: 32 Mimi codes and one text token, with a mask of which columns are present. The backbone
reads the masked sum of the column embeddings and predicts codebook 0 of the next frame. The decoder starts from
the backbone's last hidden state and predicts codebooks 1..31 one at a time. Both transformers share one RoPE /
attention / MLP implementation and one KV cache type; sampling and the frame loop live in engine.py.

RoPE uses the "rotate half" pairing (dimension i with i + head_dim/2). Sesame's torchtune checkpoints pair
adjacent dimensions instead; checkpoints.py permutes their q/k projections on load so the maths is identical.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import CSMConfig, TransformerConfig


def rope_inv_freq(cfg: TransformerConfig) -> torch.Tensor:
    """Inverse RoPE frequencies in float32 on the CPU, with Llama 3's long-context scaling when configured."""
    dim = cfg.head_dim
    # On the CPU even inside a `torch.device("meta")` block: meta arange/div run as Python references whose first
    # use imports torch._dynamo (~1.5 s of `csm say`'s start-up).
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    if cfg.rope_scale_factor is None:
        return inv_freq
    factor, low, high, old_ctx = (
        cfg.rope_scale_factor,
        cfg.rope_low_freq_factor,
        cfg.rope_high_freq_factor,
        cfg.rope_original_max_seq_len,
    )
    wavelen = 2 * math.pi / inv_freq
    # Short wavelengths are kept, long ones divided by `factor`, and the band between is interpolated.
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the activation dtype, as the reference does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache(nn.Module):
    """Preallocated keys and values, kv[0] and kv[1] of [B, n_kv_heads, max_seq_len, head_dim], written at explicit
    positions.

    Static shapes keep the step graph-capturable; stale entries never need clearing because attention masks
    every position after the one being written. Keys and values share one buffer so that a step writes both in one
    indexing op (one kernel when compiled, not two). Caches belong to the caller (a generation session), not to the
    model, so one set of weights can serve several sessions at once.
    """

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device) -> None:
        super().__init__()
        shape = (2, batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("kv", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.arange(k.shape[0], device=k.device)[:, None]
        # Indexing [:, b, :, pos] puts the (batch, seq) dims first, then (k/v, head, dim): [2, B, H, S, D] -> that.
        self.kv[:, batch, :, input_pos] = torch.stack([k, v]).permute(1, 3, 0, 2, 4)
        return self.kv[0], self.kv[1]

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over batch rows start..stop-1 that shares this one's memory (a view, no copy): lets a step run
        over only some rows while the others keep their entries."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("kv", self.kv[:, start:stop], persistent=False)
        return view


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.fused = False  # wq/wk/wv merged into one wqkv by fuse()

    def fuse(self) -> None:
        """Inference layout: one matrix-vector product for q, k and v instead of three (fewer kernels per step)."""
        if not self.fused and all(type(m) is nn.Linear for m in (self.wq, self.wk, self.wv)):
            self.wqkv = _concat_linears(self.wq, self.wk, self.wv)
            del self.wq, self.wk, self.wv
            self.fused = True

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_pos: torch.Tensor,
        bias: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        """bias: additive attention mask [B, 1, S, L] over the first L cache positions (0 or -inf), or None for
        causal attention over x alone."""
        b, s, _ = x.shape
        if self.fused:
            kv = self.n_kv_heads * self.head_dim
            q, k, v = self.wqkv(x).split([self.n_heads * self.head_dim, kv, kv], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.reshape(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(input_pos, k, v)
            if bias is not None:  # attend only to the cache prefix the mask covers
                k, v = k[:, :, : bias.shape[-1]], v[:, :, : bias.shape[-1]]
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=bias,
            is_causal=bias is None,
            enable_gqa=self.n_heads != self.n_kv_heads,
        )
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)  # gate
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)  # down
        self.w3 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)  # up
        self.fused = False  # w1/w3 merged into one w13 by fuse()

    def fuse(self) -> None:
        """Inference layout: gate and up projections as one matrix-vector product."""
        if not self.fused and all(type(m) is nn.Linear for m in (self.w1, self.w3)):
            self.w13 = _concat_linears(self.w1, self.w3)
            del self.w1, self.w3
            self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.w13(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _concat_linears(*linears: nn.Linear) -> nn.Linear:
    """One bias-free linear whose output is the concatenation of `linears`' outputs."""
    w = torch.cat([m.weight.detach() for m in linears])
    fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")  # no init: the weight is replaced next
    fused.weight = nn.Parameter(w, requires_grad=linears[0].weight.requires_grad)  # still trainable if they were
    return fused


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, input_pos, bias, cache):
        x = x + self.attn(self.attn_norm(x), cos, sin, input_pos, bias, cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Embedding-free Llama: takes input vectors, returns final-normed hidden states."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(cfg).to(torch.get_default_device()), persistent=False)
        self.gradient_checkpointing = False

    def reset_buffers(self, device=None) -> None:
        """Recompute non-persistent buffers (after building on the meta device and loading weights)."""
        self.inv_freq = rope_inv_freq(self.cfg).to(device)

    def new_cache(self, batch_size: int, max_seq_len: int | None = None) -> nn.ModuleList:
        """One KVCache per layer, in the weights' dtype and device."""
        ref = self.norm.weight
        length = max_seq_len or self.cfg.max_seq_len
        return nn.ModuleList(
            KVCache(batch_size, length, self.cfg.n_kv_heads, self.cfg.head_dim, ref.dtype, ref.device)
            for _ in self.layers
        )

    def forward(
        self,
        x: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: nn.ModuleList | None = None,
    ) -> torch.Tensor:
        """x: [B, S, dim]; input_pos: [B, S] positions (default 0..S-1); mask: [B, S, L] bool, True = attend.

        Without a cache and a mask the attention is plainly causal over x. With a cache (from `new_cache`), x is
        written at input_pos and `mask` says which of the first L cache positions each query sees (`causal_mask`).
        """
        b, s, _ = x.shape
        if input_pos is None:
            input_pos = torch.arange(s, device=x.device).expand(b, s)
        if cache is not None and mask is None:
            raise ValueError("a cached forward needs an explicit attention mask (see causal_mask)")
        # Positions -> cos/sin in float32, then the activation dtype (as the reference computes them).
        freqs = input_pos[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype)[:, None], emb.sin().to(x.dtype)[:, None]
        # The boolean mask as the additive bias SDPA would make of it, made once here instead of once per layer.
        bias = None
        if mask is not None:
            bias = torch.zeros_like(mask, dtype=x.dtype).masked_fill(~mask, float("-inf"))[:, None]
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache[i]
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, input_pos, bias, layer_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, input_pos, bias, layer_cache)
        return self.norm(x)


def cache_rows(cache: nn.ModuleList, start: int, stop: int) -> nn.ModuleList:
    """Per-layer views (`KVCache.rows`) of a cache from `Transformer.new_cache` over batch rows start..stop-1."""
    return nn.ModuleList(layer.rows(start, stop) for layer in cache)


def causal_mask(input_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[B, S, kv_len] mask letting each query at position p see cache positions 0..p."""
    return torch.arange(kv_len, device=input_pos.device) <= input_pos[..., None]


class CSM(nn.Module):
    def __init__(self, cfg: CSMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        k, va = cfg.audio_num_codebooks, cfg.audio_vocab_size
        bdim, ddim = cfg.backbone.dim, cfg.decoder.dim
        # Tables passed in empty (init_weights fills them): nn.Embedding's own normal_ init is wasted work, and on the
        # meta device (checkpoint loading) its first call imports ~1.5 s of torch internals.
        self.text_embeddings = nn.Embedding(cfg.text_vocab_size, bdim, _weight=torch.empty(cfg.text_vocab_size, bdim))
        # One table for all codebooks; codebook i's ids are offset by i * audio_vocab_size.
        self.audio_embeddings = nn.Embedding(k * va, bdim, _weight=torch.empty(k * va, bdim))
        self.backbone = Transformer(cfg.backbone)
        self.codebook0_head = nn.Linear(bdim, va, bias=False)
        self.projection = nn.Linear(bdim, ddim, bias=False)
        self.decoder = Transformer(cfg.decoder)
        self.audio_head = nn.Parameter(torch.empty(k - 1, ddim, va))
        offsets = torch.arange(k, device="cpu") * va  # on the CPU first, as in rope_inv_freq
        self.register_buffer("audio_offsets", offsets.to(torch.get_default_device()), persistent=False)
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) weights, unit norms. Nothing to do on the meta device (weights are loaded after)."""
        if self.audio_head.is_meta:
            return
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    # --- embeddings -------------------------------------------------------------------------------------
    def embed_frames(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens, mask: [B, S, K+1] (K audio codes then the text token) -> summed embeddings [B, S, dim]."""
        audio = self.audio_embeddings(tokens[..., :-1] + self.audio_offsets)
        text = self.text_embeddings(tokens[..., -1:])
        embeds = torch.cat([audio, text], dim=-2) * mask[..., None].to(audio.dtype)
        return embeds.sum(dim=-2)

    def embed_audio(self, codebook: int | torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Embedding of codebook `codebook` ids `tokens` (any shape) in the backbone's space."""
        return self.audio_embeddings(tokens + codebook * self.cfg.audio_vocab_size)

    # --- backbone ---------------------------------------------------------------------------------------
    def backbone_forward(
        self,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cache: nn.ModuleList | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames [B, S, K+1] -> (hidden [B, S, dim], codebook-0 logits [B, S, audio_vocab])."""
        h = self.backbone(self.embed_frames(tokens, mask), input_pos, attn_mask, cache)
        return h, self.codebook0_head(h)

    # --- decoder ----------------------------------------------------------------------------------------
    def decoder_logits(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced decoder over whole frames (training and parity checks; no cache).

        h: backbone hidden state that predicted each frame [N, dim]; codes: the frame's codes [N, K].
        The decoder reads [h, c0, ..., c_{K-2}] and returns logits for c1..c_{K-1}: [N, K-1, audio_vocab].
        """
        k = self.cfg.audio_num_codebooks
        inputs = torch.cat([h[:, None], self.embed_audio_codes(codes[:, : k - 1])], dim=1)
        out = self.decoder(self.projection(inputs))
        return torch.einsum("nkd,kdv->nkv", out[:, 1:], self.audio_head)

    def embed_audio_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """[..., n] ids of codebooks 0..n-1 -> [..., n, dim]."""
        return self.audio_embeddings(codes + self.audio_offsets[: codes.shape[-1]])

    def reset_buffers(self, device=None) -> None:
        self.backbone.reset_buffers(device)
        self.decoder.reset_buffers(device)
        k, va = self.cfg.audio_num_codebooks, self.cfg.audio_vocab_size
        self.audio_offsets = torch.arange(k, device=device) * va

    def fuse_projections(self) -> CSM:
        """Merge q/k/v and gate/up projections for inference, in place (Generator does this). Same maths;
        checkpoints.convert_from_ours (so save_checkpoint) splits them back into the usual keys. LoRA-wrapped or
        already-quantized projections are left as they are."""
        for stack in (self.backbone, self.decoder):
            for block in stack.layers:
                block.attn.fuse()
                block.mlp.fuse()
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
