"""Package a trained voice into a model directory that `csm say --model DIR` (or, at src/csm/assets/voice, plain
`csm say`) loads: CSM weights and codec stored in float16 (or, with --int8, their big matrices as int8 rows), the
tokenizer, and a MODEL_CARD.md written from the
training logs, the corpus description and `csm eval` results.

    python scripts/package_voice.py --model runs/voice/step-004000 --codec runs/codec/step-004275 \\
        --corpus /data/corpus --eval eval.json --out src/csm/assets/voice

The card's numbers come from the files named here, so re-running after a new training run keeps it honest.
A decoder-only codec fine-tune (same codes, so the CSM stays valid) replaces just the codec and its card lines, and
a CSM fine-tuned from the packaged one just the CSM (adding the fine-tune's corpora to the card):

    python scripts/package_voice.py --swap-codec runs/codec-ft/step-002000 --eval eval.json --out src/csm/assets/voice
    python scripts/package_voice.py --swap-model runs/ft/step-000400 --corpus data/new --out src/csm/assets/voice
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from csm.checkpoints import load_checkpoint, save_checkpoint
from csm.generate import generation_defaults
from csm.mimi import load_mimi
from csm.mimi.weights import save_mimi
from csm.tokenizer import TextTokenizer

STORE = torch.float16  # 10 mantissa bits: finer than bf16 for the small weights of a tiny model


def files_line(out: Path) -> str:
    """The card's Files line, from what is on disk (int8 rows where a tensor has a scale beside it)."""
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        int8 = any(k.endswith(".int8_scale") for k in f.keys())
    stored = "the big matrices as int8 rows, the rest in float16" if int8 else "weights stored in float16"
    return f"Files: {_mb(out):.1f} MB ({stored}, loaded as float32 on a CPU)."


def _last(checkpoint: Path, key: str) -> dict:
    """The last record of the run's log.jsonl that holds `key`, up to the checkpoint's step ({} when none): the
    run may have gone on after the checkpoint being packaged."""
    log = checkpoint.parent / "log.jsonl"
    if not log.is_file():
        return {}
    step = int(checkpoint.name.removeprefix("step-")) if checkpoint.name.startswith("step-") else float("inf")
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return next((r for r in reversed(rows) if key in r and r.get("step", 0) <= step), {})


def _train_state(checkpoint: Path) -> dict:
    """The run's saved train_state.pt (its config, step, minutes...), {} where the checkpoint has none (a packaged
    model, or a codec saved by hand)."""
    state = checkpoint / "train_state.pt"
    return torch.load(state, map_location="cpu", weights_only=True) if state.is_file() else {}


def read_corpora(folders: list[str]) -> list[tuple[Path, dict]]:
    """(folder, its corpus.json) for each make_corpus.py folder the voice was trained on."""
    return [(Path(c), json.loads((Path(c) / "corpus.json").read_text())) for c in folders]


def corpus_speakers(corpora: list[tuple[Path, dict]]) -> dict[str, str]:
    """Speaker id -> voice description over the corpora."""
    speakers = {}
    for _, meta in corpora:
        voices = meta.get("voices", [])
        ids = meta.get("speakers", range(len(voices)))
        # make_corpus.py lists the voices of its speakers only; older folders listed every voice
        by_id = dict(zip(ids, voices)) if len(voices) == len(ids) else dict(enumerate(voices))
        for i in ids:
            v = by_id.get(i, {})
            speakers[str(i)] = v.get("description", v.get("name", ""))
    return dict(sorted(speakers.items(), key=lambda kv: int(kv[0])))


def _fits_float16(model: torch.nn.Module, what: str) -> None:
    biggest = max(float(t.abs().max()) for t in model.state_dict().values() if t.is_floating_point())
    if biggest > 6e4:
        raise ValueError(f"{what} has a weight of magnitude {biggest:g}, too large for float16 storage")


def _mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def codec_lines(codec: torch.nn.Module, checkpoint: Path) -> list[str]:
    """The card's codec bullet: its shape, and its training from the run's log."""
    cc, last = codec.cfg, _last(checkpoint, "val_mel_l1")
    lines = [f"- Codec: Mimi architecture, {sum(p.numel() for p in codec.parameters()) / 1e6:.1f} M parameters, "
             f"{cc.num_codebooks} codebooks × {cc.codebook_size} at {cc.frame_rate:g} Hz, {cc.sample_rate} Hz audio."]
    if last:
        lines.append(f"  Trained {last['step']} steps ({last.get('train_minutes', 0):.1f} min)"
                     f"{_codec_origin(checkpoint)}; held-out log-mel L1 {last['val_mel_l1']:.3f}.")
    return lines


