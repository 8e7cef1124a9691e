"""The spectral front and back ends of a small Mimi that trains fast on a CPU (config `frontend="mel"`).

Mimi's SEANet runs its convolutions at the audio rate, which is most of the cost of training a codec. These two
replace it and keep everything else (25 Hz transformers, 12.5 Hz split RVQ, codes, streaming):

    encode: audio -> causal STFT magnitudes (100 Hz) -> log-mel -> ConvNeXt blocks -> stride-4 conv (25 Hz)
    decode: 25 Hz latents -> transposed conv (100 Hz) -> ConvNeXt blocks -> log-magnitude and phase -> inverse STFT

The decoder is Vocos's idea (Siuzdenko et al., 2023): predict the spectrum and let an inverse FFT make the
waveform, so every layer runs at 100 Hz. Both ends are causal and stream exactly like SEANet: each layer keeps the
input tail (convolutions, STFT framing) or output tail (overlap-add) it needs in a fixed-size state. The decoder's
frame t writes samples [t * hop, t * hop + n_fft): its last 3 hops overlap the next frames, which a stream adds on.
The fixed windows and mel filters are saved with the weights (persistent buffers): `load_mimi` builds the model
on the meta device, so anything not in the checkpoint would be left uninitialised.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MimiConfig
from .conv import CausalConv1d, CausalConvTranspose1d, ConvTrState

LOG_FLOOR = 1e-5  # mel magnitudes are clamped here before the log (audio normalised to about -20 dBFS RMS)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None) -> Tensor:
    """[n_mels, n_fft // 2 + 1] triangular filters on the HTK mel scale, Slaney area normalisation."""
    f_max = f_max or sample_rate / 2

    def hz_to_mel(f):
        return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    pts = mel_to_hz(torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2, dtype=torch.float64))
    lower, centre, upper = pts[:-2, None], pts[1:-1, None], pts[2:, None]
    up = (freqs[None] - lower) / (centre - lower)
    down = (upper - freqs[None]) / (upper - centre)
    fb = torch.clamp(torch.minimum(up, down), min=0.0)
    fb = fb * (2.0 / (upper - lower))  # Slaney: constant energy per filter
    return fb.float()


