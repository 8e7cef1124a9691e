"""Training on tiny random data: prepare (fake codec, real wav files), packing, amortisation, loss, resume, LoRA."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from csm.checkpoints import load_checkpoint, save_checkpoint
from csm.config import CSMConfig, TransformerConfig
from csm.model import CSM
from csm.tokenizer import train_tokenizer
from csm.train import data as D
from csm.train.lora import apply_lora
from csm.train.train import CSMLoss, TrainConfig, lr_at, train

K = 4  # codebooks of the fake codec and the micro model
MICRO = CSMConfig(
    backbone=TransformerConfig(n_layers=2, dim=32, n_heads=4, n_kv_heads=2, intermediate_size=64, max_seq_len=256),
    decoder=TransformerConfig(n_layers=1, dim=16, n_heads=2, n_kv_heads=1, intermediate_size=32, max_seq_len=K),
    text_vocab_size=512,
    audio_vocab_size=64,
    audio_num_codebooks=K,
)
SAMPLE_RATE, FRAME = 1600, 160


class FakeCodec:
    """Codec protocol stand-in: each 160-sample frame's mean level -> K codes (a learnable pattern)."""

    sample_rate = SAMPLE_RATE

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        b, _, t = wav.shape
        f = math.ceil(t / FRAME)
        level = F.pad(wav, (0, f * FRAME - t)).reshape(b, f, FRAME).mean(-1)
        base = ((level + 1) * 20).round().long().clamp(0, 40)
        return torch.stack([(base + 5 * k) % 64 for k in range(K)], dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Micro models: threads only add contention on a shared CPU (and cost 10-100x in wall time).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


WORDS = "hello there how are you today fine thanks and what about the weather it is sunny".split()


def _write_wav(path, n_frames: int, start: int, step: int) -> None:
    import soundfile as sf

    levels = np.array([((start + f * step) % 8) / 8 - 0.45 for f in range(n_frames)], dtype=np.float32)
    sf.write(str(path), np.repeat(levels, FRAME), SAMPLE_RATE, subtype="FLOAT")


def _make_corpus(root, n_convs: int = 6) -> list[dict]:
    """Conversations of 1-3 turns, 8-20 frames each, as wav files + manifest rows."""
    rng = np.random.default_rng(0)
    rows = []
    for c in range(n_convs):
        for turn in range(1 + c % 3):
            name = f"c{c}_t{turn}.wav"
            _write_wav(root / name, int(rng.integers(8, 20)), int(rng.integers(0, 8)), 1 + turn % 3)
            text = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 7))))
            rows.append({"audio": name, "text": text, "speaker": turn % 2, "conversation": f"conv{c}", "turn": turn})
    return rows


