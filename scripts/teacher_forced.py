#!/usr/bin/env python
"""Where does a voice lose intelligibility: the codec, the sampling, or free-running drift?

Each held-out clip (with its text and speaker) is encoded by the model's codec, and the CSM reads it teacher-forced:
the text frames, then the clip's true frames. For every audio frame the script keeps the backbone's hidden state and
codebook-0 logits given the *true* past, and writes the clip decoded five ways, one folder each:

    resynth       the true codes (the codec alone)
    c0-true       true codebook 0, acoustic codebooks greedy from the decoder
    c0-true-s     true codebook 0, acoustic codebooks sampled (top-k / temperature)
    c0-sampled    codebook 0 sampled from the backbone, acoustic codebooks greedy
    sampled       both sampled: free-running generation's choices, without its drift (the past stays true)

Score each folder with `csm eval --wavs OUT/NAME --texts TEXTS --no-speaker`; a gap between `sampled` and
`csm eval` of the same voice is what free-running adds. `--repeats N` writes the sampled folders N times
(NAME-rR, seed + 100 r), since on 20 clips one draw moves the WER by several points.

    python scripts/teacher_forced.py data/corpus30k/heldout data/corpus30k/eval_sentences.txt out/tf --repeats 3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from csm.audio import load_audio, save_audio
from csm.evaluate import pair_wavs
from csm.frames import Segment, segment_frames
from csm.engine import sample_topk
from csm.generate import load_generator
from csm.mimi import load_model_codec


def _draw(logits: torch.Tensor, topk: int, temperature: float, g: torch.Generator | None) -> torch.Tensor:
    """[N, V] -> [N] ids: greedy without a generator, else the generator's one sampling function."""
    if g is None:
        return logits.argmax(-1)
    return sample_topk(logits, topk, temperature, torch.empty_like(logits).exponential_(1, generator=g))[:, 0]


def fill_acoustic(model, h: torch.Tensor, c0: torch.Tensor, topk: int, temperature: float,
                  g: torch.Generator | None) -> torch.Tensor:
    """Codebooks 1..K-1 for frames whose hidden states are h [N, dim] and codebook 0 is c0 [N] -> codes [N, K]."""
    k = model.cfg.audio_num_codebooks
    codes = torch.zeros(len(c0), k, dtype=torch.long)
    codes[:, 0] = c0
    for i in range(1, k):  # the decoder is causal over codebooks: the zeros after i are not read
        codes[:, i] = _draw(model.decoder_logits(h, codes)[:, i - 1], topk, temperature, g)
    return codes


def load_voice(args: argparse.Namespace):
    """--model (default: the embedded voice) with its codec, on the CPU with --threads -> (generator, top-k,
    temperature), --topk / --temperature falling back to the model's generation.json."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from csm.assets import default_model

        args.model = default_model()
    codec = load_model_codec(args.model)
    if codec is None:
        raise SystemExit(f"{args.model} has no codec beside it")
    gen = load_generator(args.model, device="cpu", codec=codec)
    topk = gen.defaults["topk"] if args.topk is None else args.topk
    temperature = gen.defaults["temperature"] if args.temperature is None else args.temperature
    return gen, topk, temperature


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("wavs", help="folder of held-out clips NNN_spkS.wav (make_corpus.py's heldout/)")
    p.add_argument("texts", help="their sentences, one per line (or a jsonl with audio/text/speaker)")
    p.add_argument("out", type=Path)
    p.add_argument("--model", default=None, help="model directory with its codec (default: the embedded voice)")
    p.add_argument("--topk", type=int, default=None, help="default: the model's (generation.json)")
    p.add_argument("--temperature", type=float, default=None, help="default: the model's (generation.json)")
    p.add_argument("--repeats", type=int, default=1, help="draws of the sampled folders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num", type=int, default=0, help="only the first N clips")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    gen, topk, temperature = load_voice(args)
    m, k = gen.model, gen.num_codebooks
    items = pair_wavs(args.wavs, args.texts)[: args.num or None]
    for n, item in enumerate(items):
        codes = gen.encode_audio(load_audio(item.audio, sample_rate=gen.sample_rate))  # [K, F]
        tokens, mask = segment_frames(gen.tokenizer, Segment(item.speaker or 0, item.text, codes), k)
        h, logits = m.backbone_forward(tokens[None], mask[None])
        first = len(tokens) - codes.shape[1] - 2  # the last text frame predicts the first audio frame
        h, logits = h[0, first: first + codes.shape[1]], logits[0, first: first + codes.shape[1]]
        out = {"resynth": codes.T, "c0-true": fill_acoustic(m, h, codes[0], topk, temperature, None)}
        for r in range(args.repeats):
            suffix = f"-r{r}" if args.repeats > 1 else ""
            g = torch.Generator().manual_seed(args.seed + 100 * r + n)
            c0 = _draw(logits, topk, temperature, g)
            out["c0-true-s" + suffix] = fill_acoustic(m, h, codes[0], topk, temperature, g)
            out["c0-sampled" + suffix] = fill_acoustic(m, h, c0, topk, temperature, None)
            out["sampled" + suffix] = fill_acoustic(m, h, c0, topk, temperature, g)
        for name, frames in out.items():
            (args.out / name).mkdir(parents=True, exist_ok=True)
            save_audio(args.out / name / item.audio.name, gen.decode_audio(frames.T.contiguous()), gen.sample_rate)
        acc = float((logits.argmax(-1) == codes[0]).float().mean())
        print(f"[{n + 1}/{len(items)}] {item.audio.name}: greedy codebook 0 matches the clip at {100 * acc:.0f} % "
              "of frames", flush=True)
    print(f"wrote {', '.join(sorted(p.name for p in args.out.iterdir() if p.is_dir()))} under {args.out}")


if __name__ == "__main__":
    main()
