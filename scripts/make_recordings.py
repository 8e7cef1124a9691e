#!/usr/bin/env python
"""Make "raw recordings" of a speaker no corpus uses: long files of several sentences with pauses, no transcripts.

What a user brings to `csm prepare --transcribe` (docs/finetune.md), made offline so the fine-tuning recipe can be
measured on a voice the embedded model has never heard:

    python scripts/make_recordings.py data/joelow --voice joelow --minutes 10

Writes OUT/recordings/talk_NNN.wav (24 kHz mono, each about --file-seconds long: a conversation's lines read one
after another, 0.5-1.2 s of silence between them) and OUT/heldout.txt: the held-out sentences of make_corpus.py's
seed-1 corpus (the embedded voice's test set, never trained on), which the recordings never contain, to speak
before and after the fine-tune. The recordings' sentences come from the same text as that corpus (--text: the
fortunes of the phoneme voice's corpus, or the first voice's template grammar) in another order (--seed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import make_corpus as mc  # noqa: E402

SR = 24_000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--voice", default="joelow", help=f"one of {', '.join(mc.UNSEEN_VOICES)} (default joelow)")
    p.add_argument("--minutes", type=float, default=10.0, help="minutes of speech to make (default 10)")
    p.add_argument("--file-seconds", type=float, default=60.0, help="about how long each file is (default 60)")
    p.add_argument("--seed", type=int, default=9, help="seed of the recordings' text plan (default 9)")
    p.add_argument("--heldout-seed", type=int, default=1,
                   help="make_corpus.py seed whose 20 held-out sentences go to heldout.txt (default 1)")
    p.add_argument("--text", choices=["open", "grammar"], default="open",
                   help="what the recordings say: fortunes sentences (as make_corpus.py --text open, the embedded "
                        "voice's corpus) or the template grammar (default open)")
    args = p.parse_args(argv)
    if args.voice not in mc.UNSEEN_VOICES:
        p.error(f"--voice must be one of {', '.join(mc.UNSEEN_VOICES)}")
    voice = mc.UNSEEN_VOICES[args.voice]
    mc.check_tools([0] if voice.engine == "piper" else [1])  # a corpus speaker of the same engine stands in

    heldout = mc.plan(args.heldout_seed, list(range(len(mc.VOICES))), 0, None, 20, text=args.text)[0]
    # ~3 s a line: plan twice the lines needed, then stop at --minutes
    _, utts, _ = mc.plan(args.seed, [0], int(args.minutes * 60 / 3 * 2), None, 0, exclude=set(heldout),
                         text=args.text)
    (args.out / "recordings").mkdir(parents=True, exist_ok=True)
    (args.out / "heldout.txt").write_text("".join(t + "\n" for t in heldout))

    rng = np.random.default_rng(args.seed)
    from tqdm import tqdm

    total, files, parts = 0.0, 0, []
    bar = tqdm(total=args.minutes * 60, desc=f"speaking as {voice.name}",
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s")

    def flush() -> None:
        nonlocal files, parts
        if parts:
            import soundfile as sf

            sf.write(args.out / "recordings" / f"talk_{files:03d}.wav", np.concatenate(parts), SR, subtype="PCM_16")
            files, parts = files + 1, []

    for u in utts:
        if total >= args.minutes * 60:
            break
        wav = mc.postprocess(*mc.synthesize(voice, u.text, u.speed, 0.0))
        parts += [wav, np.zeros(int(SR * rng.uniform(0.5, 1.2)), np.float32)]
        total += len(wav) / SR
        bar.update(min(len(wav) / SR, bar.total - bar.n))
        if sum(len(x) for x in parts) / SR >= args.file_seconds:
            flush()
    flush()
    bar.close()
    print(f"{total / 60:.1f} min of speech in {files} files under {args.out / 'recordings'}; "
          f"{len(heldout)} held-out lines in {args.out / 'heldout.txt'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