class CausalLogMel(nn.Module):
    """[B, 1, T] audio -> [B, n_mels, T / hop] log-mel; frame t sees samples [(t + 1) * hop - n_fft, (t + 1) * hop)."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.n_fft, self.hop = cfg.n_fft, cfg.ratios[-1]
        self.context = self.n_fft - self.hop
        # On the CPU even under load_mimi's meta device: meta maths runs Python reference code that imports the
        # compiler stack (~0.7 s of `csm say`'s start-up); the checkpoint's copies replace these values.
        with torch.device("cpu"):
            self.register_buffer("window", torch.hann_window(self.n_fft))
            self.register_buffer("fb", mel_filterbank(self.n_fft, cfg.n_mels, cfg.sample_rate))

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        return torch.zeros(batch, 1, self.context, device=device, dtype=dtype)

    def forward(self, x: Tensor, state: Tensor | None = None) -> Tensor:
        if state is None:
            x = F.pad(x, (self.context, -x.shape[-1] % self.hop))
        else:
            x = torch.cat([state, x], dim=-1)
            state.copy_(x[..., -self.context:])
        frames = x[:, 0].unfold(-1, self.n_fft, self.hop) * self.window  # [B, frames, n_fft]
        mag = torch.fft.rfft(frames.float(), dim=-1).abs()
        mel = mag @ self.fb.t()
        return torch.log(mel.clamp(min=LOG_FLOOR)).transpose(1, 2).to(x.dtype)


class ConvNeXtBlock(nn.Module):
    """Causal depthwise conv -> LayerNorm -> MLP (x3) -> layer scale, plus identity skip (Vocos' block, causal)."""

    def __init__(self, dim: int, kernel: int, hidden: int):
        super().__init__()
        self.dwconv = CausalConv1d(dim, dim, kernel, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.scale = nn.Parameter(torch.full((dim,), 0.1))

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype):
        return self.dwconv.init_state(batch, device, dtype)

    def forward(self, x: Tensor, state=None) -> Tensor:
        h = self.dwconv(x, state).transpose(1, 2)
        h = self.fc2(F.gelu(self.fc1(self.norm(h))))
        return x + (self.scale * h).transpose(1, 2)


class MelEncoder(nn.Module):
    """[B, 1, T] audio -> [B, dim, T / hop_length] latents (25 Hz for the 12.5 Hz codecs)."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        width, stride = cfg.num_filters, cfg.ratios[0]
        self.mel = CausalLogMel(cfg)
        self.conv_in = CausalConv1d(cfg.n_mels, width, cfg.kernel_size)
        self.blocks = nn.ModuleList([ConvNeXtBlock(width, cfg.kernel_size, 3 * width)
                                     for _ in range(cfg.mel_encoder_layers)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.down = CausalConv1d(width, cfg.dim, 2 * stride, stride=stride)

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
        args = (batch, device, dtype)
        return {"mel": self.mel.init_state(*args), "conv_in": self.conv_in.init_state(*args),
                "blocks": [b.init_state(*args) for b in self.blocks], "down": self.down.init_state(*args)}

    def forward(self, x: Tensor, state: dict | None = None) -> Tensor:
        s = state or {}
        h = self.conv_in(self.mel(x, s.get("mel")), s.get("conv_in"))
        for i, block in enumerate(self.blocks):
            h = block(h, s["blocks"][i] if s else None)
        h = self.norm(h.transpose(1, 2)).transpose(1, 2)
        return self.down(h, s.get("down"))


class ISTFTDecoder(nn.Module):
    """[B, dim, S] latents -> [B, 1, S * hop_length] audio through a predicted spectrum and an inverse STFT."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        width, stride = cfg.num_filters, cfg.ratios[0]
        self.n_fft, self.hop = cfg.n_fft, cfg.ratios[-1]
        self.up = CausalConvTranspose1d(cfg.dim, width, 2 * stride, stride)
        self.blocks = nn.ModuleList([ConvNeXtBlock(width, cfg.kernel_size, 3 * width)
                                     for _ in range(cfg.num_residual_layers)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, self.n_fft + 2)  # log-magnitude and phase of n_fft // 2 + 1 bins
        with torch.device("cpu"):  # as in CausalLogMel
            window = torch.hann_window(self.n_fft)
        # Overlap-added Hann windows sum to n_fft / (2 hop) (2 for hop = n_fft / 4): divide it out.
        self.register_buffer("window", window * (2 * self.hop / self.n_fft))

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
        args = (batch, device, dtype)
        return {"up": self.up.init_state(*args), "blocks": [b.init_state(*args) for b in self.blocks],
                "ola": ConvTrState(torch.zeros(batch, 1, self.n_fft - self.hop, device=device, dtype=dtype))}

    def forward(self, x: Tensor, state: dict | None = None) -> Tensor:
        s = state or {}
        h = self.up(x, s.get("up"))
        for i, block in enumerate(self.blocks):
            h = block(h, s["blocks"][i] if s else None)
        logmag, phase = self.head(self.norm(h.transpose(1, 2))).float().chunk(2, dim=-1)  # [B, frames, bins]
        spec = torch.polar(torch.exp(logmag.clamp(max=math.log(100.0))), phase)
        frames = torch.fft.irfft(spec, n=self.n_fft, dim=-1) * self.window  # [B, n, n_fft]
        n = frames.shape[1]
        y = F.fold(frames.transpose(1, 2), (1, (n - 1) * self.hop + self.n_fft), (1, self.n_fft),
                   stride=(1, self.hop))[:, :, 0].to(x.dtype)  # overlap-add: [B, 1, (n + 3) * hop]
        overlap = self.n_fft - self.hop
        if "ola" in s:
            y[..., :overlap] += s["ola"].partial
            s["ola"].partial.copy_(y[..., -overlap:])
        return y[..., : n * self.hop]
