"""Training a small Mimi-architecture codec from scratch (`csm train-codec`).

The model is `csm.mimi.Mimi` itself (SEANet encoder -> transformer -> strided conv -> split RVQ -> transposed conv ->
transformer -> SEANet decoder, 24 kHz, 12.5 Hz frames); only the quantizer gets a training-mode twin here:

- EMA codebooks in Mimi's own layout: per codebook `embed_sum` [K, d] and `cluster_usage` [K], the codebook being
  `embed_sum / cluster_usage.clamp(1e-5)`. Updated by exponential moving averages of the residuals assigned to each
  code (no gradient), with dead-code replacement (codes whose usage falls under `dead_code_ratio` x the mean usage get
  a random residual of the batch), initialised from the first batch.
- Straight-through estimator per RVQ: the decoder sees `x + (sum_i q_i - x).detach()`, and a commitment loss
  `|r_i - sg(q_i)|^2` on every level pulls the encoder towards its codes.
- Quantizer dropout (as Mimi): with probability `quantizer_dropout` a clip uses only its first n codebooks, n uniform
  in [1, num_codebooks] (the semantic one always included), so decoding with fewer codebooks works; and with
  probability 1 - `quantize_prob` (0.5, as Mimi) a clip passes the unquantized latent, which gives the encoder a
  direct gradient (with every clip quantized, our CPU runs collapsed to a near-constant latent).
- The semantic codebook: Mimi distils WavLM into codebook 0; we have no WavLM offline, so codebook 0 is a plain
  1-level VQ of its own projection of the latent (Mimi's split structure, trained by reconstruction and commitment
  only). It still carries the coarsest information (the decoder must work from it alone under quantizer dropout).

Losses: multi-scale mel L1 (linear + log) with our own torch.stft filterbank, waveform L1 (small weight), commitment;
optionally (`--adversarial`) a small multi-scale STFT discriminator (hinge) + feature matching.

Checkpoints (`out/step-NNNNNN/`): model.safetensors in transformers' `MimiModel` layout (codebooks as
embed_sum/cluster_usage) + config.json (`model_type: mimi`), so `csm.mimi.load_mimi(dir)` loads them; train_state.pt
holds the optimizer(s), discriminator and step for `--resume`. All randomness is a function of (seed, step), so a
resumed run continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..mimi import Mimi, MimiConfig, PRESETS as MIMI_PRESETS
from ..mimi.quantizer import RVQ
from ..mimi.spectral import mel_filterbank
from ..mimi.weights import mimi_config_json
from .cli import SCHEDULE_HELP, add_config_flags
from .train import checkpoint_dirs, find_resume_dir, lr_at
from .watch import Watch

STATE_FILE, LOG_FILE, WEIGHTS_FILE, CONFIG_FILE = "train_state.pt", "log.jsonl", "model.safetensors", "config.json"
_EPS = 1e-5

# Codec presets for training (the csm.mimi presets are accepted too). All keep Mimi's frame structure (24 kHz ->
# 25 Hz latents -> x2 stride -> 12.5 Hz, split RVQ with 1 semantic codebook); "mel" ones swap SEANet for the
# spectral front and back ends (csm/mimi/spectral.py), which cost far less per second of audio on a CPU.
CODEC_PRESETS: dict[str, MimiConfig] = {
    # ~4.6 M parameters: the embedded voice's codec, trainable on 2 CPU cores in ~30-60 min to intelligible speech.
    "embedded": MimiConfig(
        dim=256, num_filters=16, upsample_groups=256, num_layers=2, num_heads=4, intermediate_size=512,
        context=250, num_codebooks=8, codebook_size=512, codebook_dim=64,
    ),
    # The embedded voice's second codec: log-mel in, Vocos-style iSTFT out, 16 codebooks x 1024 (trained with
    # quantizer dropout, so the first 8 or 12 also decode).
    "embedded-mel": MimiConfig(
        frontend="mel", ratios=(4, 240), n_fft=960, n_mels=80, num_filters=320, num_residual_layers=8,
        mel_encoder_layers=2, kernel_size=7, dim=256, upsample_groups=256, num_layers=2, num_heads=4,
        intermediate_size=512, context=250, num_codebooks=16, codebook_size=1024, codebook_dim=64,
    ),
    # ~20 M: a GPU-sized step up (same frame structure, 16 codebooks).
    "small-gpu": MimiConfig(
        dim=384, num_filters=32, upsample_groups=384, num_layers=4, num_heads=6, intermediate_size=1536,
        context=250, num_codebooks=16, codebook_size=2048, codebook_dim=128,
    ),
}


def codec_config(name: str) -> MimiConfig:
    if name in CODEC_PRESETS:
        return CODEC_PRESETS[name]
    if name in MIMI_PRESETS:
        return MIMI_PRESETS[name]
    raise ValueError(f"unknown codec preset {name!r}; known: {sorted({**CODEC_PRESETS, **MIMI_PRESETS})}")


@dataclass
class CodecTrainConfig:
    data: str  # a .jsonl/.csv manifest (field `audio`), a folder of audio files, or a scripts/gta_codes.py folder
    out: str  # checkpoints step-NNNNNN/ and log.jsonl
    preset: str = "embedded"  # codec architecture: CODEC_PRESETS or csm.mimi presets
    model_config: str | None = None  # a transformers-style Mimi config.json instead of --preset
    resume: str | None = None  # a checkpoint directory, or "latest"
    init: str | None = None  # start from this codec's weights (a step-NNNNNN/ dir or a packaged codec): fresh optimizer
    decoder_only: bool = False  # train only the decoder side on frozen codes (needs --init or --resume)
    # With --data a scripts/gta_codes.py folder (decoder-only): the clips' own codes and a CSM's ground-truth-aligned
    # draws, so that the decoder learns to turn what the CSM samples into the clip's audio (Tacotron 2's GTA trick).
    gta_share: float = 0.5  # probability that a crop decodes one of the CSM's draws instead of the clip's own codes
    # Data
    segment_frames: int = 12  # crop length in code frames (12 x 1920 samples = 0.96 s)
    eval_clips: int = 16  # held-out clips (the last ones of a seeded shuffle)
    eval_seconds: float = 4.0  # each held-out clip is evaluated on its first N seconds
    max_clips: int = 0  # use at most this many training clips (0: all)
    batch_size: int = 8
    # Optimisation
    steps: int = 2000
    max_minutes: float = 0.0  # stop after this much training time (0: off); the cosine then follows time, not steps
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    beta1: float = 0.8
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0: off
    # Quantizer
    ema_decay: float = 0.99
    dead_code_ratio: float = 0.1  # codes used less than this x the mean usage are replaced by batch residuals
    quantizer_dropout: float = 0.5  # probability that a clip uses a random number of codebooks
    quantize_prob: float = 0.5  # probability that a clip is quantized at all (Mimi: 0.5; 1.0 collapsed in our runs)
    # Losses
    mel_weight: float = 1.0
    mel_scales: str = "256,512,1024,2048"  # STFT sizes of the multi-scale mel loss (hop = size / 4)
    # Mel magnitudes are clamped to this before the log of the log-mel L1. Speech peaks near 2.5 here; with 1e-5,
    # bins more than 48 dB below the peak made 61 % of the log-mel error (scripts/resynthesize.py), and 3e-3 gave
    # clearly more intelligible codecs (docs/codec_training.md).
    mel_floor: float = 3e-3
    wav_weight: float = 0.1
    commit_weight: float = 1.0
    adversarial: bool = False
    adv_weight: float = 1.0
    feat_weight: float = 2.0
    adv_start: int = 0  # step at which the adversarial losses start
    disc_lr: float = 3e-4
    # Runtime
    device: str | None = None  # default: cuda if available
    threads: int = 0  # torch CPU threads (0: torch's default)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200  # 0: only at the end
    save_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 0
    progress: bool = True
    tensorboard: bool = True  # TensorBoard events in out/tb (losses, held-out scores, audio)


# --- data -----------------------------------------------------------------------------------------------------------


def audio_paths(source: str | os.PathLike) -> list[Path]:
    """Audio files of a manifest (.jsonl / .csv with an `audio` field, relative to the manifest) or a folder; several
    sources joined by commas are concatenated (a mix of corpora, weighted by their sizes)."""
    from .data import AUDIO_EXTENSIONS

    if isinstance(source, str) and "," in source and not Path(source).exists():
        return [p for part in source.split(",") if part for p in audio_paths(part)]
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    elif source.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
        paths = [source.parent / r["audio"] for r in rows]
    elif source.suffix.lower() == ".csv":
        import csv

        with open(source, newline="", encoding="utf-8") as f:
            paths = [source.parent / r["audio"] for r in csv.DictReader(f)]
    else:
        raise FileNotFoundError(f"{source}: expected a folder of audio files or a .jsonl/.csv manifest")
    if not paths:
        raise ValueError(f"{source}: no audio files")
    return paths


class ClipSet:
    """Whole clips held in memory (24 kHz mono float32); random fixed-length crops as a function of (seed, step)."""

    def __init__(self, clips: list[Tensor], sample_rate: int = 24_000):
        if not clips:
            raise ValueError("no clips")
        self.clips, self.sample_rate = clips, sample_rate
        self.lengths = torch.tensor([len(c) for c in clips], dtype=torch.float64)

    @classmethod
    def load(cls, paths: list[Path], sample_rate: int, progress: bool = False) -> ClipSet:
        from ..audio import load_audio

        it = paths
        if progress:
            from tqdm import tqdm

            it = tqdm(paths, desc="loading audio", leave=False)
        return cls([load_audio(p, sample_rate) for p in it], sample_rate)

    def __len__(self) -> int:
        return len(self.clips)

    @property
    def seconds(self) -> float:
        return float(self.lengths.sum()) / self.sample_rate

    def batch(self, batch_size: int, length: int, gen: torch.Generator) -> Tensor:
        """[B, 1, length]: clips drawn in proportion to their length, random offsets, zero-padded if short."""
        idx = torch.multinomial(self.lengths, batch_size, replacement=True, generator=gen)
        out = torch.zeros(batch_size, 1, length)
        for b, i in enumerate(idx.tolist()):
            clip = self.clips[i]
            start = int(torch.randint(0, max(1, len(clip) - length + 1), (1,), generator=gen))
            piece = clip[start : start + length]
            out[b, 0, : len(piece)] = piece
        return out


# --- the training-mode quantizer ----------------------------------------------------------------------------------


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


def is_code_folder(source: str | os.PathLike) -> bool:
    """`scripts/gta_codes.py` output folders (codes.safetensors + manifest.jsonl; several joined by commas) rather
    than audio."""
    parts = [p for p in str(source).split(",") if p]
    return bool(parts) and all((Path(p) / "codes.safetensors").is_file() for p in parts)


class CodeSet:
    """Clips with their codes, frame-aligned (a `scripts/gta_codes.py` folder): the codec's own codes `true.i` [K, F]
    and a CSM's draws `gta.i` [R, K, F]. Crops start on frame boundaries so codes and audio stay aligned."""

    def __init__(self, clips: list[Tensor], true: list[Tensor], gta: list[Tensor], frame_size: int,
                 sample_rate: int = 24_000):
        if not clips:
            raise ValueError("no clips")
        self.clips, self.true, self.gta = clips, true, gta
        self.frame_size, self.sample_rate = frame_size, sample_rate
        self.lengths = torch.tensor([t.shape[-1] for t in true], dtype=torch.float64)

    @classmethod
    def load(cls, folder: str | os.PathLike, sample_rate: int, frame_size: int, progress: bool = False) -> CodeSet:
        from safetensors.torch import load_file

        from ..audio import load_audio

        if "," in str(folder):  # several folders: one set
            sets = [cls.load(f, sample_rate, frame_size, progress) for f in str(folder).split(",") if f]
            return cls(*([x for c in sets for x in getattr(c, name)] for name in ("clips", "true", "gta")),
                       frame_size, sample_rate)
        folder = Path(folder)
        if not (folder / "codes.safetensors").is_file() or not (folder / "manifest.jsonl").is_file():
            raise FileNotFoundError(f"{folder}: expected codes.safetensors and manifest.jsonl "
                                    "(written by scripts/gta_codes.py)")
        rows = [json.loads(x) for x in (folder / "manifest.jsonl").read_text(encoding="utf-8").splitlines() if x]
        codes = load_file(str(folder / "codes.safetensors"))
        it = range(len(rows))
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc="loading audio", leave=False)
        clips, true, gta = [], [], []
        for i in it:
            t = codes[f"true.{i}"].long()
            wav = load_audio(rows[i]["audio"], sample_rate)
            # the codec pads the last frame: pad the audio to whole frames so every code has its samples
            clips.append(F.pad(wav, (0, max(0, t.shape[-1] * frame_size - len(wav))))[: t.shape[-1] * frame_size])
            true.append(t)
            gta.append(codes[f"gta.{i}"].long())
        return cls(clips, true, gta, frame_size, sample_rate)

    def split(self, n_eval: int, seed: int) -> tuple[CodeSet, CodeSet | None]:
        """(train, held-out): the last n_eval clips of a seeded shuffle are held out."""
        order = torch.randperm(len(self.clips), generator=torch.Generator().manual_seed(seed)).tolist()
        n_eval = min(n_eval, max(0, len(order) - 1))

        def pick(idx: list[int]) -> CodeSet:
            return CodeSet([self.clips[i] for i in idx], [self.true[i] for i in idx], [self.gta[i] for i in idx],
                           self.frame_size, self.sample_rate)

        return pick(order[: len(order) - n_eval]), (pick(order[len(order) - n_eval:]) if n_eval else None)

    def __len__(self) -> int:
        return len(self.clips)

    @property
    def seconds(self) -> float:
        return sum(len(c) for c in self.clips) / self.sample_rate

    def batch(self, batch_size: int, frames: int, gta_share: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """(audio [B, 1, frames * frame_size], codes [B, K, frames]): clips drawn in proportion to their length, a
        random whole-frame offset, the CSM's draw with probability gta_share (a random one of them), else the clip's
        own codes; short clips are zero-padded (audio) and padded with their last frame's codes."""
        idx = torch.multinomial(self.lengths, batch_size, replacement=True, generator=gen)
        k = self.true[0].shape[0]
        wav = torch.zeros(batch_size, 1, frames * self.frame_size)
        codes = torch.zeros(batch_size, k, frames, dtype=torch.long)
        for b, i in enumerate(idx.tolist()):
            n = self.true[i].shape[-1]
            start = int(torch.randint(0, max(1, n - frames + 1), (1,), generator=gen))
            src = self.true[i]
            if float(torch.rand((), generator=gen)) < gta_share:
                src = self.gta[i][int(torch.randint(0, self.gta[i].shape[0], (1,), generator=gen))]
            piece = src[:, start: start + frames]
            codes[b, :, : piece.shape[-1]] = piece
            codes[b, :, piece.shape[-1]:] = piece[:, -1:]
            audio = self.clips[i][start * self.frame_size: (start + frames) * self.frame_size]
            wav[b, 0, : len(audio)] = audio
        return wav, codes


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

    def forward_decoder_only(self, wav: Tensor) -> dict[str, Tensor]:
        """The inference condition: frozen codes from all codebooks -> the trainable decoder side."""
        with torch.no_grad():
            codes = self.mimi.quantizer.encode(self.mimi.encode_latent(wav))
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


# --- schedule, checkpoints ------------------------------------------------------------------------------------------


def _gen(seed: int, step: int, what: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_000_007 + step * 1_009 + what * 7_919) % 2**63)


