"""The codec's training losses: multi-scale mel L1 (linear + log, our own STFT filterbank), the held-out mel
distance, and the optional multi-scale STFT discriminator (hinge) with feature matching."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..mimi.spectral import mel_filterbank

_EPS = 1e-5


# --- losses -------------------------------------------------------------------------------------------------------


class MelSpec(nn.Module):
    """Magnitude mel spectrogram with torch.stft: [B, T] -> [B, n_mels, frames]."""

    def __init__(self, n_fft: int, hop: int, n_mels: int, sample_rate: int):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("fb", mel_filterbank(n_fft, n_mels, sample_rate), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        spec = torch.stft(x.float(), self.n_fft, self.hop, window=self.window, center=True, return_complex=True)
        mag = (spec.real.square() + spec.imag.square() + 1e-9).sqrt()
        return self.fb @ mag


# (n_fft, n_mels) of the multi-scale reconstruction loss; hop = n_fft / 4.
MEL_SCALES = ((256, 32), (512, 64), (1024, 80), (2048, 128))


def parse_mel_scales(spec: str) -> tuple[tuple[int, int], ...]:
    """"256,512,1024" -> ((256, 32), (512, 64), (1024, 80)): n_mels = min(128, max(32, n_fft / 8)), 80 for 1024."""
    known = dict(MEL_SCALES)
    sizes = [int(x) for x in spec.split(",") if x.strip()]
    if not sizes:
        raise ValueError("--mel-scales: give at least one STFT size")
    return tuple((n, known.get(n, min(128, max(32, n // 8)))) for n in sizes)


class MultiScaleMelLoss(nn.Module):
    def __init__(self, sample_rate: int, scales=MEL_SCALES, log_eps: float = 1e-5):
        super().__init__()
        self.mels = nn.ModuleList([MelSpec(n, n // 4, m, sample_rate) for n, m in scales])
        self.log_eps = log_eps

    def forward(self, x_hat: Tensor, x: Tensor) -> Tensor:
        """Mean over scales of L1(mel) + L1(log mel)."""
        x_hat, x = x_hat.reshape(-1, x_hat.shape[-1]), x.reshape(-1, x.shape[-1])
        total = x.new_zeros(())
        for mel in self.mels:
            a = mel(x_hat)
            with torch.no_grad():
                b = mel(x)
            log_a, log_b = a.clamp(min=self.log_eps).log(), b.clamp(min=self.log_eps).log()
            total = total + F.l1_loss(a, b) + F.l1_loss(log_a, log_b)
        return total / len(self.mels)


class ValMel(nn.Module):
    """The validation metric: log-mel L1 (n_fft 1024, hop 240, 80 mels, natural log of magnitudes clamped at 1e-5)."""

    def __init__(self, sample_rate: int):
        super().__init__()
        self.mel = MelSpec(1024, 240, 80, sample_rate)

    def forward(self, x_hat: Tensor, x: Tensor) -> Tensor:
        return F.l1_loss(self.mel(x_hat).clamp(min=_EPS).log(), self.mel(x).clamp(min=_EPS).log())


# --- the (optional) discriminator ---------------------------------------------------------------------------------


class STFTDiscriminator(nn.Module):
    """One scale of EnCodec's multi-scale STFT discriminator (small): complex STFT as 2 channels -> 2-D convs."""

    def __init__(self, n_fft: int, channels: int = 16):
        super().__init__()
        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        c = channels
        self.convs = nn.ModuleList([
            nn.Conv2d(2, c, (3, 9), padding=(1, 4)),
            nn.Conv2d(c, c, (3, 9), stride=(1, 2), dilation=(1, 1), padding=(1, 4)),
            nn.Conv2d(c, c, (3, 9), stride=(1, 2), dilation=(2, 1), padding=(2, 4)),
            nn.Conv2d(c, c, (3, 9), stride=(1, 2), dilation=(4, 1), padding=(4, 4)),
            nn.Conv2d(c, c, (3, 3), padding=(1, 1)),
        ])
        self.post = nn.Conv2d(c, 1, (3, 3), padding=(1, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        spec = torch.stft(x.reshape(-1, x.shape[-1]).float(), self.n_fft, self.n_fft // 4, window=self.window,
                          return_complex=True)  # [B, F, T]
        h = torch.stack([spec.real, spec.imag], dim=1).transpose(2, 3)  # [B, 2, T, F]
        feats = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)
            feats.append(h)
        return self.post(h), feats


class MultiScaleSTFTDiscriminator(nn.Module):
    def __init__(self, n_ffts=(2048, 1024, 512), channels: int = 16):
        super().__init__()
        self.discs = nn.ModuleList([STFTDiscriminator(n, channels) for n in n_ffts])

    def forward(self, x: Tensor) -> list[tuple[Tensor, list[Tensor]]]:
        return [d(x) for d in self.discs]


def discriminator_loss(disc: MultiScaleSTFTDiscriminator, real: Tensor, fake: Tensor) -> Tensor:
    loss = real.new_zeros(())
    for (lr, _), (lf, _) in zip(disc(real), disc(fake.detach())):
        loss = loss + F.relu(1 - lr).mean() + F.relu(1 + lf).mean()
    return loss / len(disc.discs)


def generator_adv_losses(disc: MultiScaleSTFTDiscriminator, real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
    """(hinge adversarial loss, relative feature-matching L1), each a mean over scales."""
    adv, feat = real.new_zeros(()), real.new_zeros(())
    with torch.no_grad():
        real_out = disc(real)
    for (lf, ff), (_, fr) in zip(disc(fake), real_out):
        adv = adv + F.relu(1 - lf).mean()
        feat = feat + sum(F.l1_loss(a, b) / (b.abs().mean() + 1e-6) for a, b in zip(ff, fr)) / len(ff)
    n = len(disc.discs)
    return adv / n, feat / n
