"""Pass audio files through a codec (encode -> decode) to judge the codec on its own.

    python scripts/resynthesize.py runs/codec/step-004275 data/corpus/heldout out/resynth
    csm eval --wavs out/resynth/k8 --texts data/corpus/eval_sentences.txt --no-speaker   # Whisper WER of the codec

Writes OUT/k{N}/<name>.wav for each number of codebooks N used in decoding (all, half, 1 by default), with
`--latent` also OUT/latent/ (the encoder's latent straight to the decoder, no quantizer: what the quantizer costs),
and prints held-out log-mel L1 and SNR per variant as JSON: the same log-mel L1 that `csm train-codec` validates
with, and `quiet_share_48db`, the share of that L1 that comes from bins more than 48 dB under each clip's loudest
bin.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from csm.audio import load_audio, save_audio
from csm.mimi import load_mimi
from csm.train.codec_losses import ValMel


QUIET_DB = 48


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("codec", help="codec directory or hub id (anything csm.mimi.load_mimi reads)")
    p.add_argument("wavs", type=Path, help="folder of audio files")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--codebooks", default="", help="comma-separated codebook counts (default: all, half, 1)")
    p.add_argument("--latent", action="store_true", help="also decode the unquantized latent (OUT/latent)")
    args = p.parse_args()

    codec = load_mimi(args.codec)
    sr, k = codec.sample_rate, codec.num_codebooks
    counts = [int(n) for n in args.codebooks.split(",") if n] or sorted({k, k // 2, 1}, reverse=True)
    if not all(1 <= n <= k for n in counts):
        raise SystemExit(f"--codebooks must be between 1 and {k}")
    files = sorted(f for f in args.wavs.iterdir() if f.suffix.lower() in {".wav", ".flac", ".ogg"})
    if not files:
        raise SystemExit(f"no audio files in {args.wavs}")
    names = [f"k{n}" for n in counts] + (["latent"] if args.latent else [])
    for n in names:
        (args.out / n).mkdir(parents=True, exist_ok=True)
    val_mel = ValMel(sr)
    totals = {n: {"log_mel_l1": 0.0, "snr_db": 0.0} for n in names}
    quiet_err = {n: 0.0 for n in names}  # log-mel error in bins > QUIET_DB under each clip's loudest bin
    all_err = {n: 0.0 for n in names}
    for f in files:
        x = load_audio(f, sr)
        codes = codec.encode(x)
        outs = {f"k{n}": codec.decode(codes[:n]) for n in counts}
        if args.latent:
            outs["latent"] = codec.decode_latent(codec.encode_latent(x[None, None]))[0, 0]
        for n, y in outs.items():
            y = y[: len(x)]
            save_audio(args.out / n / f"{f.stem}.wav", y, sr)
            totals[n]["log_mel_l1"] += float(val_mel(y, x)) / len(files)
            totals[n]["snr_db"] += 10 * math.log10(float(x.square().sum()) / float((x - y).square().sum())) / len(files)
            ref, out = val_mel.mel(x), val_mel.mel(y)
            err = (out.clamp(min=1e-5).log() - ref.clamp(min=1e-5).log()).abs()
            quiet = ref < ref.max() * 10 ** (-QUIET_DB / 20)
            quiet_err[n] += float(err[quiet].sum())
            all_err[n] += float(err.sum())
    for n in names:  # where the validation metric's (and a 1e-5-floored loss') error lives
        totals[n][f"quiet_share_{QUIET_DB}db"] = quiet_err[n] / max(all_err[n], 1e-12)
    print(json.dumps({"files": len(files), **totals}, indent=1))


if __name__ == "__main__":
    main()