def save_codec(model: CodecModel, path: str | os.PathLike) -> Path:
    """model.safetensors + config.json, loadable with `csm.mimi.load_mimi(path)`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(model.export_state_dict(), str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(mimi_config_json(model.cfg), indent=2) + "\n")
    return path


def save_training_checkpoint(cfg: CodecTrainConfig, model: CodecModel, opt: torch.optim.Optimizer,
                             disc: nn.Module | None, disc_opt: torch.optim.Optimizer | None, step: int,
                             train_seconds: float = 0.0) -> Path:
    final = Path(cfg.out) / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_codec(model, tmp)
    state = {"step": step, "train_seconds": train_seconds, "optimizer": opt.state_dict(),
             "config": dataclasses.asdict(cfg)}
    if disc is not None:
        state["discriminator"] = disc.state_dict()
        state["disc_optimizer"] = disc_opt.state_dict()
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if cfg.keep_checkpoints > 0:
        for old in checkpoint_dirs(Path(cfg.out))[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _model_config(cfg: CodecTrainConfig) -> MimiConfig:
    if cfg.model_config:
        from ..mimi.weights import config_from_json

        d = json.loads(Path(cfg.model_config).read_text())
        # A bare dict of transformers MimiConfig fields counts as one (config_from_json would fall back to kyutai/mimi).
        return config_from_json(d) if "model_type" in d or "codec_config" in d else MimiConfig.from_transformers(d)
    return codec_config(cfg.preset)


# --- evaluation ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: CodecModel, clips: list[Tensor], device: torch.device, val_mel: ValMel,
             codebook_counts: tuple[int, ...] | None = None) -> dict[str, float]:
    """Held-out clips through the inference path (Mimi.encode -> decode): log-mel L1, SNR, code usage.

    `val_mel_l1` uses all codebooks; `val_mel_l1_nK` K codebooks; `val_snr` is the SNR in dB of the decoded waveform;
    `val_code_perplexity` the mean over codebooks of exp(entropy of code usage) (codebook_size at most)."""
    model.eval()
    model.sync_codebooks()
    c = model.cfg
    counts = codebook_counts or (c.num_codebooks, max(c.num_semantic, c.num_codebooks // 2), c.num_semantic)
    counts = tuple(dict.fromkeys(counts))
    mel = {n: 0.0 for n in counts}
    sig = noise = 0.0
    usage = torch.zeros(c.num_codebooks, c.codebook_size)
    for clip in clips:
        x = clip.to(device)[None, None]
        codes = model.mimi.encode(x)
        usage += F.one_hot(codes[0].cpu(), c.codebook_size).sum(1).float()
        for n in counts:
            y = model.mimi.decode(codes[:, :n])[..., : x.shape[-1]]
            mel[n] += float(val_mel(y[0], x[0]))
            if n == c.num_codebooks:
                sig += float(x.square().sum())
                noise += float((x - y).square().sum())
    p = usage / usage.sum(1, keepdim=True).clamp(min=1)
    perplexity = torch.exp(-(p * p.clamp(min=1e-12).log()).sum(1)).mean()
    out = {"val_mel_l1": mel[c.num_codebooks] / len(clips)}
    out.update({f"val_mel_l1_n{n}": mel[n] / len(clips) for n in counts if n != c.num_codebooks})
    out["val_snr"] = 10 * math.log10(max(sig, 1e-12) / max(noise, 1e-12))
    out["val_code_perplexity"] = float(perplexity)
    model.train()
    return out


@torch.no_grad()
def evaluate_codes(model: CodecModel, held_out: CodeSet, device: torch.device, val_mel: ValMel,
                   max_frames: int) -> dict[str, float]:
    """Held-out clips decoded from the CSM's first draw: `val_gta_mel_l1`, the log-mel L1 against the clip."""
    model.eval()
    model.sync_codebooks()
    total = 0.0
    for clip, gta in zip(held_out.clips, held_out.gta):
        codes = gta[0][:, :max_frames].to(device)[None]
        x = clip[: codes.shape[-1] * held_out.frame_size].to(device)
        y = model.mimi.decode(codes)[0, :, : len(x)]
        total += float(val_mel(y, x[None]))
    model.train()
    return {"val_gta_mel_l1": total / len(held_out)}


