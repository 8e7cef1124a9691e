"""Text -> token ids, in one place: a model's `tokenizer.json` read with the `tokenizers` library.

A model reads text one of two ways, and its tokenizer.json says which:
- raw text through a BPE (CSM-1B: Llama-3's tokenizer, unchanged);
- phonemes: a tokenizer.json that holds the special token `<|phonemes:LANG|>` (e.g. `<|phonemes:en-us|>`) is a
  character-level vocabulary of espeak-ng IPA symbols, and `encode` first reads the text with espeak-ng (through
  piper-tts, which bundles espeak-ng and its data, so nothing else is installed). espeak-ng reads numbers, times,
  ordinals and unknown words itself, so such a model speaks any line. A leading speaker tag "[3]" is kept as is.

Every text segment is wrapped in bos/eos ourselves rather than by the file's post-processor: Llama-3.2's own
tokenizer.json adds only bos, and Sesame's generator adds both, so doing it here makes the result independent of
which tokenizer.json was shipped.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Iterable

from tokenizers import Tokenizer

from .hub import ModelFilesNotFound, find_files

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
UNK = "<unk>"
_PHONEMES_TOKEN = re.compile(r"^<\|phonemes:([A-Za-z-]+)\|>$")
_SPEAKER_TAG = re.compile(r"^\[\d+\]")
# CSM-1B's checkpoints do not always ship a tokenizer; Sesame's generator uses this one.
DEFAULT_TOKENIZER_REPO = "meta-llama/Llama-3.2-1B"


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
        if bos is None or eos is None:
            raise ValueError(f"tokenizer has no {BOS} / {EOS} special tokens; is it a Llama-3 style tokenizer?")
        self.bos_id, self.eos_id = bos, eos
        added = (t.content for t in tokenizer.get_added_tokens_decoder().values())
        self.phonemes: str | None = next((m.group(1) for m in map(_PHONEMES_TOKEN.match, added) if m), None)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TextTokenizer":
        return cls(Tokenizer.from_file(str(path)))

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, fallback: str | None = DEFAULT_TOKENIZER_REPO) -> "TextTokenizer":
        """tokenizer.json from a model directory / hub id, else from `fallback` (the Llama-3.2 tokenizer)."""
        try:
            return cls.from_file(find_files(source, ["tokenizer.json"]))
        except ModelFilesNotFound as first:
            if fallback is None or str(fallback) == str(source):
                raise
            try:
                return cls.from_file(find_files(fallback, ["tokenizer.json"]))
            except ModelFilesNotFound as second:
                raise ModelFilesNotFound(f"no tokenizer.json: {first}; fallback {fallback}: {second}") from None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` wrapped in bos ... eos (read as phonemes first when the tokenizer says so)."""
        if self.phonemes:
            text = self.phonemize(text)
        return [self.bos_id, *self.tokenizer.encode(text, add_special_tokens=False).ids, self.eos_id]

    def phonemize(self, text: str) -> str:
        """"[0]It's 3:30." -> "[0]ɪts θɹˈiː θˈɜːɾi." with this tokenizer's language; a speaker tag stays as is."""
        tag = _SPEAKER_TAG.match(text)
        head = tag.group() if tag else ""
        return head + phonemize(text[len(head):], self.phonemes or "en-us")

    def unknown_symbols(self, text: str) -> list[str]:
        """Symbols of `text` (as the model reads it) that its vocabulary lacks: they become <unk>."""
        read = self.phonemize(text) if self.phonemes else text
        vocab = self.tokenizer.get_vocab()
        return list(dict.fromkeys(c for c in read if c not in vocab)) if self.phonemes else []

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def save(self, path: str | os.PathLike) -> None:
        self.tokenizer.save(str(path))


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> TextTokenizer:
    """A small byte-level BPE with Llama-3's bos/eos names, for tiny models trained from scratch."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok)


_ESPEAK = None
_ESPEAK_LOCK = threading.Lock()  # espeak-ng keeps global state: one reading at a time


def phonemize(text: str, language: str = "en-us") -> str:
    """Text -> espeak-ng IPA, sentences joined by a space, punctuation kept ("Hi, you." -> "hˈaɪ, juː.")."""
    global _ESPEAK
    with _ESPEAK_LOCK:
        if _ESPEAK is None:
            try:
                from piper.phonemize_espeak import EspeakPhonemizer
            except ImportError as e:
                raise ImportError("this model reads phonemes with espeak-ng, which comes with piper-tts: "
                                  "pip install 'piper-tts>=1.8'") from e
            _ESPEAK = EspeakPhonemizer()
        sentences = _ESPEAK.phonemize(language, " ".join(text.split()))
    return " ".join("".join(p) for p in sentences if p)


def train_phoneme_tokenizer(texts: Iterable[str], language: str = "en-us") -> TextTokenizer:
    """A character-level tokenizer over the espeak-ng IPA symbols of `texts` (speaker tags "[N]" included),
    marked `<|phonemes:LANG|>` so that `encode` reads text as phonemes. Symbols never seen become <unk>."""
    from tokenizers import Regex, decoders, models, pre_tokenizers

    symbols = set("[]0123456789 ")
    for text in texts:
        tag = _SPEAKER_TAG.match(text)
        symbols.update(phonemize(text[tag.end() if tag else 0:], language))
    vocab = {BOS: 0, EOS: 1, UNK: 2}
    for c in sorted(symbols):
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # every character alone
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([BOS, EOS, f"<|phonemes:{language}|>"])
    return TextTokenizer(tok)


# Words whose trailing period does not end a sentence ("Dr. Smith", "e.g. this").
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "st", "sr", "jr", "vs", "etc", "e.g", "i.e", "approx", "no"}
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*$")


def split_sentences(text: str, max_words: int = 30) -> list[str]:
    """Text of any length -> the lines a CSM speaks one at a time.

    CSM models learn from single utterances, so a paragraph read as one line comes out as babble (or hits the
    context limit). Splits after . ! ? (not after common abbreviations, single-letter initials or "No." before a
    number) and at blank lines; a sentence over `max_words` words is cut at its commas, semicolons and colons, and
    a clause still over the limit between words."""
    if max_words < 1:
        raise ValueError(f"max_words must be at least 1, got {max_words}")
    sentences: list[list[str]] = []
    for paragraph in re.split(r"\n\s*\n", text):
        words = paragraph.split()
        current: list[str] = []
        for i, word in enumerate(words):
            current.append(word)
            if not _SENTENCE_END.search(word):
                continue
            stem = word.rstrip("\"')]").rstrip(".!?").lower()
            nxt = words[i + 1] if i + 1 < len(words) else ""
            abbreviation = word.rstrip("\"')]").endswith(".") and (
                (stem in _ABBREVIATIONS and (stem != "no" or nxt[:1].isdigit())) or (len(stem) == 1 and stem.isalpha()))
            if not abbreviation:
                sentences.append(current)
                current = []
        if current:
            sentences.append(current)
    lines = []
    for sentence in sentences:
        lines.extend(" ".join(chunk) for chunk in _cut(sentence, max_words))
    return lines


def _cut(words: list[str], max_words: int) -> list[list[str]]:
    """Words -> chunks of at most max_words, cut after clause punctuation where possible."""
    if len(words) <= max_words:
        return [words]
    clauses, current = [], []
    for word in words:
        current.append(word)
        if word[-1] in ",;:":
            clauses.append(current)
            current = []
    if current:
        clauses.append(current)
    chunks: list[list[str]] = []
    for clause in clauses:
        if chunks and len(chunks[-1]) + len(clause) <= max_words:
            chunks[-1].extend(clause)
        else:
            chunks.extend(clause[i: i + max_words] for i in range(0, len(clause), max_words))
    return chunks
