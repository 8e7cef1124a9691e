"""The documented commands, run as a user would: the tiny-checkpoint script, then `csm say`."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, check=True):
    return subprocess.run(args, capture_output=True, text=True, check=check, cwd=ROOT)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    run(sys.executable, "scripts/make_tiny_checkpoint.py", str(out), "--seed", "1")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    return out


def test_help_lists_say():
    assert "say" in run(sys.executable, "-m", "csm.cli", "--help").stdout


def test_say_end_to_end(tiny_ckpt, tmp_path):
    out = tmp_path / "hello.npy"
    res = run(sys.executable, "-m", "csm.cli", "say", "Hello there.", "--model", str(tiny_ckpt), "-o", str(out),
              "--max-ms", "400", "--seed", "3", "--codec", "none")
    assert res.stdout.strip() == str(out)
    codes = np.load(out)
    assert codes.shape[0] == 32 and 0 < codes.shape[1] <= 5 and codes.dtype == np.int64
    assert "frames" in res.stderr and "RTF" in res.stderr


def test_say_dialogue(tiny_ckpt, tmp_path):
    """--dialogue FILE: one 'SPEAKER: text' turn per line (comments and blank lines skipped), spoken in order, each
    in the context of the turns before it; a bad line is named by its number."""
    from csm.cli import parse_dialogue

    script = "# two people\n0: Hello there.\n\n1: How are you? Fine: thanks.\n"
    assert parse_dialogue(script) == [(0, "Hello there."), (1, "How are you? Fine: thanks.")]
    (tmp_path / "d.txt").write_text(script)
    out = tmp_path / "d.npy"
    res = run(sys.executable, "-m", "csm.cli", "say", "--dialogue", str(tmp_path / "d.txt"), "--model",
              str(tiny_ckpt), "-o", str(out), "--max-ms", "160", "--seed", "0", "--codec", "none")
    assert res.stdout.strip() == str(out) and np.load(out).shape[0] == 32
    for bad, why in [("0: hi\nnobody speaks", "dialogue line 2"), ("x: hi", "dialogue line 1"), ("# none", "no turns")]:
        (tmp_path / "bad.txt").write_text(bad)
        res = run(sys.executable, "-m", "csm.cli", "say", "--dialogue", str(tmp_path / "bad.txt"), "--model",
                  str(tiny_ckpt), "--codec", "none", check=False)
        assert res.returncode == 2 and why in res.stderr, res.stderr
    for extra in (["Hi."], ["--speaker", "1"]):
        res = run(sys.executable, "-m", "csm.cli", "say", *extra, "--dialogue", str(tmp_path / "d.txt"), "--model",
                  str(tiny_ckpt), "--codec", "none", check=False)
        assert res.returncode == 2 and "csm say: error:" in res.stderr


def test_say_writes_a_wav_with_the_codec_beside_the_model(tiny_ckpt, tmp_path):
    import soundfile as sf

    out = tmp_path / "hello.wav"
    res = run(sys.executable, "-m", "csm.cli", "say", "Hello there.", "--model", str(tiny_ckpt), "-o", str(out),
              "--max-ms", "320", "--seed", "3")
    assert res.stdout.strip() == str(out)
    audio, sr = sf.read(out)
    assert sr == 24_000 and len(audio) % 1920 == 0 and 0 < len(audio) <= 4 * 1920
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0
    fast = tmp_path / "fast.wav"
    run(sys.executable, "-m", "csm.cli", "say", "Hello there.", "--model", str(tiny_ckpt), "-o", str(fast),
        "--max-ms", "320", "--seed", "3", "--speed", "2")
    assert len(sf.read(fast)[0]) == len(audio) // 2  # the same speech in half the time


def test_say_reports_bad_model_path(tmp_path):
    res = run(sys.executable, "-m", "csm.cli", "say", "Hi", "--model", str(tmp_path / "missing"), "--codec", "none",
              check=False)
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_say_reports_bad_context(tiny_ckpt, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    res = run(sys.executable, "-m", "csm.cli", "say", "Hi", "--model", str(tiny_ckpt), "--context", f"1:Hello:{bad}",
              check=False)
    assert res.returncode == 2 and "bad.wav: not a readable audio file" in res.stderr and "Traceback" not in res.stderr
    res = run(sys.executable, "-m", "csm.cli", "say", "Hi", "--model", str(tiny_ckpt), "--context", str(bad),
              check=False)  # the speaker and text left out
    assert res.returncode == 2 and "csm say: error: --context expects SPEAKER:TEXT:AUDIO_PATH" in res.stderr


def test_say_without_a_codec_writes_codes(tmp_path):
    ckpt = tmp_path / "nocodec"
    run(sys.executable, "scripts/make_tiny_checkpoint.py", str(ckpt), "--no-codec")
    res = run(sys.executable, "-m", "csm.cli", "say", "Hi.", "--model", str(ckpt), "-o", str(tmp_path / "x.wav"),
              "--max-ms", "160", "--seed", "0")
    assert res.stdout.strip() == str(tmp_path / "x.npy") and "no audio codec found" in res.stderr
    assert np.load(tmp_path / "x.npy").shape[0] == 32


def test_say_without_model_uses_the_embedded_voice(tmp_path):
    """The README's main command: plain `csm say` speaks with the voice shipped in the package."""
    from csm.assets import VOICE_DIR

    if not (VOICE_DIR / "model.safetensors").is_file():
        pytest.skip("no embedded voice in this checkout")
    out = tmp_path / "hello.wav"
    r = run(sys.executable, "-m", "csm", "say", "Can you fix the bike with me later?", "-o", str(out), "--seed", "0")
    assert r.stdout.strip() == str(out)
    import soundfile as sf

    wav, sr = sf.read(out)
    assert sr == 24_000 and 0.5 < len(wav) / sr < 10 and np.abs(wav).max() > 0.01
    card = (VOICE_DIR / "MODEL_CARD.md").read_text()
    assert "WER" in card and "csm train" in card
    size = sum(f.stat().st_size for f in VOICE_DIR.rglob("*") if f.is_file())
    assert size <= 40e6  # the budget for the embedded voice