# --- the loop -----------------------------------------------------------------------------------------------------


def training_step(model: CodecModel, wav: Tensor, cfg: CodecTrainConfig, step: int, mel_loss: MultiScaleMelLoss,
                  disc: MultiScaleSTFTDiscriminator | None = None, codes: Tensor | None = None,
                  ) -> tuple[Tensor, dict[str, float]]:
    """Forward + loss of one batch (updates the EMA codebooks unless decoder-only; `codes` [B, K, F]: decode these
    instead of encoding the audio). -> (total generator loss, scalar metrics)."""
    c, B = model.cfg, wav.shape[0]
    if codes is not None:
        out = model.forward_codes(codes)
    elif cfg.decoder_only:
        out = model.forward_decoder_only(wav)
    else:
        g = _gen(cfg.seed, step, 1)
        drop = torch.rand(B, generator=g) < cfg.quantizer_dropout
        n_rand = torch.randint(c.num_semantic, c.num_codebooks + 1, (B,), generator=g)
        num_used = torch.where(drop, n_rand, torch.full_like(n_rand, c.num_codebooks)).to(wav.device)
        quantize = (torch.rand(B, generator=g) < cfg.quantize_prob).to(wav.device)
        out = model(wav, num_used, quantize, cfg)
    recon = out["recon"]
    mel = mel_loss(recon, wav)
    wav_l1 = F.l1_loss(recon, wav)
    loss = cfg.mel_weight * mel + cfg.wav_weight * wav_l1 + cfg.commit_weight * out["commit"]
    metrics = {"mel_loss": mel.item(), "wav_l1": wav_l1.item(), "commit": out["commit"].item(),
               "replaced": int(out["replaced"])}
    if disc is not None and step >= cfg.adv_start:
        adv, feat = generator_adv_losses(disc, wav, recon)
        loss = loss + cfg.adv_weight * adv + cfg.feat_weight * feat
        metrics.update(adv=adv.item(), feat=feat.item())
    return loss, metrics | {"_recon": recon}