def _codec_origin(checkpoint: Path) -> str:
    """Where a codec run started, from its saved config: a fine-tune names the codec (and that one's training) it
    began from, so the card's steps and minutes are not mistaken for the whole training."""
    cfg = _train_state(checkpoint).get("config", {})
    if not cfg.get("init"):
        return ""
    init = Path(cfg["init"])
    what = "decoder side only" if cfg.get("decoder_only") else "all of it"
    if cfg.get("decode_codebooks"):
        what += f", decoding from the first {cfg['decode_codebooks']} codebooks"
    before = _last(init, "val_mel_l1")
    made = f", itself trained {before['step']} steps ({before.get('train_minutes', 0):.1f} min)" if before else ""
    return f", fine-tuned ({what}) from `{init}`{made}"


def scores_line(eval_json: str | None) -> str:
    """The card's scores paragraph, from a `csm eval --json` report."""
    scores = json.loads(Path(eval_json).read_text())["summary"] if eval_json else {}
    if not scores:
        return "Not scored yet."
    rounds = scores.get("rounds") or []
    where = f"On {scores.get('n')} held-out sentences"
    if rounds:  # csm eval --repeats: the same sentences once per seed, pooled
        where = (f"On {scores['n'] // len(rounds)} held-out sentences, each generated with {len(rounds)} seeds ("
                 + ", ".join(str(r["seed"]) for r in rounds) + "; WER per seed "
                 + " / ".join(f"{100 * r['wer']:.1f}" for r in rounds) + " %), pooled")
    return (f"{where}: WER {100 * scores['wer']:.1f} % (Whisper tiny.en; target ≤ 10 %)"
            + (f"; with a context turn from the target speaker the output is closer (resemblyzer) to that speaker "
               f"than to the others in {100 * scores['speaker_closer_fraction']:.0f} % of trials (target ≥ 90 %)"
               if scores.get("speaker_closer_fraction") is not None else "")
            + (f"; real-time factor {scores['rtf']:.2f} on this project's 2-core CPU" if "rtf" in scores else "")
            + ".")


def model_lines(model: torch.nn.Module, checkpoint: Path) -> list[str]:
    """The card's CSM bullet: its shape, and its last run from the checkpoint's log and train_state.pt."""
    train_last, eval_last, c = _last(checkpoint, "loss"), _last(checkpoint, "eval_loss"), model.cfg
    lines = [f"- CSM: backbone {c.backbone.n_layers} layers × {c.backbone.dim}, decoder {c.decoder.n_layers} "
             f"layers × {c.decoder.dim}, {c.audio_num_codebooks} codebooks, text vocabulary {c.text_vocab_size}; "
             f"{model.num_parameters() / 1e6:.1f} M parameters."]
    if train_last:
        lines.append(f"  Trained {train_last['step']} steps (epoch {train_last.get('epoch')}); last training loss "
                     f"{train_last['loss']:.3f} (codebook 0 {train_last['c0_loss']:.3f}, decoder "
                     f"{train_last['decoder_loss']:.3f})" + (f", held-out loss {eval_last['eval_loss']:.3f}"
                                                             if eval_last else "") + ".")
    run = _train_state(checkpoint)
    if run:
        cfg = run["config"]
        start, origin = [], cfg
        while origin.get("resume") and (before := _train_state(Path(origin["resume"]))):  # a branch (cooldown)
            start.append(f"resumed from `{origin['resume']}`")
            origin = before["config"]
        start.append(f"`--init {origin['init']}` (steps count from there)" if origin.get("init") else "from scratch")
        start = ", ".join(reversed(start))
        lines.append(f"  Last run: `--data {cfg['data']}`, {start}, lr {cfg['lr']:g} → {cfg['min_lr']:g}, "
                     f"batch {cfg['batch_size']} × {cfg['seq_len']} frames, decoder on 1/{cfg['amortization']} of the "
                     f"frames, `--code-noise {cfg.get('code_noise', 0.0):g}`, {run['train_seconds'] / 60:.0f} min.")
    return lines


