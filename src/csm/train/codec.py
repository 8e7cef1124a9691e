"""Training a small Mimi-architecture codec from scratch (`csm train-codec`).

The model is `csm.mimi.Mimi` itself (SEANet encoder -> transformer -> strided conv -> split RVQ -> transposed conv ->
transformer -> SEANet decoder, 24 kHz, 12.5 Hz frames); only the quantizer gets a training-mode twin
(codec_model.py; its data and losses are in codec_data.py and codec_losses.py):

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
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..mimi import MimiConfig, PRESETS as MIMI_PRESETS
from ..mimi.weights import mimi_config_json
from .cli import SCHEDULE_HELP, add_config_flags
from .codec_data import ClipSet, CodeSet, audio_paths, is_code_folder
from .codec_losses import (MultiScaleMelLoss, MultiScaleSTFTDiscriminator, ValMel, discriminator_loss,
                           generator_adv_losses, parse_mel_scales)
from .codec_model import CodecModel
from .rundir import LOG_FILE, STATE_FILE, begin_checkpoint, commit, find_resume_dir
from .train import lr_at
from .watch import Watch

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
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
    decode_codebooks: int = 0  # decoder-only: decode from the first K codebooks, as a CSM of K codebooks does (0: all)
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
    decay_steps: int = 0  # >0: constant lr, cosine to min_lr over the last N steps only (see lr_at)
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
    tmp = begin_checkpoint(cfg.out, step)
    save_codec(model, tmp)
    state = {"step": step, "train_seconds": train_seconds, "optimizer": opt.state_dict(),
             "config": dataclasses.asdict(cfg)}
    if disc is not None:
        state["discriminator"] = disc.state_dict()
        state["disc_optimizer"] = disc_opt.state_dict()
    torch.save(state, tmp / STATE_FILE)
    return commit(tmp, cfg.keep_checkpoints)


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
        out = model.forward_decoder_only(wav, cfg.decode_codebooks or c.num_codebooks)
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
    metrics = {"mel_loss": mel.item(), "wav_l1": wav_l1.item()}
    if codes is None and not cfg.decoder_only:  # a frozen quantizer has no commitment loss and replaces no codes
        metrics.update(commit=out["commit"].item(), replaced=int(out["replaced"]))
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
    resume_dir = find_resume_dir(cfg.resume, cfg.out) if cfg.resume else None
    state = torch.load(resume_dir / STATE_FILE, weights_only=True) if resume_dir else None

    if cfg.init and resume_dir:
        raise ValueError("give --init (start a new run from a codec) or --resume (continue a run), not both")
    start_dir = resume_dir or (Path(cfg.init) if cfg.init else None)
    if start_dir and not (start_dir / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{start_dir}: no {WEIGHTS_FILE} (expected a train-codec step-NNNNNN/ or codec directory)")
    if cfg.decoder_only and start_dir is None:
        raise ValueError("--decoder-only fine-tunes a trained codec: give --init DIR (or --resume)")
    from_codes = is_code_folder(cfg.data)
    if cfg.decode_codebooks and not cfg.decoder_only:
        raise ValueError("--decode-codebooks fine-tunes the decoder alone: add --decoder-only")
    if from_codes and not cfg.decoder_only:
        raise ValueError(f"{cfg.data} holds codes (scripts/gta_codes.py): they train the decoder alone, add "
                         "--decoder-only")
    if not 0.0 <= cfg.gta_share <= 1.0:
        raise ValueError(f"--gta-share must be in [0, 1], got {cfg.gta_share}")
    mimi_cfg = _model_config(cfg)
    if start_dir:
        mimi_cfg = _model_config(replace(cfg, model_config=str(start_dir / CONFIG_FILE)))
    if not 0 <= cfg.decode_codebooks <= mimi_cfg.num_codebooks:
        raise ValueError(f"--decode-codebooks {cfg.decode_codebooks}: this codec has {mimi_cfg.num_codebooks} codebooks")
    torch.manual_seed(cfg.seed)
    model = CodecModel(mimi_cfg)
    if start_dir:
        from ..checkpoints import load_state_dict_file

        weights = load_state_dict_file(start_dir / WEIGHTS_FILE)  # a packaged codec's int8 rows come back as float32
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
    "decode_codebooks": "with --decoder-only: decode from the first K codebooks only (the K a voice's CSM "
                        "generates, e.g. 8), so the decoder learns the condition it is used in (0: all)",
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
