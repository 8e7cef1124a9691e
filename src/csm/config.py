"""Model configuration: one dataclass per transformer, one for the whole CSM, and named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class TransformerConfig:
    """A Llama-3 style decoder-only transformer (SwiGLU MLP, RMSNorm, GQA, RoPE with llama3 scaling)."""

    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    max_seq_len: int
    head_dim: int | None = None  # None: dim // n_heads
    norm_eps: float = 1e-5
    rope_base: float = 500_000.0
    # llama3 frequency scaling; rope_scale_factor=None turns it off (plain RoPE).
    rope_scale_factor: float | None = 32.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) is not divisible by n_heads ({self.n_heads})")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)


@dataclass(frozen=True)
class CSMConfig:
    """The backbone reads frames and predicts codebook 0; the decoder predicts codebooks 1..K-1 inside a frame."""

    backbone: TransformerConfig
    decoder: TransformerConfig
    text_vocab_size: int = 128_256
    audio_vocab_size: int = 2051  # Mimi's 2048 entries + 3 spare ids
    audio_num_codebooks: int = 32

    def __post_init__(self) -> None:
        if self.decoder.max_seq_len < self.audio_num_codebooks:
            raise ValueError("decoder.max_seq_len must hold one frame: at least audio_num_codebooks positions")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CSMConfig":
        d = dict(d)
        return cls(
            backbone=TransformerConfig(**d.pop("backbone")),
            decoder=TransformerConfig(**d.pop("decoder")),
            **d,
        )

    def replace(self, **changes: Any) -> "CSMConfig":
        return dataclasses.replace(self, **changes)


# Shapes of the released models (Sesame's "llama-1B" backbone and "llama-100M" decoder flavors).
LLAMA_1B = TransformerConfig(n_layers=16, dim=2048, n_heads=32, n_kv_heads=8, intermediate_size=8192, max_seq_len=2048)
# The decoder only ever sees one frame (positions 0..31), so its cache needs 32 slots, not the flavor's 2048.
LLAMA_100M = TransformerConfig(n_layers=4, dim=1024, n_heads=8, n_kv_heads=2, intermediate_size=8192, max_seq_len=32)
FLAVORS = {"llama-1B": LLAMA_1B, "llama-100M": LLAMA_100M}

PRESETS: dict[str, CSMConfig] = {
    "csm-1b": CSMConfig(backbone=LLAMA_1B, decoder=LLAMA_100M),
    # Small random models for tests and smoke runs: same structure, tiny sizes.
    "tiny": CSMConfig(
        backbone=TransformerConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, intermediate_size=128, max_seq_len=512),
        decoder=TransformerConfig(n_layers=2, dim=32, n_heads=4, n_kv_heads=2, intermediate_size=64, max_seq_len=32),
        text_vocab_size=512,
    ),
    # The embedded voice (13.5 M): for the `embedded` codec preset (8 codebooks x 512) and a 512-token BPE.
    "embedded": CSMConfig(
        backbone=TransformerConfig(n_layers=6, dim=384, n_heads=6, n_kv_heads=2, intermediate_size=1024, max_seq_len=512),
        decoder=TransformerConfig(n_layers=3, dim=192, n_heads=3, n_kv_heads=1, intermediate_size=576, max_seq_len=8),
        text_vocab_size=512,
        audio_vocab_size=515,
        audio_num_codebooks=8,
    ),
}
# The phoneme voice: the same network for the `embedded-mel` codec's first 8 codebooks (1024 + 3 ids) and a character
# vocabulary of espeak-ng IPA symbols (~70 in use, room for 128).
PRESETS["embedded-phonemes"] = replace(PRESETS["embedded"], text_vocab_size=128, audio_vocab_size=1027)


def get_config(name: str) -> CSMConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}") from None

