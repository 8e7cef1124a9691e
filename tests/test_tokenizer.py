"""Text -> token ids: the phoneme front end (espeak-ng through piper-tts) beside the BPE one."""

from __future__ import annotations

import json

import pytest
import torch

from csm.config import get_config
from csm.generate import Generator
from csm.model import CSM
from csm.tokenizer import TextTokenizer, phonemize, train_phoneme_tokenizer

pytest.importorskip("piper.phonemize_espeak", reason="piper-tts (espeak-ng) is not installed")

LINES = ["[0]Hello there, how are you?", "[1]Fine thanks. It's three thirty on the fifth.", "[2]Zebras quietly jog."]


@pytest.fixture(scope="module")
def phonemes() -> TextTokenizer:
    return train_phoneme_tokenizer(LINES, "en-us")


def test_espeak_reads_numbers_times_and_ordinals_itself():
    assert phonemize("3:30") == phonemize("three thirty")
    assert phonemize("the 5th") == phonemize("the fifth")
    assert phonemize("12 cats") == phonemize("twelve cats")
    assert phonemize("Hi.  Bye!") == phonemize("Hi.") + " " + phonemize("Bye!")  # sentences joined by one space
    assert phonemize("...") == "" and phonemize("\u200b") == ""


def test_phoneme_tokenizer_round_trip(phonemes, tmp_path):
    assert phonemes.phonemes == "en-us"
    ids = phonemes.encode("[1]It's 3:30.")
    assert ids[0] == phonemes.bos_id and ids[-1] == phonemes.eos_id
    assert phonemes.decode(ids) == "[1]" + phonemize("It's three thirty.")  # the tag is kept as characters
    assert ids == phonemes.encode("[1]It's three thirty.")
    # one id per symbol: the vocabulary is characters, not merges
    assert len(ids) == 2 + len("[1]") + len(phonemize("It's 3:30."))
    phonemes.save(tmp_path / "tokenizer.json")
    again = TextTokenizer.from_pretrained(tmp_path)
    assert again.phonemes == "en-us" and again.encode("[1]It's 3:30.") == ids


def test_unseen_symbols_become_unk(phonemes):
    unk = phonemes.tokenizer.token_to_id("<unk>")
    missing = phonemes.unknown_symbols("Judge Vaughn's azure yacht")
    assert missing and all(c not in phonemes.tokenizer.get_vocab() for c in missing)
    assert unk in phonemes.encode("[0]Judge Vaughn's azure yacht")
    assert unk not in phonemes.encode("[0]How are you?")


def test_bpe_tokenizer_reads_raw_text(tokenizer):
    assert tokenizer.phonemes is None
    assert tokenizer.encode("[0]3:30") == [tokenizer.bos_id, *tokenizer.tokenizer.encode(
        "[0]3:30", add_special_tokens=False).ids, tokenizer.eos_id]
    assert tokenizer.unknown_symbols("anything") == []


def test_generator_speaks_any_line_through_phonemes(phonemes):
    torch.manual_seed(0)
    gen = Generator(CSM(get_config("tiny")), phonemes)
    speech = gen.generate("Dr. Okonkwo paid $5 at 3:30 on Dec. 5th! \U0001F355", speaker=0, seed=0,
                          max_audio_length_ms=240)
    assert speech.codes.shape[1] <= 3
    with pytest.raises(ValueError, match="reads no sounds"):
        gen.generate("...", speaker=0)


def test_prepare_builds_a_phoneme_tokenizer(tmp_path):
    """csm prepare --phonemes: the tokenizer.json it writes says how it reads text, so training and `csm say` read
    alike; a rerun resumes, another language is refused."""
    import soundfile as sf

    from csm.cli import main
    from csm.mimi import Mimi, preset, save_mimi
    from csm.train.data import TOKENIZER

    save_mimi(Mimi(preset("tiny-mel")), tmp_path / "codec")
    rows = []
    for i, line in enumerate(LINES):
        sf.write(str(tmp_path / f"{i}.wav"), 0.1 * torch.randn(3 * 1920).numpy(), 24_000)
        rows.append({"audio": f"{i}.wav", "text": line[3:], "speaker": int(line[1]), "conversation": "c", "turn": i})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["prepare", str(manifest), "-o", str(tmp_path / "prep"), "--codec", str(tmp_path / "codec"),
            "--no-progress", "--device", "cpu"]
    assert main(args + ["--phonemes", "en-us"]) == 0
    tok = TextTokenizer.from_file(tmp_path / "prep" / TOKENIZER)
    assert tok.phonemes == "en-us" and all(tok.unknown_symbols(r["text"]) == [] for r in rows)
    assert main(args + ["--phonemes", "en-us"]) == 0
    with pytest.raises(SystemExit, match="en-gb"):
        main(args + ["--phonemes", "en-gb"])
