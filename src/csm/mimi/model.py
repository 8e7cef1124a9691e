"""Mimi: 24 kHz audio <-> 12.5 Hz frames of RVQ codes, one-shot and streaming.

    encode: audio -> SEANet encoder (25 Hz) -> transformer -> strided conv (12.5 Hz) -> split RVQ -> codes
    decode: codes -> RVQ sum -> transposed conv (25 Hz) -> transformer -> SEANet decoder -> audio

Semantics (same as transformers' `MimiModel`, which CSM uses):
- `encode` of T samples gives ceil(T / 1920) frames. A partial last frame is completed by zero padding at each conv
  (transformers); moshi instead zero-pads the waveform to a multiple of 1920 first. Both agree whenever T is a
  multiple of 1920, which is also what streaming encode requires.
- `decode` of F frames gives exactly F * 1920 samples (trim to the original length yourself if you encoded a
  partial frame).
- `encode`/`decode` run under `no_grad` (not `inference_mode`: codes may index trainable embeddings later).
- Streaming (`MimiDecodeStream` / `MimiEncodeStream`) gives the same numbers as one-shot, chunk by chunk: the state is
  conv left-context buffers, transposed-conv overlap buffers and a KV cache of the last 250 transformer steps, all
  fixed-size and updated in place.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import MimiConfig
from .conv import CausalConv1d, CausalConvTranspose1d, SEANetDecoder, SEANetEncoder
from .quantizer import SplitRVQ
from .spectral import ISTFTDecoder, MelEncoder
from .transformer import Transformer


class Mimi(nn.Module):
    """The codec. Module names follow transformers' published checkpoint (see weights.py for every mapping)."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.cfg = cfg
        mel = cfg.frontend == "mel"
        self.encoder = MelEncoder(cfg) if mel else SEANetEncoder(cfg)
        self.encoder_transformer = Transformer(cfg)
        self.downsample = CausalConv1d(cfg.dim, cfg.dim, 2 * cfg.latent_stride, cfg.latent_stride, bias=False,
                                       pad_mode="replicate")
        self.quantizer = SplitRVQ(cfg)
        self.upsample = CausalConvTranspose1d(cfg.dim, cfg.dim, 2 * cfg.latent_stride, cfg.latent_stride,
                                              groups=cfg.upsample_groups, bias=False)
        self.decoder_transformer = Transformer(cfg)
        self.decoder = ISTFTDecoder(cfg) if mel else SEANetDecoder(cfg)

    @property
    def frame_size(self) -> int:
        return self.cfg.frame_size

    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    @property
    def num_codebooks(self) -> int:
        return self.cfg.num_codebooks

    def _param(self) -> Tensor:
        return next(self.parameters())

    # --- latents -------------------------------------------------------------------------------------------------
    def encode_latent(self, wav: Tensor, state: dict | None = None) -> Tensor:
        """[B, 1, T] -> unquantized latent [B, dim, F]."""
        s = state or {}
        h = self.encoder(wav, s.get("encoder"))
        h = self.encoder_transformer(h.transpose(1, 2), s.get("transformer")).transpose(1, 2)
        return self.downsample(h, s.get("downsample"))

    def decode_latent(self, latent: Tensor, state: dict | None = None) -> Tensor:
        """[B, dim, F] quantized latent -> [B, 1, F * frame_size]."""
        s = state or {}
        h = self.upsample(latent, s.get("upsample"))
        h = self.decoder_transformer(h.transpose(1, 2), s.get("transformer")).transpose(1, 2)
        return self.decoder(h, s.get("decoder"))

    # --- one-shot ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, wav: Tensor, num_codebooks: int | None = None) -> Tensor:
        """24 kHz float audio -> codes. [B, 1, T] or [B, T] -> [B, K, F]; [T] -> [K, F]. F = ceil(T / 1920)."""
        squeeze = wav.dim() == 1
        wav = _as_batch(wav, self.cfg.channels)
        if wav.shape[-1] == 0:
            raise ValueError("cannot encode empty audio")
        codes = self.quantizer.encode(self.encode_latent(wav.to(self._param().dtype)), num_codebooks)
        return codes[0] if squeeze else codes

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Codes -> 24 kHz audio. [B, K, F] -> [B, 1, F * 1920]; [K, F] -> [F * 1920]. K may be < num_codebooks."""
        squeeze = codes.dim() == 2
        codes = codes[None] if squeeze else codes
        _check_codes(codes, self.cfg)
        wav = self.decode_latent(self.quantizer.decode(codes.long()))
        return wav[0, 0] if squeeze else wav

    # --- streaming -----------------------------------------------------------------------------------------------
    def decode_stream(self, batch_size: int = 1) -> MimiDecodeStream:
        return MimiDecodeStream(self, batch_size)

    def encode_stream(self, batch_size: int = 1) -> MimiEncodeStream:
        return MimiEncodeStream(self, batch_size)


def _as_batch(wav: Tensor, channels: int) -> Tensor:
    if wav.dim() == 1:
        wav = wav[None, None]
    elif wav.dim() == 2:
        wav = wav[:, None]
    if wav.dim() != 3 or wav.shape[1] != channels:
        raise ValueError(f"expected audio of shape [T], [B, T] or [B, {channels}, T], got {tuple(wav.shape)}")
    return wav


def _check_codes(codes: Tensor, cfg: MimiConfig) -> None:
    if codes.dim() != 3:
        raise ValueError(f"expected codes of shape [B, K, F] or [K, F], got {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= cfg.codebook_size):
        raise ValueError(f"codes must be in [0, {cfg.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]")


class MimiDecodeStream:
    """Streaming decoder: feed [B, K, n] codes (n >= 1 frames), get [B, 1, n * 1920] audio.

    The concatenation of the chunks equals `Mimi.decode` of all frames. All state tensors keep their shape and are
    updated in place, so a fixed-n `decode` call can be captured in a CUDA graph. Not thread-safe; one per stream.
    """

    def __init__(self, mimi: Mimi, batch_size: int = 1):
        self.mimi, self.batch_size = mimi, batch_size
        self.reset()

    def reset(self) -> None:
        p = self.mimi._param()
        args = (self.batch_size, p.device, p.dtype)
        m = self.mimi
        self.state = {"upsample": m.upsample.init_state(*args), "transformer": m.decoder_transformer.init_state(*args),
                      "decoder": m.decoder.init_state(*args)}

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        if codes.dim() != 3 or codes.shape[0] != self.batch_size:
            raise ValueError(f"expected codes [{self.batch_size}, K, n] (one frame: codes[..., None]), got "
                             f"{tuple(codes.shape)}")
        return self.mimi.decode_latent(self.mimi.quantizer.decode(codes.long()), self.state)


class MimiEncodeStream:
    """Streaming encoder: feed [B, 1, n * 1920] audio chunks, get [B, K, n] codes (equal to one-shot `encode`)."""

    def __init__(self, mimi: Mimi, batch_size: int = 1, num_codebooks: int | None = None):
        self.mimi, self.batch_size, self.num_codebooks = mimi, batch_size, num_codebooks
        self.reset()

    def reset(self) -> None:
        p = self.mimi._param()
        args = (self.batch_size, p.device, p.dtype)
        m = self.mimi
        self.state = {"encoder": m.encoder.init_state(*args), "transformer": m.encoder_transformer.init_state(*args),
                      "downsample": m.downsample.init_state(*args)}

    @torch.no_grad()
    def encode(self, wav: Tensor) -> Tensor:
        wav = _as_batch(wav, self.mimi.cfg.channels)
        if wav.shape[0] != self.batch_size or wav.shape[-1] == 0 or wav.shape[-1] % self.mimi.frame_size:
            raise ValueError(f"streaming encode takes [{self.batch_size}, 1, T] chunks with T a positive multiple of "
                             f"{self.mimi.frame_size} samples (buffer the input yourself), got {tuple(wav.shape)}")
        latent = self.mimi.encode_latent(wav.to(self.mimi._param().dtype), self.state)
        return self.mimi.quantizer.encode(latent, self.num_codebooks)
