"""Does a judge pick clearer draws than chance? A paired check on the very same draws.

Every held-out sentence is drawn N times per seed (one batch, as `best_of` does), every draw is decoded and
transcribed by Whisper, and the judge scores every draw. Reported, over the same draws: the WER of draw 0 (what
best_of 1 would give), of the judge's pick, of the mean draw, and of the best draw by Whisper itself (the ceiling
of any picker), plus how often the judge's pick is at least as good as the median draw.

    python scripts/judge_check.py --texts data/corpus30k/eval_sentences.txt --judge runs/judge --draws 4 \\
        --seeds 0,100,200 --json out.json [--model DIR] [--corpus MANIFEST: a context turn of each speaker in turn]

The JSON keeps every draw's codes, word errors and Whisper transcript, so another judge is compared on the same
draws in seconds, and draws of lines outside the eval are training data for the judge (`csm train-judge --data
...,out.json`, each draw labelled with what Whisper heard):

    python scripts/judge_check.py --rescore out.json --judge runs/other-judge
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from csm.evaluate import choose_clips, context_clip, context_turn, line_budget_ms, read_corpus, read_texts
from csm.generate import load_generator
from csm.metrics import Transcriber, edit_distance, normalize_text
from csm.judge import draws as judge_draws
from csm.judge import load_judge
from csm.mimi import load_model_codec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", default=None)
    p.add_argument("--rescore", default=None, metavar="JSON", help="a previous run's --json: score its draws again")
    p.add_argument("--judge", required=True)
    p.add_argument("--model", default=None, help="default: the embedded voice")
    p.add_argument("--corpus", default=None, help="make_corpus.py manifest: a context turn per line, as csm eval")
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--seeds", default="0,100,200")
    p.add_argument("--num", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.rescore:
        rows = json.loads(Path(args.rescore).read_text())["rows"]
        judge = load_judge(args.judge)
        for r in rows:
            r["scores"] = judge.rank([torch.tensor(c) for c in r["codes"]], r["text"])
        return report(rows, None)
    if args.texts is None:
        p.error("give --texts (or --rescore)")
    if args.model is None:
        from csm.assets import default_model

        args.model = default_model()
    gen = load_generator(args.model, device="cpu", codec=load_model_codec(args.model, device="cpu"))
    judge = load_judge(args.judge)
    whisper = Transcriber(threads=args.threads)
    texts = read_texts(args.texts)[: args.num]
    corpus = read_corpus(args.corpus) if args.corpus else None
    speakers = sorted({c.speaker for c in corpus}) if corpus else [gen.defaults["speaker"]]
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        contexts = choose_clips(corpus, speakers, 10, len(texts), seed)[1] if corpus else {}
        for i, text in enumerate(texts):
            spk = speakers[i % len(speakers)]
            context = [context_turn(gen, context_clip(contexts, speakers, i))] if contexts else []
            words = len(normalize_text(text).split())
            req = gen.request(text, spk, context, line_budget_ms(text), seed=seed + i)
            draws = judge_draws(gen, req, args.draws)
            scores = judge.rank(draws, req.text)
            errors, hyps = [], []
            for codes in draws:
                audio = gen.decode_audio(codes)
                hyp = whisper(audio.numpy(), gen.sample_rate) if audio is not None else ""
                hyps.append(hyp)
                errors.append(edit_distance(normalize_text(text).split(), normalize_text(hyp).split()))
            rows.append({"seed": seed, "i": i, "speaker": spk, "words": words, "text": req.text, "scores": scores,
                         "errors": errors, "hyps": hyps, "codes": [c.tolist() for c in draws]})
            print(f"seed {seed} line {i}: errors {errors} judge {[round(s, 2) for s in scores]}", file=sys.stderr)
    report(rows, args.json)


def report(rows: list[dict], json_path: str | None) -> None:
    total, draws = sum(r["words"] for r in rows), len(rows[0]["errors"])
    pick = [r["errors"][min(range(draws), key=r["scores"].__getitem__)] for r in rows]
    summary = {
        "lines": len(rows), "draws": draws,
        "wer_draw0": sum(r["errors"][0] for r in rows) / total,
        "wer_judge": sum(pick) / total,
        "wer_mean_draw": sum(statistics.mean(r["errors"]) for r in rows) / total,
        "wer_oracle": sum(min(r["errors"]) for r in rows) / total,
        "judge_at_least_median": sum(e <= statistics.median(r["errors"]) for e, r in zip(pick, rows)) / len(rows),
    }
    by_speaker = {}
    for spk in sorted({r["speaker"] for r in rows}):
        own = [(r, e) for r, e in zip(rows, pick) if r["speaker"] == spk]
        words = sum(r["words"] for r, _ in own)
        by_speaker[spk] = {"words": words, "wer_judge": sum(e for _, e in own) / words,
                           "wer_mean_draw": sum(statistics.mean(r["errors"]) for r, _ in own) / words}
    summary["by_speaker"] = by_speaker
    print(json.dumps(summary, indent=1))
    if json_path:
        Path(json_path).write_text(json.dumps({"summary": summary, "rows": rows}))


if __name__ == "__main__":
    main()