def data_line(path: Path, corpus: dict) -> str:
    manifest = path / "manifest.jsonl"
    n_utt = sum(1 for _ in manifest.open()) if manifest.is_file() else None
    return (f"- Synthetic conversations made offline by `scripts/make_corpus.py` (seed {corpus.get('seed')})"
            + (f", {n_utt} utterances" if n_utt else "")
            + (f", {corpus['splice']:.0%} of its lines spliced from two grammar lines" if corpus.get("splice") else "")
            + (f", speakers {', '.join(map(str, corpus['speakers']))}" if corpus.get("speakers") else "")
            + (f"; the text is the sentences of Debian's fortunes and fortunes-min, with "
               f"{corpus.get('grammar_share', 0):.0%} of the conversations from the template grammar (names, times, "
               "numbers); held-out sentences come from fortune-anarchism, which training never reads"
               if corpus.get("text") == "open" else "")
            + ".")


def card(args, model, codec, out: Path, corpora: list[tuple[Path, dict]]) -> str:
    lines = [
        "# The embedded voice",
        "",
        "A tiny Conversational Speech Model and codec trained from scratch by this project's own recipes",
        "(`scripts/make_corpus.py` → `csm train-codec` → `csm prepare` → `csm train`), shipped so that `csm say` works",
        "offline. It is a demonstration of the pipeline, not a production voice.",
        "",
        *(["It reads text as espeak-ng phonemes (its `tokenizer.json` holds `<|phonemes:en-us|>`; espeak-ng comes "
           "with piper-tts), so any English line, numbers, times and unseen words included, becomes symbols it knows.",
           ""] if TextTokenizer.from_file(out / "tokenizer.json").phonemes else []),
        "## Data",
    ]
    lines += [data_line(path, corpus) for path, corpus in corpora]
    if corpora:
        lines += ["", "Speakers (`csm say --speaker N`; other ids are refused):"]
        lines += [f"- {i}: {d}" for i, d in corpus_speakers(corpora).items()]
    lines += ["", "## Models", ""] + model_lines(model, Path(args.model))
    lines += codec_lines(codec, Path(args.codec))
    if args.generation:
        lines.append(f"- Generation defaults (`generation.json`, used by `csm say` unless overridden): {args.generation}.")
    if args.notes:
        lines += ["", args.notes]
    lines += ["", "## Scores (`csm eval`)", "", scores_line(args.eval)]
    lines += ["", files_line(out), ""]
    return "\n".join(lines)


def _packaged(out: Path) -> Path:
    card_path = out / "MODEL_CARD.md"
    if not card_path.is_file():
        raise SystemExit(f"package_voice.py: {out} is not a packaged voice (no MODEL_CARD.md)")
    return card_path


def _rewrite_card(args, card_path: Path, bullet: str, new_bullet: list[str], data: list[str] = ()) -> None:
    """Replace the card's `bullet` block (e.g. "- Codec:") with `new_bullet`, append `data` lines to its Data
    section, and, when given, its notes and scores; refresh its Files line."""
    out = card_path.parent
    lines = card_path.read_text().split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(bullet))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("  "))
    lines[start:end] = new_bullet
    if data:
        section = lines.index("## Data")
        last = next(i for i in range(section + 1, len(lines)) if not lines[i].startswith("- "))
        lines[last:last] = [line for line in data if line not in lines[section:last]]
    scores = lines.index("## Scores (`csm eval`)")
    if args.notes:  # the paragraph between the Models bullets and the scores
        models = lines.index("## Models")
        bullets_end = next(i for i in range(models + 2, scores) if not lines[i].startswith(("- ", "  ")))
        lines[bullets_end:scores] = ["", args.notes, ""]
        scores = lines.index("## Scores (`csm eval`)")
    if args.eval:
        lines[scores + 2] = scores_line(args.eval)
    files = next(i for i, line in enumerate(lines) if line.startswith("Files: "))
    lines[files] = files_line(out)
    card_path.write_text("\n".join(lines))


def swap_codec(args) -> None:
    """--swap-codec: a new codec for an already packaged voice (a decoder-only fine-tune gives the same codes, so
    the CSM stays valid). Rewrites the codec, the card's codec bullet and Files line, and, when given, its notes and
    scores; the rest of the card, written from the CSM's training logs, stays."""
    out = Path(args.out)
    card_path = _packaged(out)
    codec = load_mimi(args.swap_codec)
    _fits_float16(codec, "the codec")
    shutil.rmtree(out / "codec", ignore_errors=True)
    save_mimi(codec, out / "codec", dtype=STORE, int8=args.int8)
    _rewrite_card(args, card_path, "- Codec:", codec_lines(codec, Path(args.swap_codec)))
    print(f"wrote {out / 'codec'} and the card ({_mb(out):.1f} MB)")