def test_say_names_the_embedded_voices_speakers_for_an_unknown_one(tmp_path):
    from csm.assets import VOICE_DIR

    if not (VOICE_DIR / "model.safetensors").is_file():
        pytest.skip("no embedded voice in this checkout")
    r = run(sys.executable, "-m", "csm", "say", "Hi.", "--speaker", "9", "-o", str(tmp_path / "x.wav"), check=False)
    assert r.returncode == 2 and "speaker 9 is not one this model was trained on" in r.stderr
    assert "1: espeak-ng" in r.stderr and "Traceback" not in r.stderr and not (tmp_path / "x.wav").exists()


def test_say_reports_a_line_that_ends_at_once(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """An all-zero first frame (end of utterance) leaves nothing to write: an error, not an empty .npy."""
    import torch

    from csm.cli import main
    from csm.generate import Generator, Speech

    monkeypatch.setattr(Generator, "generate_batch", lambda self, reqs: [Speech(torch.zeros(32, 0, dtype=torch.long),
                                                                               None, 24_000) for _ in reqs])
    out = tmp_path / "x.wav"
    for split in ([], ["--no-split"]):
        assert main(["say", "Hi.", "--model", str(tiny_ckpt), "-o", str(out), "--codec", "none", *split]) == 1
        assert "ended the line before speaking" in capsys.readouterr().err
        assert not out.exists() and not out.with_suffix(".npy").exists()


def test_say_speaks_text_sentence_by_sentence(tiny_ckpt, tmp_path, monkeypatch):
    """Several sentences become several lines (each its own request); --no-split speaks the text as one line."""
    from csm.cli import main
    from csm.generate import Generator

    seen = []
    real = Generator.generate_batch
    monkeypatch.setattr(Generator, "generate_batch", lambda self, reqs: seen.extend(r.text for r in reqs) or
                        real(self, reqs))
    args = ["say", "Hello there. How are you?", "--model", str(tiny_ckpt), "--codec", "none", "--max-ms", "240",
            "--seed", "0", "-o", str(tmp_path / "x.npy")]
    assert main(args) == 0 and seen == ["Hello there.", "How are you?"]
    seen.clear()
    assert main(args + ["--no-split"]) == 0 and seen == ["Hello there. How are you?"]
    seen.clear()  # '-' reads the text from stdin
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there.\n\nFine"))
    assert main(["say", "-", *args[2:]]) == 0 and seen == ["Hello there.", "Fine"]
    monkeypatch.setattr("sys.stdin", io.StringIO("  \n"))
    assert main(["say", "-", *args[2:]]) == 2


def test_say_does_not_load_the_compiler_stack(tmp_path):
    """Building models on the meta device must not run meta-tensor maths: its first use imports torch._dynamo and
    sympy, which was two thirds of `csm say`'s start-up (load 1.4 -> 0.2 s on this project's CPU)."""
    from csm.assets import VOICE_DIR

    if not (VOICE_DIR / "model.safetensors").is_file():
        pytest.skip("no embedded voice in this checkout")
    code = ("import sys; from csm.cli import main; "
            f"main(['say', 'Hi there.', '-o', {str(tmp_path / 'hi.wav')!r}, '--seed', '0']); "
            "print(sorted(m for m in ('sympy', 'torch._dynamo', 'torch._inductor') if m in sys.modules))")
    assert run(sys.executable, "-c", code).stdout.strip().splitlines()[-1] == "[]"


def test_missing_embedded_voice_is_a_clear_error(monkeypatch, tmp_path, capsys):
    import csm.assets
    from csm.cli import main

    monkeypatch.setattr(csm.assets, "VOICE_DIR", tmp_path / "empty")
    assert main(["say", "hello"]) == 2
    assert "no embedded voice" in capsys.readouterr().err


def test_teacher_forced_script_writes_every_variant(tiny_ckpt, tmp_path):
    """scripts/teacher_forced.py: the clips decoded five ways, each folder ready for `csm eval --wavs`."""
    import soundfile as sf
    import torch

    from csm.mimi import load_model_codec

    codec = load_model_codec(tiny_ckpt)
    clips = tmp_path / "heldout"
    clips.mkdir()
    torch.manual_seed(0)
    for i, frames in enumerate((3, 5)):  # any audio will do: the script encodes it with the model's codec
        sf.write(clips / f"{i:03d}_spk{i}.wav", 0.1 * torch.randn(frames * 1920).numpy(), codec.sample_rate)
    (tmp_path / "texts.txt").write_text("Hello there.\nSee you at seven.\n")
    run(sys.executable, "scripts/teacher_forced.py", str(clips), str(tmp_path / "texts.txt"), str(tmp_path / "tf"),
        "--model", str(tiny_ckpt), "--repeats", "2", "--topk", "5")
    names = {"resynth", "c0-true"} | {f"{v}-r{r}" for v in ("c0-true-s", "c0-sampled", "sampled") for r in (0, 1)}
    assert {p.name for p in (tmp_path / "tf").iterdir()} == names
    for name in names:
        for i, frames in enumerate((3, 5)):
            wav, sr = sf.read(tmp_path / "tf" / name / f"{i:03d}_spk{i}.wav")
            assert sr == codec.sample_rate and len(wav) == frames * 1920, name
    # (the tiny codec's codebooks are all alike, so the folders' audio cannot tell the variants apart: check codes)
    import importlib.util

    spec = importlib.util.spec_from_file_location("teacher_forced", ROOT / "scripts" / "teacher_forced.py")
    tf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tf)
    from csm.generate import load_generator

    model = load_generator(tiny_ckpt, device="cpu").model
    h, c0 = torch.randn(6, model.cfg.backbone.dim), torch.randint(0, 2048, (6,))
    with torch.inference_mode():
        greedy = tf.fill_acoustic(model, h, c0, 5, 0.9, None)
        drawn = tf.fill_acoustic(model, h, c0, 5, 0.9, torch.Generator().manual_seed(0))
        logits = model.decoder_logits(h, greedy)
    assert torch.equal(greedy[:, 0], c0) and torch.equal(drawn[:, 0], c0)
    assert torch.equal(logits.argmax(-1), greedy[:, 1:])  # each greedy code is the argmax given the ones before
    assert not torch.equal(drawn, greedy)


