#!/usr/bin/env python
"""How much does a trained CSM's backbone lean on the acoustic codes of past frames?

Teacher-forced codebook-0 accuracy on prepared data (`csm prepare` output) when the backbone reads the clean frames,
and when each acoustic code (codebooks 1..K-1) is swapped for another frame's with probability p (the training
noise of `csm train --code-noise`), or all of them are. At generation time the backbone reads the decoder's sampled
acoustic codes, so a model whose accuracy collapses under swapping drifts off in free-running generation; the last
column measures that directly: the share of frames where greedy generation of the utterance alone (text prompt, no
context) reproduces the corpus' codebook 0.

    python scripts/probe_codes.py runs/voice/step-002000 data/prepared --examples 40
"""

from __future__ import annotations

import argparse

import torch

from csm.checkpoints import load_checkpoint
from csm.generate import Generator
from csm.tokenizer import TextTokenizer
from csm.train.data import load_corpus, noisy_codes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("data", help="prepared directory (or several, comma-separated)")
    p.add_argument("--examples", type=int, default=40, help="conversations to score (spread over the corpus)")
    p.add_argument("--greedy", type=int, default=8, help="first turns to generate greedily (0: skip)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_checkpoint(args.model, dtype=torch.float32)
    k = model.cfg.audio_num_codebooks
    corpus = load_corpus(args.data, model.cfg.backbone.max_seq_len, k)
    picks = torch.linspace(0, len(corpus.examples) - 1, args.examples).long().unique().tolist()
    rates = {"clean": 0.0, "swap p=0.25": 0.25, "swap p=0.5": 0.5, "swap all": 1.0}
    hits = {name: [] for name in rates}
    g = torch.Generator().manual_seed(0)
    for ex in picks:
        tokens, mask = corpus.frames(ex)
        target = mask[1:, :k].any(-1)
        for name, rate in rates.items():
            seen = noisy_codes(tokens[None], mask[None], k, rate, g)
            with torch.no_grad():
                _, logits = model.backbone_forward(seen, mask[None], torch.arange(len(tokens))[None], None)
            hits[name].append(logits[0, :-1][target].argmax(-1) == tokens[1:, 0][target])
    report = {name: float(torch.cat(h).float().mean()) for name, h in hits.items()}
    if args.greedy:
        gen, agree = Generator(model, TextTokenizer.from_pretrained(args.model)), []
        for ex in picks[: args.greedy]:
            u = corpus.utterances[corpus.examples[ex][0]]
            n_text, n_audio = len(u.text), u.codes.shape[1]
            tokens, mask = corpus.frames(ex)
            codes = _greedy(gen, tokens[:n_text], mask[:n_text], n_audio)
            n = min(len(codes), n_audio)
            agree.append((codes[:n] == u.codes[0, :n].long()).float().sum() / n_audio)
        report["greedy"] = float(torch.stack(agree).mean())
    print(f"{args.model}: codebook-0 accuracy, teacher-forced ({len(picks)} conversations)")
    for name, v in report.items():
        label = "greedy free-running (first turns)" if name == "greedy" else f"acoustic codes {name}"
        print(f"  {label:<36} {100 * v:5.1f} %")


@torch.inference_mode()
def _greedy(gen: Generator, tokens: torch.Tensor, mask: torch.Tensor, n_audio: int) -> torch.Tensor:
    """Greedy codebook 0 of the generation that follows these prompt frames (the corpus' own text frames)."""
    from csm.generate import Request

    # the corpus stores token ids, not text: its frames are the prompt as they are
    request = Request("", max_audio_length_ms=80 * (n_audio + 10), temperature=0, frames=(tokens, mask))
    speech = gen.generate_batch([request])[0]
    return speech.codes[0]


if __name__ == "__main__":
    main()