def swap_model(args) -> None:
    """--swap-model: a CSM fine-tuned from the packaged one (same shape, tokenizer and codec) replaces it. Rewrites
    the weights, the card's CSM bullet, and adds the --corpus folders it was fine-tuned on to the card's Data; the
    codec and the rest stay."""
    out, checkpoint = Path(args.out), Path(args.swap_model)
    card_path = _packaged(out)
    corpora = read_corpora(args.corpus)
    if not (checkpoint / "tokenizer.json").is_file():
        raise SystemExit(f"package_voice.py: {checkpoint} has no tokenizer.json (not a `csm train` checkpoint?)")
    if (checkpoint / "tokenizer.json").read_text() != (out / "tokenizer.json").read_text():
        raise SystemExit(f"package_voice.py: {checkpoint} was trained with another tokenizer than {out}'s")
    try:
        old, _ = load_checkpoint(out)
        model, _ = load_checkpoint(checkpoint)
    except (OSError, ValueError) as e:
        raise SystemExit(f"package_voice.py: {e}") from None
    if model.cfg != old.cfg:
        raise SystemExit(f"package_voice.py: {checkpoint} has another model config than {out}; package it with --model")
    _fits_float16(model, "the CSM")
    save_checkpoint(model, out, dtype=STORE, int8=args.int8)  # model.safetensors + config.json; the rest stays
    _rewrite_card(args, card_path, "- CSM:", model_lines(model, checkpoint), [data_line(p, c) for p, c in corpora])
    print(f"wrote {out / 'model.safetensors'} and the card ({_mb(out):.1f} MB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="a `csm train` checkpoint directory (step-NNNNNN)")
    what.add_argument("--swap-codec", metavar="CODEC",
                      help="only replace the codec of the packaged voice at --out with this `csm train-codec` "
                           "checkpoint (decoder-only fine-tunes: the CSM's codes stay valid); --eval / --notes "
                           "replace the card's scores / notes")
    what.add_argument("--swap-model", metavar="CSM",
                      help="only replace the CSM of the packaged voice at --out with this `csm train` checkpoint, "
                           "fine-tuned from it (same shape, tokenizer and codec); --corpus adds the fine-tune's data "
                           "to the card; --eval / --notes replace the card's scores / notes")
    p.add_argument("--codec", help="a `csm train-codec` checkpoint directory (with --model)")
    p.add_argument("--out", required=True, help="model directory to write (replaced)")
    p.add_argument("--corpus", action="append", default=[],
                   help="a make_corpus.py folder the voice was trained on (corpus.json, manifest.jsonl); repeatable")
    p.add_argument("--eval", default=None, help="`csm eval --json` output for this model")
    p.add_argument("--notes", default="", help="a paragraph for the card (e.g. where the training ran)")
    p.add_argument("--int8", action="store_true",
                   help="store the big matrices of the CSM and codec as int8 rows (checkpoints.pack_int8): ~40 %% of "
                        "float16's bytes")
    p.add_argument("--generation", default=None, metavar="JSON",
                   help='sampling defaults written to generation.json, e.g. \'{"speaker": 1, "topk": 5}\'')
    args = p.parse_args()
    if args.swap_codec:
        return swap_codec(args)
    if args.swap_model:
        return swap_model(args)
    if not args.codec:
        p.error("--model needs --codec")
    corpora = read_corpora(args.corpus)  # first, so that a wrong folder fails before any work

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    model, _ = load_checkpoint(args.model)
    codec = load_mimi(args.codec)
    _fits_float16(model, "the CSM")
    _fits_float16(codec, "the codec")
    save_checkpoint(model, out, dtype=STORE, int8=args.int8)
    shutil.copy(Path(args.model) / "tokenizer.json", out / "tokenizer.json")
    save_mimi(codec, out / "codec", dtype=STORE, int8=args.int8)
    generation = json.loads(args.generation) if args.generation else {}
    speakers = corpus_speakers(corpora)
    if speakers:  # so that `csm say --speaker 7` names the voices it has instead of inventing one
        generation.setdefault("speakers", speakers)
    if generation:
        (out / "generation.json").write_text(json.dumps(generation) + "\n")
        generation_defaults(out)  # checks the keys
    (out / "MODEL_CARD.md").write_text(card(args, model, codec, out, corpora))
    print(f"wrote {out} ({_mb(out):.1f} MB)")


if __name__ == "__main__":
    main()