def test_gta_codes_script_feeds_train_codec(tiny_ckpt, tmp_path):
    """scripts/gta_codes.py: each clip's own codes and the CSM's teacher-forced draws, frame-aligned, in a folder
    that `csm train-codec --decoder-only` trains on."""
    import json

    import soundfile as sf
    import torch
    from safetensors.torch import load_file

    from csm.audio import load_audio
    from csm.mimi import load_model_codec

    codec = load_model_codec(tiny_ckpt)
    (tmp_path / "wavs").mkdir()
    rows = []
    for i, frames in enumerate((3, 5)):
        sf.write(tmp_path / "wavs" / f"{i}.wav", 0.1 * torch.randn(frames * 1920).numpy(), codec.sample_rate)
        rows.append({"audio": f"wavs/{i}.wav", "text": "See you at seven.", "speaker": i})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "gta"
    run(sys.executable, "scripts/gta_codes.py", str(tmp_path / "m.jsonl"), str(out), "--model", str(tiny_ckpt),
        "--draws", "3", "--topk", "5")
    kept = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["frames"] for r in kept] == [3, 5] and [r["speaker"] for r in kept] == [0, 1]
    codes = load_file(str(out / "codes.safetensors"))
    for i, frames in enumerate((3, 5)):
        own = codec.encode(load_audio(kept[i]["audio"], sample_rate=codec.sample_rate))[:, :frames]
        assert torch.equal(codes[f"true.{i}"].long(), own[: codes[f"true.{i}"].shape[0]])
        assert codes[f"gta.{i}"].shape == (3, *codes[f"true.{i}"].shape)
    res = run(sys.executable, "-m", "csm.cli", "train-codec", "--data", str(out), "--decoder-only", "--init",
              str(tiny_ckpt / "codec"), "--out", str(tmp_path / "ft"), "--steps", "2", "--batch-size", "2",
              "--segment-frames", "2", "--eval-clips", "1", "--mel-scales", "256,512", "--no-progress",
              "--threads", "1")
    assert (tmp_path / "ft" / "step-000002" / "model.safetensors").is_file(), res.stderr
    assert "val_gta_mel_l1" in (tmp_path / "ft" / "log.jsonl").read_text()


def test_resynthesize_script_with_the_latent(tiny_ckpt, tmp_path):
    """scripts/resynthesize.py: one folder per codebook count and, with --latent, the unquantized path; JSON scores."""
    import json

    import soundfile as sf

    clips = tmp_path / "clips"
    clips.mkdir()
    rng = np.random.default_rng(0)
    for i, n in enumerate((4000, 5000)):  # not whole frames: outputs are cut to the input's length
        sf.write(clips / f"{i:03d}_spk0.wav", 0.1 * rng.standard_normal(n), 24_000)
    res = run(sys.executable, "scripts/resynthesize.py", str(tiny_ckpt / "codec"), str(clips), str(tmp_path / "rs"),
              "--codebooks", "4,1", "--latent")
    scores = json.loads(res.stdout)
    assert scores["files"] == 2 and set(scores) == {"files", "k4", "k1", "latent"}
    assert all(np.isfinite(scores[k]["log_mel_l1"]) for k in ("k4", "k1", "latent"))
    for name in ("k4", "k1", "latent"):
        for i, n in enumerate((4000, 5000)):
            wav, sr = sf.read(tmp_path / "rs" / name / f"{i:03d}_spk0.wav")
            assert sr == 24_000 and len(wav) == n, name
