"""Write a random-weight CSM checkpoint (plus a small tokenizer and a small random Mimi codec in `codec/`) for
smoke tests and demos.

    python scripts/make_tiny_checkpoint.py tiny-ckpt              # preset "tiny", our layout
    python scripts/make_tiny_checkpoint.py out --layout transformers --preset tiny
    csm say "Hello there." --model tiny-ckpt -o hello.wav

The weights are random: the result sounds like noise. It exercises loading, tokenizing, generation and audio
decoding end to end.
"""

from __future__ import annotations

import argparse

import torch

from dataclasses import replace

from csm.checkpoints import LAYOUTS, save_checkpoint
from csm.config import get_config
from csm.mimi import Mimi, preset, save_mimi
from csm.model import CSM
from csm.tokenizer import train_tokenizer

SENTENCES = [
    "Hello there, how are you doing today?",
    "I'm fine, thanks. And you?",
    "The quick brown fox jumps over the lazy dog.",
    "Could you tell me the way to the station, please?",
    "It is twenty past seven in the morning.",
    "We should meet again next week.",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="directory to write")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layout", default="csm", choices=LAYOUTS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-codec", action="store_true", help="skip the random codec (csm say then writes codes)")
    args = p.parse_args()

    cfg = get_config(args.preset)
    torch.manual_seed(args.seed)
    model = CSM(cfg)
    tokenizer = train_tokenizer(SENTENCES * 4, vocab_size=min(cfg.text_vocab_size, 512))
    out = save_checkpoint(model, args.output, layout=args.layout)
    tokenizer.save(out / "tokenizer.json")
    if not args.no_codec:
        # Mimi's structure at small sizes, with as many codebooks and entries as the CSM expects.
        codec_cfg = replace(preset("small"), num_codebooks=cfg.audio_num_codebooks, codebook_size=cfg.audio_vocab_size - 3)
        save_mimi(Mimi(codec_cfg), out / "codec")
    print(f"wrote {args.preset} ({model.num_parameters() / 1e6:.1f} M parameters, {args.layout} layout) to {out}")


if __name__ == "__main__":
    main()
