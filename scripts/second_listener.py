"""A second opinion on a judge's picks: the same saved draws, transcribed by pocketsphinx instead of Whisper.

A judge tuned on Whisper's transcripts (`csm train-judge` with judge_check.py JSONs) may learn Whisper's taste rather
than clearer speech. pocketsphinx (PyPI; CMU's recogniser with its own US English model) has no Whisper in it: if it
too hears a judge's picks as clearer than another judge's, the gain is the speech's. It is a much weaker listener
of a tiny voice, so compare picks of the same draws, never its WER with Whisper's.

    pip install pocketsphinx
    python scripts/second_listener.py runs/jc2-nc0-8.json --judges runs/judge2,runs/ft5 --json second.json
    python scripts/second_listener.py second.json --judges runs/judge2,runs/ft5   # the saved transcripts, re-scored

The input is a `scripts/judge_check.py --json` output (every draw's codes and Whisper's word errors); ~0.7 s a draw
on 2 cores (decode + pocketsphinx). Prints, for picks of the first 4 and of all draws: the WER by Whisper and by
pocketsphinx of the average draw, of each judge's pick and of each recogniser's favourite, then a paired bootstrap
over lines of each judge against the first one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from csm.evaluate import edit_distance, normalize_text, to_16k


def pick(scores: list[float], n: int) -> int:
    """Index of the lowest score among the first n (what best_of n keeps)."""
    return min(range(n), key=lambda i: scores[i])


def pick_table(rows: list[dict], judges: list[str], n: int) -> dict[str, tuple[float, float]]:
    """(Whisper WER, pocketsphinx WER) of the average draw, each judge's pick and each recogniser's favourite, over
    the first n draws of every row (rows hold "errors" and "ps": word errors per draw, "words", and a score list per
    judge name)."""
    words = sum(r["words"] for r in rows)

    def wer_of(choose) -> tuple[float, float]:
        chosen = [(r, choose(r)) for r in rows]
        return (sum(r["errors"][i] for r, i in chosen) / words, sum(r["ps"][i] for r, i in chosen) / words)

    table = {"average draw": (sum(statistics.mean(r["errors"][:n]) for r in rows) / words,
                              sum(statistics.mean(r["ps"][:n]) for r in rows) / words)}
    for name in judges:
        table[name] = wer_of(lambda r: pick(r[name], n))
    table["best by Whisper"] = wer_of(lambda r: pick(r["errors"], n))
    table["best by pocketsphinx"] = wer_of(lambda r: pick(r["ps"], n))
    return table


def paired_bootstrap(rows: list[dict], base: str, other: str, n: int, metric: str, samples: int = 2000,
                     seed: int = 0) -> tuple[float, float, float, float]:
    """WER of `other`'s picks minus `base`'s by `metric` ("errors": Whisper, "ps": pocketsphinx), its 95 % interval
    over lines resampled with replacement, and the share of resamples where `other` is better."""
    diff = [r[metric][pick(r[other], n)] - r[metric][pick(r[base], n)] for r in rows]
    words = [r["words"] for r in rows]
    rng = random.Random(seed)
    stats = []
    for _ in range(samples):
        idx = [rng.randrange(len(rows)) for _ in rows]
        stats.append(sum(diff[i] for i in idx) / sum(words[i] for i in idx))
    stats.sort()
    return (sum(diff) / sum(words), stats[int(0.025 * samples)], stats[int(0.975 * samples) - 1],
            sum(s < 0 for s in stats) / samples)


def agreement(rows: list[dict]) -> tuple[float, int]:
    """How often the two recognisers order a pair of draws alike, over the pairs both hear differently."""
    same = total = 0
    for r in rows:
        for i, j in itertools.combinations(range(len(r["errors"])), 2):
            if r["errors"][i] != r["errors"][j] and r["ps"][i] != r["ps"][j]:
                total += 1
                same += (r["errors"][i] < r["errors"][j]) == (r["ps"][i] < r["ps"][j])
    return (same / total if total else float("nan")), total


def transcribe(rows: list[dict], model: str | None) -> None:
    """Decode every draw with the voice's codec and add pocketsphinx's transcript ("ps_hyps") and word errors
    ("ps") to its row."""
    try:
        from pocketsphinx import Decoder
    except ImportError as e:
        raise SystemExit("second_listener.py needs pocketsphinx: pip install pocketsphinx") from e
    import numpy as np

    from csm.assets import default_model
    from csm.generate import load_generator
    from csm.mimi import load_model_codec

    model = model or default_model()
    gen = load_generator(model, device="cpu", codec=load_model_codec(model, device="cpu"))
    decoder = Decoder(samprate=16000, loglevel="FATAL")
    for r in tqdm(rows, desc="pocketsphinx", unit="line"):
        r["ps"], r["ps_hyps"] = [], []
        for codes in r["codes"]:
            audio = gen.decode_audio(torch.tensor(codes))
            pcm = (np.clip(to_16k(audio.numpy(), gen.sample_rate), -1, 1) * 32767).astype(np.int16).tobytes()
            decoder.start_utt()
            decoder.process_raw(pcm, full_utt=True)
            decoder.end_utt()
            hyp = decoder.hyp().hypstr if decoder.hyp() else ""
            r["ps_hyps"].append(hyp)
            r["ps"].append(edit_distance(normalize_text(r["text"]).split(), normalize_text(hyp).split()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("draws", help="a judge_check.py --json output, or this script's own --json output")
    p.add_argument("--judges", required=True, help="comma-separated judge folders; the first is the baseline")
    p.add_argument("--model", default=None, help="the voice whose codec decodes the draws (default: the embedded one)")
    p.add_argument("--json", default=None, help="write the rows with pocketsphinx's transcripts and judges' scores")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = json.loads(Path(args.draws).read_text())
    rows = data["rows"] if isinstance(data, dict) else data
    if not rows or "codes" not in rows[0] or "errors" not in rows[0]:
        raise SystemExit(f"{args.draws}: not a judge_check.py --json output (no rows with codes and errors)")
    if "ps" not in rows[0]:
        transcribe(rows, args.model)
    from csm.judge import load_judge

    names = [j for j in args.judges.split(",") if j]
    for name in names:
        judge = load_judge(name)
        for r in rows:
            r[name] = judge.rank([torch.tensor(c) for c in r["codes"]], r["text"])
    draws = min(len(r["errors"]) for r in rows)
    for n in sorted({min(4, draws), draws}):
        print(f"pick of {n} draws ({len(rows)} lines): WER by Whisper / by pocketsphinx")
        for what, (w, s) in pick_table(rows, names, n).items():
            print(f"  {what:<28} {100 * w:5.1f} / {100 * s:5.1f} %")
        for other in names[1:]:
            for metric, label in (("errors", "Whisper"), ("ps", "pocketsphinx")):
                d, lo, hi, better = paired_bootstrap(rows, names[0], other, n, metric)
                print(f"  {other} - {names[0]} by {label}: {100 * d:+.1f} points (95 % {100 * lo:+.1f} .. "
                      f"{100 * hi:+.1f}), better in {100 * better:.0f} % of resamples")
    share, pairs = agreement(rows)
    print(f"the recognisers order {100 * share:.1f} % of {pairs} pairs of draws alike")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