def train_codec(cfg: CodecTrainConfig, *, clips: ClipSet | None = None, eval_clips: list[Tensor] | None = None,
                ) -> list[dict]:
    """Train as configured; returns the logged records (also in out/log.jsonl). `clips`/`eval_clips` bypass
    `cfg.data` (tests)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":  # crops have one fixed shape: let cuDNN pick its fastest kernels; TF32 matmuls
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(cfg.out)
    resume_dir = find_resume_dir(cfg) if cfg.resume else None
    state = torch.load(resume_dir / STATE_FILE, weights_only=True) if resume_dir else None

    if cfg.init and resume_dir:
        raise ValueError("give --init (start a new run from a codec) or --resume (continue a run), not both")
    start_dir = resume_dir or (Path(cfg.init) if cfg.init else None)
    if start_dir and not (start_dir / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{start_dir}: no {WEIGHTS_FILE} (expected a train-codec step-NNNNNN/ or codec directory)")
    if cfg.decoder_only and start_dir is None:
        raise ValueError("--decoder-only fine-tunes a trained codec: give --init DIR (or --resume)")
    from_codes = is_code_folder(cfg.data)
    if from_codes and not cfg.decoder_only:
        raise ValueError(f"{cfg.data} holds codes (scripts/gta_codes.py): they train the decoder alone, add "
                         "--decoder-only")
    if not 0.0 <= cfg.gta_share <= 1.0:
        raise ValueError(f"--gta-share must be in [0, 1], got {cfg.gta_share}")
    mimi_cfg = _model_config(cfg)
    if start_dir:
        mimi_cfg = _model_config(replace(cfg, model_config=str(start_dir / CONFIG_FILE)))
    torch.manual_seed(cfg.seed)
    model = CodecModel(mimi_cfg)
    if start_dir:
        from safetensors.torch import load_file

        weights = load_file(str(start_dir / WEIGHTS_FILE))
        if resume_dir:  # our own checkpoint: the EMA state must be there and is restored exactly
            model.load_export(weights)
        else:
            model.load_codec(weights)
    if cfg.decoder_only:
        model.freeze_encoder_side()
    model.to(device).train()
    sr, frame = mimi_cfg.sample_rate, mimi_cfg.frame_size

    code_set = held_codes = None
    if from_codes and clips is None:  # clips, codes and the held-out split all come from the codes folder
        code_set, held_codes = CodeSet.load(cfg.data, sr, frame, cfg.progress).split(cfg.eval_clips, cfg.seed)
        clips, eval_clips = code_set, held_codes.clips if held_codes else []
    if clips is None:
        paths = audio_paths(cfg.data)
        order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_eval = min(cfg.eval_clips, max(0, len(paths) - 1))
        train_paths = [paths[i] for i in order[: len(paths) - n_eval]]
        if cfg.max_clips:
            train_paths = train_paths[: cfg.max_clips]
        eval_paths = [paths[i] for i in order[len(paths) - n_eval:]]
        clips = ClipSet.load(train_paths, sr, cfg.progress)
        eval_clips = ClipSet.load(eval_paths, sr).clips if eval_paths else []
    eval_len = max(frame, int(cfg.eval_seconds * sr) // frame * frame)
    eval_clips = [e[: max(frame, min(len(e), eval_len) // frame * frame)] for e in (eval_clips or [])]

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    disc = disc_opt = None
    if cfg.adversarial:
        torch.manual_seed(cfg.seed + 1)
        disc = MultiScaleSTFTDiscriminator().to(device).train()
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9))
    step, train_seconds = 0, 0.0
    if state is not None:
        step, train_seconds = state["step"], state.get("train_seconds", 0.0)
        opt.load_state_dict(state["optimizer"])
        if disc is not None:
            if "discriminator" not in state:
                raise ValueError(f"{resume_dir} was trained without --adversarial: no discriminator to resume")
            disc.load_state_dict(state["discriminator"])
            disc_opt.load_state_dict(state["disc_optimizer"])

    mel_loss = MultiScaleMelLoss(sr, parse_mel_scales(cfg.mel_scales), cfg.mel_floor).to(device)
    val_mel = ValMel(sr).to(device)
    n_params = sum(p.numel() for p in model.mimi.parameters())
    out.mkdir(parents=True, exist_ok=True)
    print(f"csm train-codec: {n_params / 1e6:.2f}M parameters, {mimi_cfg.num_codebooks} codebooks x "
          f"{mimi_cfg.codebook_size}, {mimi_cfg.frame_rate:g} Hz; {len(clips)} training clips "
          f"({clips.seconds / 60:.1f} min), {len(eval_clips)} held-out; crops of {cfg.segment_frames * frame} samples "
          f"x {cfg.batch_size}; {device}" + (f"; resuming at step {step} from {resume_dir}" if resume_dir else ""),
          file=sys.stderr, flush=True)

    records: list[dict] = []
    watch = Watch(out, cfg.steps, step, "train-codec", cfg.progress, cfg.tensorboard)
    window: dict[str, float] = {}
    n_window, t0 = 0, time.perf_counter()
    last_saved = step if resume_dir else -1
    length = cfg.segment_frames * frame
    budget = cfg.max_minutes * 60
    out_of_time = False
    while step < cfg.steps and not out_of_time:
        t_step = time.perf_counter()
        torch.manual_seed((cfg.seed * 1_000_003 + step * 1_009) % 2**63)  # dead-code sampling, initialisation
        codes = None
        if code_set is not None:
            wav, codes = code_set.batch(cfg.batch_size, cfg.segment_frames, cfg.gta_share, _gen(cfg.seed, step, 0))
            wav, codes = wav.to(device), codes.to(device)
        else:
            wav = clips.batch(cfg.batch_size, length, _gen(cfg.seed, step, 0)).to(device)
        lr = lr_at(cfg, step, train_seconds / budget if budget else 0.0)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, metrics = training_step(model, wav, cfg, step, mel_loss, disc, codes)
        recon = metrics.pop("_recon")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        opt.step()
        if disc is not None and step >= cfg.adv_start:
            d_loss = discriminator_loss(disc, wav, recon)
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
            metrics["disc_loss"] = d_loss.item()
        metrics.update(loss=loss.item(), grad_norm=grad_norm.item())
        for k, v in metrics.items():
            window[k] = window.get(k, 0.0) + v
        n_window += 1
        step += 1
        train_seconds += time.perf_counter() - t_step
        out_of_time = bool(budget) and train_seconds >= budget
        last = step == cfg.steps or out_of_time
        watch.step(loss=metrics["loss"], mel=metrics["mel_loss"])

        record = None
        if step % cfg.log_every == 0 or last:
            elapsed = time.perf_counter() - t0
            record = {"step": step, **{k: (v if k == "replaced" else v / n_window) for k, v in window.items()},
                      "lr": lr, "seconds_per_step": elapsed / n_window}
            window, n_window, t0 = {}, 0, time.perf_counter()
        paused = time.perf_counter()
        if eval_clips and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
            record = {"step": step, **(record or {}), **evaluate(model, eval_clips, device, val_mel)}
            if held_codes is not None:
                record.update(evaluate_codes(model, held_codes, device, val_mel, eval_len // frame))
            _listen(watch, model, eval_clips[:2], device, step)
        if record is not None:
            record["time"] = time.time()
            record["train_minutes"] = train_seconds / 60
            records.append(record)
            _log(out, record, watch)
        if ((cfg.save_every and step % cfg.save_every == 0) or last) and step != last_saved:
            model.sync_codebooks()
            path = save_training_checkpoint(cfg, model, opt, disc, disc_opt, step, train_seconds)
            last_saved = step
            watch.print(f"saved {path}")
        t0 += time.perf_counter() - paused
    watch.close()
    return records


@torch.no_grad()
def _listen(watch: Watch, model: CodecModel, clips: list[Tensor], device: torch.device, step: int) -> None:
    """Held-out clips and their resynthesis, to hear in TensorBoard."""
    if watch.writer is None:
        return
    model.eval()
    for i, clip in enumerate(clips):
        x = clip.to(device)[None, None]
        watch.audio(step, f"original/{i}", x, model.cfg.sample_rate)
        watch.audio(step, f"decoded/{i}", model.mimi.decode(model.mimi.encode(x))[..., : x.shape[-1]],
                    model.cfg.sample_rate)
    model.train()


def _log(out: Path, record: dict, watch: Watch) -> None:
    with open(out / LOG_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    parts = [f"step {record['step']}"]
    for key in ("loss", "mel_loss", "commit", "replaced", "lr", "grad_norm", "seconds_per_step", "val_mel_l1",
                "val_gta_mel_l1", "val_snr", "val_code_perplexity"):
        if key in record:
            v = record[key]
            parts.append(f"{key} {v:.2e}" if key == "lr" else f"{key} {v:.4g}")
    watch.print(" | ".join(parts))
    watch.scalars(record["step"], record)


# --- command line -------------------------------------------------------------------------------------------------

HELP = {
    **SCHEDULE_HELP,
    "data": "a .jsonl/.csv manifest (field: audio) or a folder of audio files, or several joined by commas; clips are "
            "loaded into memory. With --decoder-only also a scripts/gta_codes.py folder: the decoder learns to turn "
            "both the clips' codes and a CSM's ground-truth-aligned draws into their audio",
    "out": "output directory: checkpoints step-NNNNNN/ (load with csm.mimi.load_mimi) and log.jsonl",
    "preset": f"codec architecture: one of {sorted(CODEC_PRESETS)} or a csm.mimi preset",
    "model_config": "a transformers-style Mimi config.json instead of --preset",
    "segment_frames": "training crop length in 12.5 Hz frames (1920 samples each for the Mimi ratios)",
    "eval_clips": "held-out clips for validation",
    "eval_seconds": "validate on the first N seconds of each held-out clip",
    "quantizer_dropout": "probability that a clip trains with a random number of codebooks",
    "quantize_prob": "probability that a clip is quantized at all (Mimi: 0.5)",
    "dead_code_ratio": "replace codes used less than this fraction of the mean usage (0: never)",
    "mel_scales": "comma-separated STFT sizes of the multi-scale mel loss (hop = size / 4)",
    "mel_floor": "floor of the mel magnitudes before the log of the log-mel loss (default 3e-3, ~60 dB under "
                 "speech peaks; 1e-5 spends most of the loss on near-silent bins)",
    "init": "start from a trained codec's weights (a step-NNNNNN/ directory) with a fresh optimizer at step 0",
    "gta_share": "when --data is a scripts/gta_codes.py folder: probability that a crop decodes one of the CSM's draws instead of the clip's codes",
    "decoder_only": "fine-tune only the decoder side (upsample, decoder transformer, SEANet decoder) on the frozen "
                    "codes of all codebooks: codes already prepared for a CSM stay valid",
    "adversarial": "add a multi-scale STFT discriminator (hinge) + feature matching",
    "threads": "torch CPU threads (0: torch's default)",
    "tensorboard": "write TensorBoard events to OUT/tb (losses, held-out scores, held-out clips and their decoding)",
}


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    t = subparsers.add_parser("train-codec", help="train a small Mimi-architecture codec on raw audio")
    add_config_flags(t, CodecTrainConfig, HELP)
    t.set_defaults(func=_train_codec)


def _train_codec(args: argparse.Namespace) -> int:
    cfg = CodecTrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CodecTrainConfig)})
    train_codec(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m csm.train.codec")
    add_subcommand(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["train-codec", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
