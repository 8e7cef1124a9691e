"""Independent reference implementations used by the parity tests (never imported by the library).

- transformers' CsmForConditionalGeneration, built from a config written here with transformers' own names;
- a Sesame-style model assembled from torchtune's Llama-3.2 builder, as the original release does
  (identity token embeddings and output head, masked sum of frame embeddings, adjacent-pair RoPE).
"""

from __future__ import annotations

import torch
import torch.nn as nn

TINY_TEXT_VOCAB = 300
TINY_HF = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    text_vocab_size=TINY_TEXT_VOCAB,
    vocab_size=2051,
    num_codebooks=32,
)
TINY_HF_DECODER = dict(
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    max_position_embeddings=33,
    backbone_hidden_size=64,
    vocab_size=2051,
    num_codebooks=32,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
TINY_MIMI = dict(
    hidden_size=32,
    num_filters=4,
    codebook_dim=16,
    vector_quantization_hidden_dimension=16,
    num_hidden_layers=1,
    intermediate_size=32,
    num_attention_heads=2,
    num_key_value_heads=2,
    upsample_groups=32,
)


def transformers_csm(seed: int = 0, rope: dict | None = LLAMA3_ROPE, **overrides):
    """A random-weight CsmForConditionalGeneration in fp32, eval mode."""
    from transformers import CsmConfig, CsmDepthDecoderConfig, MimiConfig

    from transformers import CsmForConditionalGeneration

    torch.manual_seed(seed)
    rope_kw = {"rope_parameters": dict(rope)} if rope else {}
    dec = CsmDepthDecoderConfig(**TINY_HF_DECODER, **rope_kw)
    cfg = CsmConfig(
        **{**TINY_HF, **overrides},
        **rope_kw,
        depth_decoder_config=dec.to_dict(),
        codec_config=MimiConfig(**TINY_MIMI).to_dict(),
    )
    model = CsmForConditionalGeneration(cfg).eval()
    # transformers initialises the codebook heads and embeddings at std 0.02; scale them up so that the
    # logits are far from uniform and a greedy argmax is not decided by rounding noise.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0) if p.dim() > 1 else None
        # CSM has one audio embedding table; transformers versions that keep a separate depth-decoder copy must
        # hold the same values in it.
        shared = model.backbone_model.embed_tokens.embed_audio_tokens.weight
        copy = model.depth_decoder.model.embed_tokens.weight
        if copy.data_ptr() != shared.data_ptr():
            copy.copy_(shared)
    return model


def hf_embed_frames(model, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Embed CSM frames [B, S, 33] with transformers' own modules: text frames via embed_text_tokens, audio
    frames via the backbone's codebook embeddings (which sum the 32 codes)."""
    is_text = mask[..., -1]
    text = model.embed_text_tokens(tokens[..., -1])
    audio = model.backbone_model.embed_tokens(tokens[..., :-1])
    return torch.where(is_text[..., None], text, audio)


# --- Sesame reference on torchtune ----------------------------------------------------------------------------


class SesameReference(nn.Module):
    """The original CSM forward pass, assembled from torchtune blocks with the original parameter names."""

    def __init__(self, backbone_kw: dict, decoder_kw: dict, text_vocab: int, audio_vocab: int, codebooks: int):
        super().__init__()
        from torchtune.models.llama3_2 import llama3_2

        def build(kw):
            m = llama3_2(vocab_size=text_vocab, rope_base=500_000, scale_factor=32, **kw)
            m.tok_embeddings, m.output = nn.Identity(), nn.Identity()
            return m

        self.backbone, self.decoder = build(backbone_kw), build(decoder_kw)
        bdim, ddim = backbone_kw["embed_dim"], decoder_kw["embed_dim"]
        self.text_embeddings = nn.Embedding(text_vocab, bdim)
        self.audio_embeddings = nn.Embedding(audio_vocab * codebooks, bdim)
        self.projection = nn.Linear(bdim, ddim, bias=False)
        self.codebook0_head = nn.Linear(bdim, audio_vocab, bias=False)
        self.audio_head = nn.Parameter(torch.randn(codebooks - 1, ddim, audio_vocab) * 0.1)
        self.audio_vocab, self.codebooks = audio_vocab, codebooks

    def embed(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        text = self.text_embeddings(tokens[:, :, -1]).unsqueeze(-2)
        offsets = self.audio_vocab * torch.arange(self.codebooks)
        audio = self.audio_embeddings((tokens[:, :, :-1] + offsets).view(-1)).reshape(
            tokens.size(0), tokens.size(1), self.codebooks, -1
        )
        return (torch.cat([audio, text], dim=-2) * mask.unsqueeze(-1)).sum(dim=2)

    def backbone_logits(self, tokens, mask):
        h = self.backbone(self.embed(tokens, mask))
        return h, self.codebook0_head(h)

    def decoder_logits(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced: decoder reads [h, c0..c30]; logits of codebook i come from position i."""
        embeds = [h[:, None]]
        for i in range(self.codebooks - 1):
            embeds.append(self.audio_embeddings(codes[:, i : i + 1] + i * self.audio_vocab))
        out = self.decoder(self.projection(torch.cat(embeds, dim=1)))
        return torch.stack([out[:, i] @ self.audio_head[i - 1] for i in range(1, self.codebooks)], dim=1)
