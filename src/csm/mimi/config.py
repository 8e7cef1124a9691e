"""Mimi hyper-parameters: one dataclass, a preset for the real `kyutai/mimi` codec and tiny presets for tests."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class MimiConfig:
    sample_rate: int = 24_000
    channels: int = 1
    # SEANet convolutional encoder/decoder.
    dim: int = 512  # latent width: SEANet output, transformer width, quantizer in/out
    num_filters: int = 64
    ratios: tuple[int, ...] = (8, 6, 5, 4)  # decoder (upsampling) order; the encoder uses them reversed
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    num_residual_layers: int = 1
    dilation_base: int = 2
    compress: int = 2
    # Latent resampling from the SEANet rate (25 Hz) to the frame rate (12.5 Hz): a strided conv / transposed conv.
    latent_stride: int = 2
    upsample_groups: int = 512  # the published upsampler is depthwise (moshi's "channel_wise" upsampling)
    # Encoder and decoder transformers (identical shapes, separate weights).
    num_layers: int = 8
    num_heads: int = 8
    intermediate_size: int = 2048
    context: int = 250  # sliding attention window, in 25 Hz steps (10 s), the query itself included
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    # Split residual vector quantizer: `num_semantic` codebooks then `num_codebooks - num_semantic` acoustic ones.
    num_codebooks: int = 32
    num_semantic: int = 1
    codebook_size: int = 2048
    codebook_dim: int = 256
    # "seanet": Mimi as published. "mel": the CPU-trainable codec of spectral.py; ratios are then (25 Hz -> 100 Hz
    # upsampling, STFT hop), num_filters the ConvNeXt width, num_residual_layers the decoder's ConvNeXt blocks.
    frontend: str = "seanet"
    n_fft: int = 960
    n_mels: int = 80
    mel_encoder_layers: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratios", tuple(self.ratios))
        if self.frontend not in ("seanet", "mel"):
            raise ValueError(f"frontend must be 'seanet' or 'mel', got {self.frontend!r}")
        if self.frontend == "mel" and (len(self.ratios) != 2 or self.n_fft % self.ratios[-1]):
            raise ValueError(f"a mel codec has ratios (upsampling, STFT hop) with n_fft a multiple of the hop, got "
                             f"ratios {self.ratios}, n_fft {self.n_fft}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if not 0 < self.num_semantic < self.num_codebooks:
            raise ValueError(f"need 0 < num_semantic ({self.num_semantic}) < num_codebooks ({self.num_codebooks})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def hop_length(self) -> int:
        """Audio samples per SEANet step (960 for the real codec: 24 kHz -> 25 Hz)."""
        return math.prod(self.ratios)

    @property
    def frame_size(self) -> int:
        """Audio samples per code frame (1920 for the real codec: 24 kHz -> 12.5 Hz)."""
        return self.hop_length * self.latent_stride

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.frame_size

    def with_codebooks(self, n: int) -> MimiConfig:
        return replace(self, num_codebooks=n)

    @classmethod
    def from_transformers(cls, cfg: dict[str, Any]) -> MimiConfig:
        """Build from a transformers `MimiConfig` dict (`kyutai/mimi` config.json, or `codec_config` of a CSM config)."""
        unsupported = {
            "use_causal_conv": (True, cfg.get("use_causal_conv", True)),
            "use_conv_shortcut": (False, cfg.get("use_conv_shortcut", False)),
            "trim_right_ratio": (1.0, cfg.get("trim_right_ratio", 1.0)),
            "pad_mode": ("constant", cfg.get("pad_mode", "constant")),
            "audio_channels": (1, cfg.get("audio_channels", 1)),
        }
        bad = {k: got for k, (want, got) in unsupported.items() if got != want}
        if bad:
            raise ValueError(f"unsupported Mimi config values (only the published architecture is implemented): {bad}")
        heads = cfg.get("num_attention_heads", 8)
        if cfg.get("num_key_value_heads", heads) != heads:
            raise ValueError("grouped-query attention is not used by Mimi and is not supported")
        hidden = cfg.get("hidden_size", 512)
        if cfg.get("head_dim") not in (None, hidden // heads):
            raise ValueError(f"head_dim {cfg['head_dim']} != hidden_size / num_attention_heads is not supported")
        rope = cfg.get("rope_parameters") or {}
        ratios = tuple(cfg.get("upsampling_ratios") or (8, 6, 5, 4))
        sr = cfg.get("sampling_rate", 24_000)
        hop = math.prod(ratios)
        # transformers derives a x2 latent stride unless an old config pins `frame_rate` (then: 25 Hz / frame_rate).
        frame_rate = cfg.get("frame_rate")
        stride = int(math.ceil(sr / hop) / frame_rate) if frame_rate else 2
        return cls(
            sample_rate=sr,
            dim=hidden,
            num_filters=cfg.get("num_filters", 64),
            ratios=ratios,
            kernel_size=cfg.get("kernel_size", 7),
            last_kernel_size=cfg.get("last_kernel_size", 3),
            residual_kernel_size=cfg.get("residual_kernel_size", 3),
            num_residual_layers=cfg.get("num_residual_layers", 1),
            dilation_base=cfg.get("dilation_growth_rate", 2),
            compress=cfg.get("compress", 2),
            latent_stride=stride,
            upsample_groups=cfg.get("upsample_groups", 512),
            num_layers=cfg.get("num_hidden_layers", 8),
            num_heads=heads,
            intermediate_size=cfg.get("intermediate_size", 2048),
            context=cfg.get("sliding_window", 250),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10_000.0))),
            norm_eps=cfg.get("norm_eps", 1e-5),
            num_codebooks=cfg.get("num_quantizers", 32),
            num_semantic=cfg.get("num_semantic_quantizers", 1),
            codebook_size=cfg.get("codebook_size", 2048),
            codebook_dim=cfg.get("vector_quantization_hidden_dimension", 256),
            frontend=cfg.get("csm_frontend", "seanet"),
            n_fft=cfg.get("n_fft", 960),
            n_mels=cfg.get("n_mels", 80),
            mel_encoder_layers=cfg.get("mel_encoder_layers", 2),
        )

    def to_transformers(self) -> dict[str, Any]:
        """The equivalent transformers `MimiConfig` kwargs (used by the parity tests)."""
        return dict(
            sampling_rate=self.sample_rate, hidden_size=self.dim, num_filters=self.num_filters,
            upsampling_ratios=list(self.ratios), kernel_size=self.kernel_size, last_kernel_size=self.last_kernel_size,
            residual_kernel_size=self.residual_kernel_size, num_residual_layers=self.num_residual_layers,
            dilation_growth_rate=self.dilation_base, compress=self.compress, upsample_groups=self.upsample_groups,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads, intermediate_size=self.intermediate_size,
            sliding_window=self.context, rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            norm_eps=self.norm_eps, num_quantizers=self.num_codebooks, num_semantic_quantizers=self.num_semantic,
            codebook_size=self.codebook_size, codebook_dim=self.codebook_dim,
            vector_quantization_hidden_dimension=self.codebook_dim, max_position_embeddings=8000,
        ) | ({} if self.frontend == "seanet" else dict(csm_frontend=self.frontend, n_fft=self.n_fft,
                                                       n_mels=self.n_mels, mel_encoder_layers=self.mel_encoder_layers))


PRESETS: dict[str, MimiConfig] = {
    # The published codec (kyutai/mimi, and the codec inside sesame/csm-1b): 24 kHz mono, 12.5 Hz, 32 codebooks.
    "kyutai/mimi": MimiConfig(),
    # Same structure (ratios, strides, kernels, split RVQ), tiny widths: for parity tests on CPU.
    "small": MimiConfig(
        dim=32, num_filters=4, upsample_groups=32, num_layers=2, num_heads=4, intermediate_size=64, context=6,
        num_codebooks=8, codebook_size=64, codebook_dim=16,
    ),
    # Shorter hop (4*3*2*2=48 samples per step, 96 per frame) for the fastest tests.
    "tiny": MimiConfig(
        dim=16, num_filters=2, ratios=(4, 3, 2, 2), upsample_groups=16, num_layers=1, num_heads=2,
        intermediate_size=32, context=5, num_codebooks=4, codebook_size=32, codebook_dim=8,
    ),
    # The mel/iSTFT front end (spectral.py) at test widths: 24 kHz, 100 Hz STFT, 25 Hz latents, 12.5 Hz frames.
    "tiny-mel": MimiConfig(
        frontend="mel", ratios=(4, 240), n_fft=960, n_mels=16, dim=16, num_filters=16, num_residual_layers=1,
        mel_encoder_layers=1, upsample_groups=16, num_layers=1, num_heads=2, intermediate_size=32, context=5,
        num_codebooks=4, codebook_size=32, codebook_dim=8,
    ),
}


def preset(name: str) -> MimiConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown Mimi preset {name!r}; known: {sorted(PRESETS)}") from None


__all__ = ["PRESETS", "MimiConfig", "preset"]