def _manifest(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rows = _make_corpus(root)
    _manifest(root / "manifest.jsonl", rows)
    tok = train_tokenizer([r["text"] for r in rows] * 4, vocab_size=300)
    out = root / "prepared"
    report = D.prepare(root / "manifest.jsonl", out, FakeCodec(), tok, shard_size=5, progress=False)
    assert report.encoded == len(rows) and not report.bad
    return out


@pytest.fixture(scope="module")
def corpus(prepared):
    return D.load_corpus(prepared, seq_len=256, num_codebooks=K)


def _cfg(prepared, out, **kw) -> TrainConfig:
    base = dict(data=str(prepared), out=str(out), model_config=None, preset=None, seq_len=128, batch_size=2,
                steps=6, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_fraction=0.0, log_every=1, eval_every=0,
                save_every=0, amortization=4, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def micro_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "micro.json"
    path.write_text(json.dumps(MICRO.to_dict()))
    return str(path)


# --- prepare ---------------------------------------------------------------------------------------------------------


def test_prepare_reports_bad_files_and_resumes(tmp_path):
    rows = _make_corpus(tmp_path, n_convs=2)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage, not audio")
    bad_rows = [{"audio": "corrupt.wav", "text": "broken"}, {"audio": "missing.wav", "text": "gone"},
                {"audio": rows[0]["audio"].replace("t0", "x"), "text": ""}]
    _manifest(tmp_path / "m.jsonl", rows + bad_rows)
    tok = train_tokenizer(["hello there"] * 4, vocab_size=300)
    out = tmp_path / "out"
    r1 = D.prepare(tmp_path / "m.jsonl", out, FakeCodec(), tok, shard_size=2, progress=False)
    assert (r1.encoded, r1.already_done, len(r1.bad)) == (len(rows), 0, 3)
    assert {b[0] for b in r1.bad} == {"corrupt.wav", "missing.wav", "c0_x.wav"}
    assert len((out / "errors.jsonl").read_text().splitlines()) == 3
    # Re-run with one more utterance: only that one is encoded; the bad ones are reported again.
    _write_wav(tmp_path / "new.wav", 10, 0, 1)
    _manifest(tmp_path / "m.jsonl", rows + bad_rows + [{"audio": "new.wav", "text": "new one"}])
    r2 = D.prepare(tmp_path / "m.jsonl", out, FakeCodec(), tok, shard_size=2, progress=False)
    assert (r2.encoded, r2.already_done, len(r2.bad)) == (1, len(rows), 3)
    corpus = D.load_corpus(out, seq_len=256)
    assert len(corpus.utterances) == len(rows) + 1
    u = corpus.utterances[0]
    assert u.codes.shape[0] == K and u.codes.dtype == torch.int16
    # A folder input: a wav without transcript is reported, not dropped silently.
    folder = tmp_path / "folder"
    folder.mkdir()
    _write_wav(folder / "a.wav", 10, 0, 1)
    (folder / "a.txt").write_text("hello")
    _write_wav(folder / "b.wav", 10, 0, 1)
    r3 = D.prepare(folder, tmp_path / "out2", FakeCodec(), tok, progress=False)
    assert r3.encoded == 1 and r3.bad == [("b.wav", "no transcript (b.txt is missing or empty)")]


def test_prepare_keeps_work_of_an_interrupted_run(tmp_path):
    rows = _make_corpus(tmp_path, n_convs=3)  # 1 + 2 + 3 utterances
    _manifest(tmp_path / "m.jsonl", rows)
    tok = train_tokenizer(["hello there"] * 4, vocab_size=300)

    class Crashing(FakeCodec):
        calls = 0

        def encode(self, wav):
            Crashing.calls += 1
            if Crashing.calls == 4:
                raise KeyboardInterrupt
            return super().encode(wav)

    with pytest.raises(KeyboardInterrupt):
        D.prepare(tmp_path / "m.jsonl", tmp_path / "out", Crashing(), tok, shard_size=2, progress=False)
    assert len((tmp_path / "out" / "index.jsonl").read_text().splitlines()) == 3  # 2 in a full shard + 1 flushed
    again = D.prepare(tmp_path / "m.jsonl", tmp_path / "out", FakeCodec(), tok, shard_size=2, progress=False)
    assert (again.encoded, again.already_done) == (3, 3)
    assert len(D.load_corpus(tmp_path / "out", seq_len=256).utterances) == 6


def test_prepare_cli(tmp_path, monkeypatch, capsys):
    from csm.cli import main

    monkeypatch.setattr(D, "load_codec", lambda source, device: FakeCodec())
    _write_wav(tmp_path / "a.wav", 10, 0, 1)
    (tmp_path / "a.txt").write_text("hello there")
    (tmp_path / "b.wav").write_bytes(b"not a wav file at all")
    (tmp_path / "b.txt").write_text("broken")
    args = ["prepare", str(tmp_path), "-o", str(tmp_path / "out"), "--codec", "fake", "--train-tokenizer", "300",
            "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    assert "1 utterances encoded, 0 already done, 1 bad file(s) skipped" in capsys.readouterr().err
    assert main(args[:-5] + ["--no-progress"]) == 0  # re-run: the tokenizer is taken from the output folder
    assert "0 utterances encoded, 1 already done, 1 bad file(s) skipped" in capsys.readouterr().err


def test_frames_match_csm_frames(prepared, corpus):
    from csm.frames import Segment, conversation_frames
    from csm.tokenizer import TextTokenizer

    tok = TextTokenizer.from_file(prepared / "tokenizer.json")
    lines = [json.loads(x) for x in (prepared / "index.jsonl").read_text().splitlines()]
    ex = max(range(len(corpus.examples)), key=lambda i: len(corpus.examples[i]))  # a multi-turn conversation
    segs = []
    for i in corpus.examples[ex]:
        u = corpus.utterances[i]
        line = next(x for x in lines if x["conversation"] == u.conversation and x["turn"] == u.turn)
        segs.append(Segment(line["speaker"], line["text"], u.codes.long()))
    tokens, mask = corpus.frames(ex)
    ref_tokens, ref_mask = conversation_frames(tok, segs, K)
    assert len(segs) > 1 and torch.equal(tokens, ref_tokens) and torch.equal(mask, ref_mask)


def test_several_data_dirs_are_one_corpus(prepared, micro_config, tmp_path, capsys):
    """--data a,b: both directories' utterances, their (equal) conversation ids kept apart; tokenizers must match."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    one = D.load_corpus(prepared, seq_len=256, num_codebooks=K)
    both = D.load_corpus(f"{prepared},{copy}", seq_len=256, num_codebooks=K)
    assert len(both.utterances) == 2 * len(one.utterances)
    assert len(both.examples) == 2 * len(one.examples)  # not merged into conversations of twice the turns
    assert sorted(both.lengths) == sorted(one.lengths * 2)
    # Held-out data whose lines all occur in training is flagged (the eval loss would measure memorisation).
    ids = list(range(len(one.examples)))
    assert D.shared_text_fraction(one, ids, both, list(range(len(both.examples)))) == 1.0
    assert D.shared_text_fraction(one, ids[:1], one, ids[1:]) < 1.0
    train(_cfg(str(prepared), tmp_path / "warn", model_config=micro_config, steps=1, eval_data=str(copy)))
    assert "100% of the held-out utterances" in capsys.readouterr().out
    records = train(_cfg(f"{prepared},{copy}", tmp_path / "run", model_config=micro_config, steps=2))
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert (tmp_path / "run" / "step-000002" / "tokenizer.json").read_text() == (prepared / "tokenizer.json").read_text()
    (copy / "tokenizer.json").write_text((prepared / "tokenizer.json").read_text().replace("[", "[ ", 1))
    with pytest.raises(ValueError, match="different tokenizers"):
        train(_cfg(f"{prepared},{copy}", tmp_path / "bad", model_config=micro_config, steps=1))
    with pytest.raises(ValueError, match="different tokenizers"):
        train(_cfg(str(prepared), tmp_path / "bad2", model_config=micro_config, steps=1, eval_data=str(copy)))


# --- batches -------------------------------------------------------------------------------------------------------------


def test_amortization_selects_fraction_of_audio_frames(corpus):
    g = torch.Generator().manual_seed(0)
    idx = D.decoder_frames(160, 16, g)
    assert len(idx) == 10 and len(set(idx.tolist())) == 10 and idx.max() < 160 and torch.equal(idx, idx.sort().values)
    assert len(D.decoder_frames(5, 16, g)) == 1  # at least one frame per batch
    assert len(D.decoder_frames(0, 16, g)) == 0
    # The candidates are exactly the audio frames (EOS included) of the real examples: never text or padding.
    batch = D.collate(corpus, [[0, 1], [2]])
    expected = sum(corpus.utterances[u].codes.shape[1] + 1 for e in (0, 1, 2) for u in corpus.examples[e])
    assert int(D.audio_targets(batch.mask, K).sum()) == expected


def test_noisy_codes_swap_only_acoustic_codes_of_audio_frames(corpus):
    batch = D.collate(corpus, D.pack(range(len(corpus.examples)), corpus.lengths, 256)[:2])
    tokens, mask = batch.tokens, batch.mask
    noisy = D.noisy_codes(tokens, mask, K, 0.5, torch.Generator().manual_seed(0))
    audio = mask[..., 0] & tokens[..., :K].any(-1)
    assert torch.equal(noisy[~audio], tokens[~audio])  # text, padding and EOS frames untouched
    assert torch.equal(noisy[..., 0], tokens[..., 0]) and torch.equal(noisy[..., K], tokens[..., K])  # c0 and text
    changed = (noisy[audio][:, 1:K] != tokens[audio][:, 1:K]).float().mean()
    assert 0.2 < changed < 0.55  # ~half swapped (a swap can draw an equal code)
    for j in range(1, K):  # every new value is a code the same codebook has somewhere in the batch
        assert set(noisy[audio][:, j].tolist()) <= set(tokens[audio][:, j].tolist())
    assert D.noisy_codes(tokens, mask, K, 0.0, torch.Generator()) is tokens


def test_code_noise_trains_and_is_resumable(prepared, micro_config, tmp_path):
    """--code-noise: the backbone reads noisy codes, targets stay clean; the noise is a function of (seed, step)."""
    full = train(_cfg(prepared, tmp_path / "a", model_config=micro_config, save_every=3, code_noise=0.5))
    clean = train(_cfg(prepared, tmp_path / "c", model_config=micro_config, steps=1))
    assert full[0]["loss"] != pytest.approx(clean[0]["loss"], abs=1e-6)  # the noise reached the backbone
    resumed = train(_cfg(prepared, tmp_path / "b", model_config=micro_config, code_noise=0.5,
                         resume=str(tmp_path / "a" / "step-000003")))
    for r, ref in zip(resumed, full[3:]):
        assert r["loss"] == pytest.approx(ref["loss"], abs=1e-6, rel=0)
    with pytest.raises(ValueError, match="code_noise"):
        train(_cfg(prepared, tmp_path / "d", model_config=micro_config, code_noise=1.5))


def test_packing_masks_positions_and_loss(corpus):
    ids = [0, 1, 2]
    packed = D.collate(corpus, [ids])
    lens = [corpus.lengths[i] for i in ids]
    assert packed.tokens.shape[1] == sum(lens) and packed.num_frames == sum(lens)
    starts = np.cumsum([0] + lens)
    assert torch.equal(packed.input_pos[0], torch.cat([torch.arange(n) for n in lens]))
    attn = packed.attn_mask[0]
    for a, b in zip(starts[:-1], starts[1:]):
        block = attn[a:b, a:b]
        assert torch.equal(block, torch.ones_like(block).tril())
        assert not attn[a:b, :a].any() and not attn[a:b, b:].any()

    torch.manual_seed(0)
    module = CSMLoss(CSM(MICRO)).eval()

    def losses(batch):
        n = int(D.audio_targets(batch.mask, K).sum())
        _, c0, dec = module(batch.tokens, batch.mask, batch.input_pos, batch.attn_mask, torch.arange(n))
        return c0.item(), dec.item(), n

    with torch.no_grad():
        c0_p, dec_p, n_p = losses(packed)
        singles = [losses(D.collate(corpus, [[i]])) for i in ids]
        padded = D.collate(corpus, [[i] for i in ids])  # one per row, padded: plain causal attention
        assert padded.attn_mask is None
        c0_pad, dec_pad, _ = losses(padded)
    n = sum(s[2] for s in singles)
    assert n_p == n
    assert c0_p == pytest.approx(sum(s[0] * s[2] for s in singles) / n, abs=1e-5)
    assert dec_p == pytest.approx(sum(s[1] * s[2] for s in singles) / n, abs=1e-5)
    assert (c0_pad, dec_pad) == pytest.approx((c0_p, dec_p), abs=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(corpus):
    torch.manual_seed(0)
    module = CSMLoss(CSM(MICRO)).train()
    batch = D.collate(corpus, [[0, 1], [2]])
    idx = torch.arange(0, int(D.audio_targets(batch.mask, K).sum()), 3)
    grads = []
    for flag in (False, True):
        module.model.backbone.gradient_checkpointing = module.model.decoder.gradient_checkpointing = flag
        module.zero_grad()
        module(batch.tokens, batch.mask, batch.input_pos, batch.attn_mask, idx)[0].backward()
        grads.append([p.grad.clone() for p in module.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_epoch_batches_deterministic(corpus):
    ex = list(range(len(corpus.examples)))
    a = D.epoch_batches(ex, corpus.lengths, 128, 2, seed=1, epoch=3)
    assert a == D.epoch_batches(ex, corpus.lengths, 128, 2, seed=1, epoch=3)
    assert a != D.epoch_batches(ex, corpus.lengths, 128, 2, seed=1, epoch=4)
    for batch in a:
        for row in batch:
            assert sum(corpus.lengths[i] for i in row) <= 128


# --- training ------------------------------------------------------------------------------------------------------------


def test_loss_decreases_via_cli(prepared, micro_config, tmp_path):
    from csm.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--data", str(prepared), "--out", str(out), "--model-config", micro_config, "--steps", "40",
               "--seq-len", "128", "--batch-size", "2", "--lr", "3e-3", "--warmup-steps", "4", "--amortization", "4",
               "--log-every", "1", "--eval-fraction", "0.2", "--eval-every", "20", "--save-every", "0",
               "--device", "cpu"])
    assert rc == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert {"lr", "grad_norm", "frames_per_s", "c0_loss", "decoder_loss"} <= set(log[0])
    model, _ = load_checkpoint(out / "step-000040")
    assert model.cfg == MICRO and (out / "step-000040" / "tokenizer.json").is_file()


def test_warmup_stable_decay_holds_then_cools_to_min_lr():
    # 10 warmup steps, constant 1e-3 until step 80, then half a cosine period down to 1e-4 at step 100.
    cfg = TrainConfig(data="", out="", steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=20)
    assert lr_at(cfg, 4) == pytest.approx(5e-4)
    assert lr_at(cfg, 50) == lr_at(cfg, 80) == pytest.approx(1e-3)
    assert lr_at(cfg, 50, time_fraction=0.9) == pytest.approx(1e-3)  # a time budget does not cut the plateau
    assert lr_at(cfg, 90) == pytest.approx(5.5e-4)  # halfway down: the mean of peak and floor
    assert lr_at(cfg, 100) == lr_at(cfg, 150) == pytest.approx(1e-4)
    plain = TrainConfig(data="", out="", steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert lr_at(plain, 55) == pytest.approx(5.5e-4)  # without it: one cosine from warmup's end to --steps


def test_resume_gives_the_same_losses(prepared, micro_config, tmp_path):
    full = train(_cfg(prepared, tmp_path / "a", model_config=micro_config, save_every=3, grad_accum=2))
    resumed = train(_cfg(prepared, tmp_path / "b", model_config=micro_config, grad_accum=2,
                         resume=str(tmp_path / "a" / "step-000003")))
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for r, ref in zip(resumed, full[3:]):
        assert r["loss"] == pytest.approx(ref["loss"], abs=1e-6, rel=0)
    a, _ = load_checkpoint(tmp_path / "a" / "step-000006")
    b, _ = load_checkpoint(tmp_path / "b" / "step-000006")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6, rtol=0), k


def test_patience_keeps_the_best_checkpoint_and_stops(prepared, micro_config, tmp_path, monkeypatch):
    """--patience: each evaluation with a lower held-out loss is saved and out/best points to it; two evaluations
    without one end the run (the held-out losses are scripted, so the test knows which step is best)."""
    import importlib

    T = importlib.import_module("csm.train.train")  # the module (csm.train.train is also the function's name)
    losses = iter([3.0, 2.0, 2.5, 2.4, 1.0])
    monkeypatch.setattr(T, "evaluate", lambda *a, **k: {"eval_loss": next(losses), "eval_c0_loss": 0.0,
                                                         "eval_decoder_loss": 0.0})
    out = tmp_path / "p"
    records = train(_cfg(prepared, out, model_config=micro_config, steps=20, eval_every=1, eval_fraction=0.3,
                         patience=2))
    assert records[-1]["step"] == 4  # 2.5 and 2.4 are no lower than 2.0: stop at the second
    assert (out / "best").resolve() == (out / "step-000002").resolve()
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000001", "step-000002", "step-000004"]
    state = torch.load(out / "step-000004" / "train_state.pt", weights_only=True)
    assert state["best"] == {"loss": 2.0, "stale": 2}


def test_eval_only_measures_a_checkpoint_as_training_did(prepared, micro_config, tmp_path):
    records = train(_cfg(prepared, tmp_path / "a", model_config=micro_config, steps=4, save_every=4, eval_every=4,
                         eval_fraction=0.3))
    seen = [r["eval_loss"] for r in records if "eval_loss" in r][-1]
    for how in ({"init": str(tmp_path / "a" / "step-000004")}, {"resume": str(tmp_path / "a" / "step-000004")}):
        out = tmp_path / ("e-" + next(iter(how)))
        only = train(_cfg(prepared, out, model_config=None, steps=4, eval_fraction=0.3, eval_only=True, **how))
        assert len(only) == 1 and only[0]["eval_loss"] == pytest.approx(seen, rel=1e-5)
        assert json.loads((out / "eval.json").read_text())["eval_loss"] == only[0]["eval_loss"]
        assert not list(out.glob("step-*"))  # nothing trained, nothing saved
    untrained = train(_cfg(prepared, tmp_path / "r", model_config=micro_config, eval_fraction=0.3, eval_only=True))
    assert untrained[0]["eval_loss"] > seen


def test_time_budget_stops_and_saves(prepared, micro_config, tmp_path):
    """--max-minutes stops early, saves that step with its training time, and the LR had started to decay by time."""
    records = train(_cfg(prepared, tmp_path / "t", model_config=micro_config, steps=10_000, max_minutes=0.1,
                         warmup_steps=1, save_every=0, log_every=1))
    last = records[-1]["step"]
    assert 1 < last < 10_000
    state = torch.load(tmp_path / "t" / f"step-{last:06d}" / "train_state.pt", weights_only=True)
    assert state["step"] == last and state["train_seconds"] >= 0.1 * 60
    lrs = [r["lr"] for r in records if "lr" in r]
    assert lrs[-1] < lrs[1]  # the cosine followed the time budget, not the 10,000 steps


def test_lora_trains_only_adapters_and_merges(prepared, tmp_path):
    torch.manual_seed(0)
    base = CSM(MICRO)
    save_checkpoint(base, tmp_path / "base")
    train(_cfg(prepared, tmp_path / "lora", init=str(tmp_path / "base"), lora_rank=4, lora_alpha=8, steps=8,
               lr=1e-2))
    ckpt = tmp_path / "lora" / "step-000008"
    from safetensors.torch import load_file

    adapters = load_file(str(ckpt / "adapters.safetensors"))
    assert adapters and all(".lora_" in k for k in adapters)
    assert all(v.abs().sum() > 0 for k, v in adapters.items() if k.endswith("lora_b"))  # adapters did train

    # The adapted model: base weights + adapters. Its base weights are untouched.
    adapted, _ = load_checkpoint(tmp_path / "base")
    apply_lora(adapted, rank=4, alpha=8)
    adapted.load_state_dict(adapters, strict=False)
    for k, v in base.state_dict().items():
        assert torch.equal(adapted.state_dict()[k], v), k
    merged, _ = load_checkpoint(ckpt)
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert changed and all(".attn.w" in k or ".mlp.w" in k for k in changed)

    corpus = D.load_corpus(prepared, seq_len=128, num_codebooks=K)
    batch = D.collate(corpus, [[0, 1], [2]])
    with torch.no_grad():
        ha, la = adapted.eval().backbone_forward(batch.tokens, batch.mask, batch.input_pos, batch.attn_mask)
        hm, lm = merged.backbone_forward(batch.tokens, batch.mask, batch.input_pos, batch.attn_mask)
        codes = batch.tokens[0, :, :K]
        da, dm = adapted.decoder_logits(ha[0], codes), merged.decoder_logits(hm[0], codes)
    assert torch.allclose(la, lm, atol=1e-5) and torch.allclose(da, dm, atol=1e-5)
    assert not torch.allclose(la, base.eval().backbone_forward(batch.tokens, batch.mask, batch.input_pos,
                                                               batch.attn_mask)[1], atol=1e-4)

    # Resuming a LoRA run restores the adapters and continues.
    more = train(_cfg(prepared, tmp_path / "lora2", init=str(tmp_path / "base"), lora_rank=4, lora_alpha=8, steps=9,
                      lr=1e-2, resume=str(ckpt)))
    assert [r["step"] for r in more] == [9]


# --- torchrun --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_torchrun_two_processes_match_gradient_accumulation(prepared, micro_config, tmp_path, fsdp):
    """2 CPU processes (gloo) x 1 micro-batch == 1 process x 2 accumulated micro-batches: same data, same update."""
    import os
    import subprocess
    import sys

    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    # One eval batch: the second process has none to evaluate and must still keep step with the first.
    common = dict(model_config=micro_config, batch_size=1, pack=False, steps=3, save_every=0, eval_fraction=0.2,
                  eval_batches=1)
    ref = train(_cfg(prepared, tmp_path / "single", grad_accum=2, **common))
    out = tmp_path / "multi"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "csm.cli",
           "train", "--data", str(prepared), "--out", str(out), "--model-config", micro_config, "--steps", "3",
           "--seq-len", "128", "--batch-size", "1", "--no-pack", "--lr", "3e-3", "--min-lr", "3e-4",
           "--warmup-steps", "2", "--amortization", "4", "--eval-fraction", "0.2", "--eval-batches", "1", "--log-every", "1",
           "--device", "cpu", "--fsdp" if fsdp else "--no-fsdp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in ref], abs=1e-5)
    assert log[-1]["eval_loss"] == pytest.approx(ref[-1]["eval_loss"], abs=1e-5)
    a, _ = load_checkpoint(tmp_path / "single" / "step-000003")
    b, _ = load_checkpoint(out / "step-000003")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-5), k


def test_package_voice_script(prepared, micro_config, tmp_path):
    """scripts/package_voice.py: float16 model + codec + tokenizer + generation.json + a card from the logs and an
    eval run without speaker similarity (`csm eval --no-speaker`)."""
    import subprocess
    import sys
    from pathlib import Path

    from csm.mimi import Mimi, preset, save_mimi

    train(_cfg(prepared, tmp_path / "run", model_config=micro_config, steps=2))
    codec = save_mimi(Mimi(preset("tiny")), tmp_path / "codec")
    scores = {"summary": {"n": 3, "wer": 0.5, "speaker_closer_fraction": None, "rtf": 0.3}}
    (tmp_path / "eval.json").write_text(json.dumps(scores))
    corpus = tmp_path / "corpus"  # a make_corpus.py folder that used two of its three voices
    corpus.mkdir()
    voices = [{"name": n, "description": f"{n} voice"} for n in ("a", "b", "c")]
    (corpus / "corpus.json").write_text(json.dumps({"seed": 1, "speakers": [0, 2], "voices": voices}))
    _manifest(corpus / "manifest.jsonl", [{"audio": "a.wav", "text": "It's five o'clock, Maya!"},
                                          {"audio": "b.wav", "text": "Five more, please."}])
    script = Path(__file__).parent.parent / "scripts" / "package_voice.py"
    out = tmp_path / "voice"
    subprocess.run([sys.executable, str(script), "--model", str(tmp_path / "run" / "step-000002"), "--codec",
                    str(codec), "--out", str(out), "--eval", str(tmp_path / "eval.json"), "--generation",
                    '{"topk": 5}', "--corpus", str(corpus)], check=True, capture_output=True)
    assert json.loads((out / "generation.json").read_text()) == {"topk": 5, "speakers": {"0": "a voice",
                                                                                          "2": "c voice"}}
    assert "- 2: c voice" in (out / "MODEL_CARD.md").read_text()
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json", "codec",
                                               "generation.json", "MODEL_CARD.md"}
    model, _ = load_checkpoint(out)
    assert next(model.parameters()).dtype == torch.float32  # stored in float16, loaded as float32
    card = (out / "MODEL_CARD.md").read_text()
    assert "On 3 held-out sentences: WER 50.0 %" in card and "closer" not in card
    # csm eval --repeats: sentences x seeds, with the WER of each seed
    scores["summary"].update(n=6, rounds=[{"seed": 0, "wer": 0.4}, {"seed": 100, "wer": 0.6}])
    (tmp_path / "eval.json").write_text(json.dumps(scores))
    subprocess.run([sys.executable, str(script), "--model", str(tmp_path / "run" / "step-000002"), "--codec",
                    str(codec), "--out", str(out), "--eval", str(tmp_path / "eval.json"), "--corpus", str(corpus)],
                   check=True, capture_output=True)
    card = (out / "MODEL_CARD.md").read_text()
    assert "On 3 held-out sentences, each generated with 2 seeds (0, 100; WER per seed 40.0 / 60.0 %), pooled: " \
           "WER 50.0 %" in card

    # --swap-codec: a new codec (and its scores and notes) for the packaged voice; the CSM and the rest stay
    torch.manual_seed(1)
    new_codec = Mimi(preset("tiny"))
    new_dir = save_mimi(new_codec, tmp_path / "codec-run" / "step-000007")  # as csm train-codec lays out a run
    with open(tmp_path / "codec-run" / "log.jsonl", "w") as f:
        f.write(json.dumps({"step": 7, "train_minutes": 1.5, "val_mel_l1": 0.75}) + "\n")
    # it is a decoder-only fine-tune (its saved config names the codec it began from, whose log says how it was made)
    base = save_mimi(Mimi(preset("tiny")), tmp_path / "base-run" / "step-000040")
    (tmp_path / "base-run" / "log.jsonl").write_text(json.dumps({"step": 40, "train_minutes": 9.0,
                                                                 "val_mel_l1": 0.9}) + "\n")
    torch.save({"config": {"init": str(base), "decoder_only": True, "decode_codebooks": 8}},
               new_dir / "train_state.pt")
    scores["summary"].update(wer=0.25, rounds=[{"seed": 0, "wer": 0.2}, {"seed": 100, "wer": 0.3}])
    (tmp_path / "eval.json").write_text(json.dumps(scores))
    model_bytes = (out / "model.safetensors").read_bytes()
    subprocess.run([sys.executable, str(script), "--swap-codec", str(new_dir), "--out", str(out), "--eval",
                    str(tmp_path / "eval.json"), "--notes", "A piper-weighted codec."], check=True, capture_output=True)
    assert (out / "model.safetensors").read_bytes() == model_bytes
    from csm.mimi import load_mimi
    swapped = load_mimi(out / "codec").state_dict()
    for k, v in new_codec.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(swapped[k], v.half().float())
    new_card = (out / "MODEL_CARD.md").read_text()
    assert (f"  Trained 7 steps (1.5 min), fine-tuned (decoder side only, decoding from the first 8 codebooks) from "
            f"`{base}`, itself trained 40 steps (9.0 min); held-out log-mel L1 0.750.") in new_card
    assert "\nA piper-weighted codec.\n\n## Scores" in new_card
    assert "WER per seed 20.0 / 30.0 %), pooled: WER 25.0 %" in new_card and "WER 50.0 %" not in new_card
    assert new_card.split("## Models")[0] == card.split("## Models")[0]  # data, speakers: untouched
    assert new_card.count("- Codec:") == 1 and "Files: " in new_card

    # --swap-model: a CSM fine-tuned from the packaged one, on a new corpus of two of the voices; the codec stays
    train(_cfg(prepared, tmp_path / "ft", model_config=None, init=str(out), steps=2))
    new = tmp_path / "corpus2"
    new.mkdir()
    (new / "corpus.json").write_text(json.dumps({"seed": 9, "speakers": [0, 2], "voices": voices[::2]}))
    _manifest(new / "manifest.jsonl", [{"audio": "a.wav", "text": "Five bottles, Maya."}])
    codec_bytes = (out / "codec" / "model.safetensors").read_bytes()
    subprocess.run([sys.executable, str(script), "--swap-model", str(tmp_path / "ft" / "step-000002"), "--out",
                    str(out), "--corpus", str(new), "--notes", "Fine-tuned."], check=True, capture_output=True)
    assert (out / "codec" / "model.safetensors").read_bytes() == codec_bytes
    tuned, _ = load_checkpoint(tmp_path / "ft" / "step-000002")
    packaged, _ = load_checkpoint(out)
    for k, v in tuned.state_dict().items():
        torch.testing.assert_close(packaged.state_dict()[k], v.half().float())
    ft_card = (out / "MODEL_CARD.md").read_text()
    assert ft_card.count("- CSM:") == 1 and f"`--init {out}`" in ft_card
    data = ft_card.split("## Data")[1].split("## Models")[0]
    assert data.index("(seed 1), 2 utterances") < data.index("(seed 9), 1 utterances, speakers 0, 2.")
    assert "\nFine-tuned.\n\n## Scores" in ft_card and "WER 25.0 %" in ft_card  # scores kept without --eval
    assert ft_card.split("## Models")[1].count("- Codec:") == 1
    # a checkpoint with another tokenizer is refused, and the packaged voice is left as it was
    (tmp_path / "ft" / "step-000002" / "tokenizer.json").write_text("{}")
    r = subprocess.run([sys.executable, str(script), "--swap-model", str(tmp_path / "ft" / "step-000002"), "--out",
                        str(out)], capture_output=True, text=True)
    assert r.returncode != 0 and "another tokenizer" in r.stderr
    assert (out / "MODEL_CARD.md").read_text() == ft_card


def test_training_can_be_watched(prepared, micro_config, tmp_path):
    """TensorBoard events beside log.jsonl: the losses, the held-out loss, and with --listen the held-out lines
    spoken at each evaluation (with Whisper's WER when faster-whisper is installed)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from csm.mimi import Mimi, preset, save_mimi

    save_mimi(Mimi(preset("tiny-mel")).eval(), tmp_path / "codec")  # 4 codebooks, like the micro model
    (tmp_path / "lines.txt").write_text("hello there\nhow are you today\nunused line\n")
    records = train(_cfg(prepared, tmp_path / "w", model_config=micro_config, steps=4, eval_every=2,
                         eval_fraction=0.3, listen=str(tmp_path / "lines.txt"), listen_codec=str(tmp_path / "codec"),
                         listen_lines=2, progress=False))
    events = EventAccumulator(str(tmp_path / "w" / "tb"), size_guidance={"audio": 0}).Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "eval/eval_loss"} <= set(tags["scalars"])
    assert sorted(tags["audio"]) == ["listen/0", "listen/1"]
    assert [e.step for e in events.Audio("listen/0")] == [2, 4]
    try:
        import faster_whisper  # noqa: F401
    except ImportError:
        return
    assert "eval/listen_wer" in tags["scalars"] and all("listen_wer" in r for r in records if "eval_loss" in r)


def test_listening_leaves_the_trained_model_as_it_was(prepared, micro_config, tmp_path):
    """The listener speaks with the very model being trained: it must not fuse its projections (new tensors the
    optimizer would not hold) nor leave it in eval mode."""
    from csm.mimi import Mimi, preset, save_mimi
    from csm.train.watch import Listener, Watch

    save_mimi(Mimi(preset("tiny-mel")).eval(), tmp_path / "codec")
    (tmp_path / "lines.txt").write_text("hello there\n")
    torch.manual_seed(0)
    model = CSM(MICRO).train()
    before = {n: p for n, p in model.named_parameters()}
    listener = Listener(str(tmp_path / "lines.txt"), 3, str(tmp_path / "codec"), prepared / "tokenizer.json", None,
                        torch.device("cpu"))
    listener(model, Watch(tmp_path, 1, 0, "x", enabled=False), 0)
    assert model.training and {n: p for n, p in model.named_parameters()} == before


def test_a_run_ends_with_its_curves_as_a_png(prepared, micro_config, tmp_path):
    pytest.importorskip("matplotlib")
    from csm.cli import main

    train(_cfg(prepared, tmp_path / "p", model_config=micro_config, steps=3, eval_fraction=0.3, eval_every=1,
               progress=False))
    png = tmp_path / "p" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png.unlink()
    assert main(["plot", str(tmp_path / "p"), "-o", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_lora_targets_choose_the_adapted_linears(prepared, tmp_path):
    from csm.train.lora import parse_targets

    assert parse_targets("attn") == (("backbone", "decoder"), ("attn.wq", "attn.wk", "attn.wv", "attn.wo"))
    assert parse_targets("decoder:mlp.w2,attn.wv") == (("decoder",), ("mlp.w2", "attn.wv"))
    with pytest.raises(ValueError, match="bad LoRA targets"):
        parse_targets("encoder:attn")
    torch.manual_seed(0)
    save_checkpoint(CSM(MICRO), tmp_path / "base")
    (tmp_path / "base" / "generation.json").write_text('{"speaker": 1}')  # a voice's defaults and codec travel
    (tmp_path / "base" / "codec").mkdir()
    (tmp_path / "base" / "codec" / "config.json").write_text("{}")
    train(_cfg(prepared, tmp_path / "lora", init=str(tmp_path / "base"), lora_rank=2, steps=2,
               lora_targets="decoder:attn"))
    step = tmp_path / "lora" / "step-000002"
    assert (step / "generation.json").read_text() == '{"speaker": 1}' and (step / "codec" / "config.json").is_file()
    from safetensors.torch import load_file

    adapters = load_file(str(tmp_path / "lora" / "step-000002" / "adapters.safetensors"))
    assert adapters and all(k.startswith("decoder.") and ".attn.w" in k for k in adapters)
    meta = json.loads((tmp_path / "lora" / "step-000002" / "lora.json").read_text())
    assert meta["stacks"] == ["decoder"] and meta["targets"] == ["attn.wq", "attn.wk", "attn.wv", "attn.wo"]


def test_package_a_phoneme_voice_in_int8(micro_config, tmp_path):
    """package_voice.py --int8 for a voice that reads phonemes: the big matrices stored as int8 rows (the card
    says so), and the packaged voice loads and speaks."""
    pytest.importorskip("piper.phonemize_espeak")
    import subprocess
    import sys
    from pathlib import Path

    from csm.generate import load_generator
    from csm.mimi import Mimi, preset, save_mimi
    from csm.tokenizer import train_phoneme_tokenizer

    rows = _make_corpus(tmp_path)
    _manifest(tmp_path / "m.jsonl", rows)
    tok = train_phoneme_tokenizer([f"[{r['speaker']}]{r['text']}" for r in rows])
    D.prepare(tmp_path / "m.jsonl", tmp_path / "prep", FakeCodec(), tok, progress=False)
    train(_cfg(tmp_path / "prep", tmp_path / "run", model_config=micro_config, steps=2))
    save_mimi(Mimi(preset("tiny-mel")), tmp_path / "codec")
    script = Path(__file__).parent.parent / "scripts" / "package_voice.py"
    out = tmp_path / "voice"
    for int8 in ([], ["--int8"]):
        subprocess.run([sys.executable, str(script), "--model", str(tmp_path / "run" / "step-000002"), "--codec",
                        str(tmp_path / "codec"), "--out", str(out / ("i8" if int8 else "f16")), *int8],
                       check=True, capture_output=True)
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(out / "i8") < size(out / "f16") and size(out / "i8" / "codec") < size(out / "f16" / "codec")
    card = (out / "i8" / "MODEL_CARD.md").read_text()
    assert "int8 rows" in card and "espeak-ng phonemes" in card
    from csm.mimi import load_model_codec

    gen = load_generator(out / "i8", codec=load_model_codec(out / "i8"))
    assert gen.tokenizer.phonemes == "en-us"
    assert gen.generate("Call me at 4:30.", speaker=0, seed=0, max_audio_length_ms=160).audio is not None


def test_replay_mixes_base_data_into_each_epoch_and_names_the_new_speaker(prepared, tmp_path):
    """--replay: the base's data fills replay_share of every epoch (drawn afresh, never held out), a killed run
    resumes exactly, and a fine-tune on a new speaker id lists it in generation.json as the default speaker."""
    from csm.tokenizer import TextTokenizer

    root = tmp_path / "me"
    root.mkdir()
    rows = [dict(r, speaker=5) for r in _make_corpus(root, n_convs=4)]
    _manifest(root / "manifest.jsonl", rows)
    tok = TextTokenizer.from_file(prepared / "tokenizer.json")
    D.prepare(root / "manifest.jsonl", root / "prep", FakeCodec(), tok, shard_size=5, progress=False)
    torch.manual_seed(0)
    save_checkpoint(CSM(MICRO), tmp_path / "base")
    base_gen = {"speaker": 0, "speakers": {"0": "a", "1": "b"}}
    (tmp_path / "base" / "generation.json").write_text(json.dumps(base_gen))

    cfg = _cfg(root / "prep", tmp_path / "ft", init=str(tmp_path / "base"), replay=str(prepared), replay_share=0.6,
               eval_fraction=0.3, steps=6, save_every=3, lora_rank=4, lora_alpha=8)
    from csm.train.train import load_data

    corpus, own, replay, eval_corpus, eval_batches = load_data(cfg, MICRO, 128, verbose=False)
    assert eval_corpus is corpus
    assert {corpus.sources[i] for i in own} == {0} and {corpus.sources[i] for i in replay} == {1}
    held = {i for b in eval_batches for row in b for i in row}
    assert held and held.isdisjoint(own) and held.isdisjoint(replay)
    e0, e1 = (D.with_replay(own, replay, 0.6, 0, e) for e in (0, 1))
    n = min(len(replay), round(len(own) * 0.6 / 0.4))
    assert e0[: len(own)] == own and len(e0) == len(own) + n and set(e0[len(own):]) <= set(replay)
    assert e0 == D.with_replay(own, replay, 0.6, 0, 0) and (e0 != e1 or n == len(replay))

    full = train(cfg)
    resumed = train(dataclasses.replace(cfg, out=str(tmp_path / "ft2"), resume=str(tmp_path / "ft" / "step-000003")))
    assert [r["step"] for r in resumed if "loss" in r] == [4, 5, 6]
    for r, ref in zip(resumed, [r for r in full if r["step"] > 3 and "loss" in r]):
        assert r["loss"] == pytest.approx(ref["loss"], abs=1e-6, rel=0)
    gen = json.loads((tmp_path / "ft" / "step-000006" / "generation.json").read_text())
    assert gen["speakers"] == {"0": "a", "1": "b", "5": f"fine-tuned on {root / 'prep'}"} and gen["speaker"] == 5
    assert json.loads((tmp_path / "base" / "generation.json").read_text()) == base_gen  # the base's file untouched
