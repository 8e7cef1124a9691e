"""The codec in training: `csm.mimi.Mimi` itself, with a training-mode twin of its quantizer.

- EMA codebooks in Mimi's own layout: per codebook `embed_sum` [K, d] and `cluster_usage` [K], the codebook being
  `embed_sum / cluster_usage.clamp(1e-5)`, updated by exponential moving averages of the residuals assigned to each
  code (no gradient), with dead-code replacement, initialised from the first batch.
- Straight-through estimator per RVQ, a commitment loss on every level, quantizer dropout and unquantized clips
  (train/codec.py's docstring says why).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..mimi import Mimi, MimiConfig
from ..mimi.quantizer import RVQ

if TYPE_CHECKING:
    from .codec import CodecTrainConfig

_EPS = 1e-5


class EMACodebooks(nn.Module):
    """The EMA state of one RVQ's codebooks, in Mimi's layout: embed_sum [n, K, d], cluster_usage [n, K]."""

    def __init__(self, num_codebooks: int, codebook_size: int, dim: int):
        super().__init__()
        self.register_buffer("embed_sum", torch.zeros(num_codebooks, codebook_size, dim))
        self.register_buffer("cluster_usage", torch.zeros(num_codebooks, codebook_size))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def codebook(self, i: int) -> Tensor:
        return self.embed_sum[i] / self.cluster_usage[i].clamp(min=_EPS)[:, None]

    def codebooks(self) -> Tensor:
        return self.embed_sum / self.cluster_usage.clamp(min=_EPS)[..., None]

    @torch.no_grad()
    def init_from(self, i: int, vectors: Tensor) -> None:
        """Codebook i := random vectors of the batch (with replacement if there are fewer than K, plus a little noise
        so that duplicates can separate), each with the usage it would have if all codes were used equally
        (N / K per step): unused codes then fall under the dead-code threshold after ~ln(1 / ratio) / (1 - decay)
        steps (230 for 0.1 and 0.99) and get replaced."""
        K = self.embed_sum.shape[1]
        if len(vectors) < K:
            pick = torch.randint(0, len(vectors), (K,), device=vectors.device)
            new = vectors[pick] + 0.01 * vectors.std() * torch.randn(K, vectors.shape[1], device=vectors.device)
        else:
            new = vectors[torch.randperm(len(vectors), device=vectors.device)[:K]]
        usage = len(vectors) / K
        self.embed_sum[i] = new * usage
        self.cluster_usage[i] = usage

    @torch.no_grad()
    def update(self, i: int, vectors: Tensor, idx: Tensor, decay: float, dead_ratio: float) -> int:
        """EMA update of codebook i with `vectors` [N, d] assigned to `idx` [N]; then replace dead codes.
        Returns the number of codes replaced."""
        K = self.embed_sum.shape[1]
        counts = torch.bincount(idx, minlength=K).to(vectors.dtype)
        sums = torch.zeros_like(self.embed_sum[i]).index_add_(0, idx, vectors)
        self.cluster_usage[i].lerp_(counts, 1 - decay)
        self.embed_sum[i].lerp_(sums, 1 - decay)
        if dead_ratio <= 0:
            return 0
        usage = self.cluster_usage[i]
        mean = usage.sum() / K
        dead = usage < dead_ratio * mean
        n_dead = int(dead.sum())
        if n_dead:
            new = vectors[torch.randint(0, len(vectors), (K,), device=vectors.device)]
            # A replaced code gets the mean usage (moshi: replaced_usage_ratio = 1), centred on a batch residual.
            self.embed_sum[i] = torch.where(dead[:, None], new * mean, self.embed_sum[i])
            self.cluster_usage[i] = torch.where(dead, mean, usage)
        return n_dead


def _nearest(x: Tensor, codebook: Tensor) -> Tensor:
    # |x|^2 - 2 x.c + |c|^2; argmin over codes (the same ordering as cdist up to ties)
    d = (codebook * codebook).sum(-1)[None, :] - 2 * x @ codebook.t()
    return d.argmin(dim=-1)


def quantize_train(rvq: RVQ, books: EMACodebooks, latent: Tensor, keep: Tensor, cfg: CodecTrainConfig,
                   update: bool = True) -> tuple[Tensor, Tensor, Tensor, int]:
    """One RVQ in training mode. latent [B, dim, F]; keep [B, n] bool: which codebooks each clip uses.

    -> (dequantized latent [B, dim, F] with straight-through gradients, commitment loss, codes [B, n, F],
        number of dead codes replaced)."""
    B, _, T = latent.shape
    x = rvq.input_proj(latent).transpose(1, 2)  # [B, F, d]
    d = x.shape[-1]
    flat = x.reshape(B * T, d)
    residual = flat
    quantized = torch.zeros_like(flat)
    commit = flat.new_zeros(())
    codes, replaced = [], 0
    for i in range(books.embed_sum.shape[0]):
        if update and not bool(books.initialized):
            books.init_from(i, residual.detach().float())
        cb = books.codebook(i)
        idx = _nearest(residual.detach().float(), cb)
        q = F.embedding(idx, cb).to(flat.dtype)
        commit = commit + F.mse_loss(residual, q.detach())
        mask = keep[:, i].repeat_interleave(T)[:, None].to(flat.dtype)
        quantized = quantized + q * mask
        if update:
            replaced += books.update(i, residual.detach().float(), idx, cfg.ema_decay, cfg.dead_code_ratio)
        residual = residual - q.detach()
        codes.append(idx.view(B, T))
    if update:
        books.initialized.fill_(True)
    st = flat + (quantized - flat).detach()  # straight-through
    out = rvq.output_proj(st.view(B, T, d).transpose(1, 2))
    return out, commit, torch.stack(codes, dim=1), replaced



class CodecModel(nn.Module):
    """Mimi plus the EMA state of its codebooks: the trainable codec."""

    def __init__(self, mimi_cfg: MimiConfig):
        super().__init__()
        self.mimi = Mimi(mimi_cfg)
        self.semantic_books = EMACodebooks(mimi_cfg.num_semantic, mimi_cfg.codebook_size, mimi_cfg.codebook_dim)
        self.acoustic_books = EMACodebooks(mimi_cfg.num_codebooks - mimi_cfg.num_semantic, mimi_cfg.codebook_size,
                                           mimi_cfg.codebook_dim)

    @property
    def cfg(self) -> MimiConfig:
        return self.mimi.cfg

    def forward(self, wav: Tensor, num_used: Tensor, quantize: Tensor, cfg: CodecTrainConfig,
                update: bool = True) -> dict[str, Tensor]:
        """wav [B, 1, T] (T a multiple of the frame size); num_used [B] codebooks per clip; quantize [B] bool."""
        c = self.cfg
        latent = self.mimi.encode_latent(wav)
        k = torch.arange(c.num_codebooks, device=wav.device)[None, :] < num_used[:, None]  # [B, K]
        q_sem, commit_s, codes_s, rep_s = quantize_train(self.mimi.quantizer.semantic, self.semantic_books, latent,
                                                         k[:, : c.num_semantic], cfg, update)
        q_ac, commit_a, codes_a, rep_a = quantize_train(self.mimi.quantizer.acoustic, self.acoustic_books, latent,
                                                        k[:, c.num_semantic:], cfg, update)
        q = q_sem + q_ac
        q = torch.where(quantize[:, None, None], q, latent)
        recon = self.mimi.decode_latent(q)
        return {"recon": recon, "commit": (commit_s + commit_a) / c.num_codebooks,
                "codes": torch.cat([codes_s, codes_a], dim=1), "replaced": torch.tensor(rep_s + rep_a)}

    def freeze_encoder_side(self) -> None:
        """Freeze everything up to and including the quantizer: codes stay exactly what they were."""
        m = self.mimi
        for module in (m.encoder, m.encoder_transformer, m.downsample, m.quantizer):
            module.requires_grad_(False)

    def forward_decoder_only(self, wav: Tensor, num_codebooks: int | None = None) -> dict[str, Tensor]:
        """The inference condition: frozen codes from the first `num_codebooks` (all) -> the trainable decoder side."""
        with torch.no_grad():
            codes = self.mimi.quantizer.encode(self.mimi.encode_latent(wav))[:, :num_codebooks]
        return self.forward_codes(codes)

    def forward_codes(self, codes: Tensor) -> dict[str, Tensor]:
        """Given codes [B, K, F] (frozen quantizer) -> the trainable decoder side's audio."""
        with torch.no_grad():
            latent = self.mimi.quantizer.decode(codes)
        recon = self.mimi.decode_latent(latent)
        return {"recon": recon, "commit": recon.new_zeros(()), "replaced": torch.tensor(0)}

    @torch.no_grad()
    def sync_codebooks(self) -> None:
        """Copy the EMA codebooks into the Mimi's inference buffers (before encode/decode or saving)."""
        self.mimi.quantizer.semantic.codebooks.copy_(self.semantic_books.codebooks())
        self.mimi.quantizer.acoustic.codebooks.copy_(self.acoustic_books.codebooks())

    def export_state_dict(self) -> dict[str, Tensor]:
        """transformers `MimiModel` layout (what `csm.mimi.load_mimi` reads), codebooks as embed_sum/cluster_usage."""
        sd = {k: v.detach().cpu().contiguous() for k, v in self.mimi.state_dict().items()
              if not k.endswith(".codebooks")}
        renamed = {}
        for k, v in sd.items():
            for ours, theirs in (("quantizer.semantic.", "quantizer.semantic_residual_vector_quantizer."),
                                 ("quantizer.acoustic.", "quantizer.acoustic_residual_vector_quantizer.")):
                if k.startswith(ours):
                    k = theirs + k[len(ours):]
            renamed[k] = v
        for name, books in (("semantic", self.semantic_books), ("acoustic", self.acoustic_books)):
            for i in range(books.embed_sum.shape[0]):
                prefix = f"quantizer.{name}_residual_vector_quantizer.layers.{i}.codebook."
                renamed[prefix + "embed_sum"] = books.embed_sum[i].detach().cpu().contiguous()
                renamed[prefix + "cluster_usage"] = books.cluster_usage[i].detach().cpu().contiguous()
        return renamed

    def load_export(self, sd: dict[str, Tensor]) -> None:
        """Inverse of export_state_dict (exact: used by --resume)."""
        from ..mimi.weights import convert_state_dict

        c = self.cfg
        for name, books, n in (("semantic", self.semantic_books, c.num_semantic),
                               ("acoustic", self.acoustic_books, c.num_codebooks - c.num_semantic)):
            with torch.no_grad():
                for i in range(n):
                    prefix = f"quantizer.{name}_residual_vector_quantizer.layers.{i}.codebook."
                    books.embed_sum[i].copy_(sd[prefix + "embed_sum"])
                    books.cluster_usage[i].copy_(sd[prefix + "cluster_usage"])
                books.initialized.fill_(True)
        self.mimi.load_state_dict(convert_state_dict(dict(sd), c), strict=True)
        self.sync_codebooks()

    def load_codec(self, sd: dict[str, Tensor]) -> None:
        """Start from a codec in any layout `load_mimi` reads, e.g. a packaged one (`save_mimi`, float16) that kept
        the codebooks but not their EMA statistics: each code then starts with usage 1 (embed_sum = the code)."""
        if any(k.endswith(".embed_sum") for k in sd):
            return self.load_export(sd)
        from ..mimi.weights import convert_state_dict

        state = convert_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, self.cfg)
        self.mimi.load_state_dict(state, strict=True)
        with torch.no_grad():
            for books, rvq in ((self.semantic_books, self.mimi.quantizer.semantic),
                               (self.acoustic_books, self.mimi.quantizer.acoustic)):
                books.embed_sum.copy_(rvq.codebooks)
                books.cluster_usage.fill_(1.0)
                books.initialized.fill_(True)
