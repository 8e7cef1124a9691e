"""Split residual vector quantizer: `num_semantic` codebooks (distilled from WavLM in training) then acoustic ones.

Each of the two RVQs projects the 512-d latent to its own 256-d space (1x1 conv, no bias), quantizes it residually
by nearest centroid, and projects the sum of its centroids back; the decoded latent is the sum of both RVQs.
Codebooks are stored ready to use (`embed_sum / cluster_usage`, computed once when the weights are loaded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MimiConfig


class RVQ(nn.Module):
    def __init__(self, cfg: MimiConfig, num_codebooks: int):
        super().__init__()
        self.input_proj = nn.Conv1d(cfg.dim, cfg.codebook_dim, 1, bias=False)
        self.output_proj = nn.Conv1d(cfg.codebook_dim, cfg.dim, 1, bias=False)
        self.register_buffer("codebooks", torch.zeros(num_codebooks, cfg.codebook_size, cfg.codebook_dim))

    def encode(self, latent: Tensor, n: int) -> Tensor:
        """[B, dim, F] -> [B, n, F] codes."""
        B, _, T = latent.shape
        # Same flattening and float32 `cdist` as the reference, so ties resolve identically.
        residual = self.input_proj(latent).transpose(1, 2).reshape(B * T, -1).float()
        codes = []
        for cb in self.codebooks[:n].float():
            idx = torch.cdist(residual[None], cb[None], p=2)[0].argmin(dim=-1)
            residual = residual - F.embedding(idx, cb)
            codes.append(idx.view(B, T))
        return torch.stack(codes, dim=1)

    def decode(self, codes: Tensor) -> Tensor:
        """[B, n, F] codes -> [B, dim, F]."""
        n = codes.shape[1]
        idx = torch.arange(n, device=codes.device)[None, :, None]
        q = self.codebooks[idx, codes].sum(dim=1)  # [B, F, codebook_dim]
        return self.output_proj(q.transpose(1, 2))


class SplitRVQ(nn.Module):
    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.num_codebooks, self.num_semantic = cfg.num_codebooks, cfg.num_semantic
        self.semantic = RVQ(cfg, cfg.num_semantic)
        self.acoustic = RVQ(cfg, cfg.num_codebooks - cfg.num_semantic)

    def _check(self, n: int) -> None:
        if not self.num_semantic <= n <= self.num_codebooks:
            raise ValueError(f"number of codebooks must be in [{self.num_semantic}, {self.num_codebooks}], got {n}")

    def encode(self, latent: Tensor, n: int | None = None) -> Tensor:
        n = self.num_codebooks if n is None else n
        self._check(n)
        codes = self.semantic.encode(latent, self.num_semantic)
        if n > self.num_semantic:
            codes = torch.cat([codes, self.acoustic.encode(latent, n - self.num_semantic)], dim=1)
        return codes

    def decode(self, codes: Tensor) -> Tensor:
        """[B, n, F] -> [B, dim, F]; fewer than all codebooks decodes a coarser latent (the first n are used)."""
        self._check(codes.shape[1])
        latent = self.semantic.decode(codes[:, : self.num_semantic])
        if codes.shape[1] > self.num_semantic:
            latent = latent + self.acoustic.decode(codes[:, self.num_semantic:])
        return latent
