"""Codec training (csm.train.codec): the tiny Mimi preset on synthetic audio, all on CPU in well under a minute."""

from __future__ import annotations

import argparse
import json
import math
import shutil

import pytest
import torch

from csm.mimi import load_mimi
from csm.mimi.config import preset
from csm.mimi.spectral import mel_filterbank
from csm.train.codec import CodecTrainConfig, add_subcommand, train_codec
from csm.train.codec_data import ClipSet, CodeSet, audio_paths
from csm.train.codec_losses import MultiScaleMelLoss, parse_mel_scales
from csm.train.codec_model import CodecModel, EMACodebooks, quantize_train

SR = 24_000


def synth_clips(n: int, seconds: float, seed: int = 0) -> list[torch.Tensor]:
    """Harmonic tones with vibrato and an amplitude envelope: speech-like enough for a codec to learn."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR)) / SR
    clips = []
    for _ in range(n):
        f0 = 100 + 150 * torch.rand((), generator=g)
        phase = 2 * math.pi * torch.cumsum(f0 * (1 + 0.05 * torch.sin(2 * math.pi * 3 * t)), 0) / SR
        x = sum((0.5 / k) * torch.sin(k * phase) for k in range(1, 6))
        env = 0.5 * (1 - torch.cos(2 * math.pi * t * (1 + 2 * torch.rand((), generator=g)))) + 0.1
        clips.append((0.2 * env * x).float())
    return clips


def tiny_cfg(out, **kw) -> CodecTrainConfig:
    base = dict(data="unused", out=str(out), preset="tiny", segment_frames=40, batch_size=4, steps=40, lr=3e-3,
                min_lr=3e-4, warmup_steps=5, log_every=1, eval_every=0, save_every=0, threads=1, progress=False,
                mel_scales="256,512", eval_clips=2)
    base.update(kw)
    return CodecTrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("codec")
    clips = ClipSet(synth_clips(6, 0.6))
    evals = synth_clips(2, 0.4, seed=1)
    records = train_codec(tiny_cfg(out), clips=clips, eval_clips=evals)
    return out, records, evals


def test_loss_decreases(trained):
    _, records, _ = trained
    mel = [r["mel_loss"] for r in records if "mel_loss" in r]
    assert len(mel) == 40
    first, last = sum(mel[:5]) / 5, sum(mel[-5:]) / 5
    assert last < 0.9 * first, (first, last)  # ~0.83 with the 3e-3 mel floor (~0.7 with 1e-5)
    final = records[-1]
    assert {"val_mel_l1", "val_snr", "val_code_perplexity"} <= set(final)
    assert math.isfinite(final["val_mel_l1"])


def test_checkpoint_loads_with_load_mimi(trained):
    out, _, evals = trained
    ckpt = out / "step-000040"
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == "mimi"
    mimi = load_mimi(ckpt)
    assert mimi.cfg == preset("tiny")
    x = evals[0][: mimi.frame_size * 3]
    codes = mimi.encode(x)
    assert codes.shape == (4, 3) and codes.max() < mimi.cfg.codebook_size
    y = mimi.decode(codes)
    assert y.shape == (3 * mimi.frame_size,) and torch.isfinite(y).all()
    assert mimi.decode(codes[:1]).shape == y.shape  # semantic codebook only
    # The transformers-layout export holds Mimi's EMA codebook tensors and round-trips exactly.
    from safetensors.torch import load_file

    sd = load_file(str(ckpt / "model.safetensors"))
    assert "quantizer.semantic_residual_vector_quantizer.layers.0.codebook.embed_sum" in sd
    assert "quantizer.acoustic_residual_vector_quantizer.layers.2.codebook.cluster_usage" in sd
    model = CodecModel(preset("tiny"))
    model.load_export(sd)
    assert torch.equal(model.mimi.encode(x), codes)


def test_decoder_only_finetune_keeps_codes(trained, tmp_path):
    """--init + --decoder-only: the decoder improves while the encoder, quantizer and so the codes stay bit-exact."""
    out, _, evals = trained
    init = out / "step-000040"
    clips = ClipSet(synth_clips(6, 0.6))
    records = train_codec(tiny_cfg(tmp_path / "ft", init=str(init), decoder_only=True, steps=30, lr=1e-3,
                                   warmup_steps=2), clips=clips, eval_clips=evals)
    mel = [r["mel_loss"] for r in records if "mel_loss" in r]
    assert sum(mel[-5:]) / 5 < sum(mel[:5]) / 5, mel
    before, after = load_mimi(init), load_mimi(tmp_path / "ft" / "step-000030")
    sd0, sd1 = before.state_dict(), after.state_dict()
    frozen = ("encoder.", "encoder_transformer.", "downsample.", "quantizer.")
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0 if k.startswith(frozen))
    assert any(not torch.equal(sd0[k], sd1[k]) for k in sd0 if k.startswith("decoder."))
    x = evals[0]
    assert torch.equal(before.encode(x), after.encode(x))
    with pytest.raises(ValueError, match="--init"):
        train_codec(tiny_cfg(tmp_path / "x", decoder_only=True), clips=clips)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        train_codec(tiny_cfg(tmp_path / "y", init=str(tmp_path)), clips=clips)


def test_decoder_only_decodes_the_first_k_codebooks(trained, tmp_path):
    """--decode-codebooks K: the fine-tune's audio is the decoding of the clip's first K codes (a voice's CSM
    generates 8 of the codec's 16), not of all of them."""
    out, _, evals = trained
    mimi = load_mimi(out / "step-000040")
    x = evals[0][None, None, : 8 * 1920]
    codes = mimi.encode(x[0, 0])[None]
    k = 1
    model = CodecModel(mimi.cfg)
    model.mimi.load_state_dict(mimi.state_dict())
    with torch.no_grad():
        got = model.forward_decoder_only(x, k)["recon"]
        want = mimi.decode_latent(mimi.quantizer.decode(codes[:, :k]))
        every = model.forward_decoder_only(x)["recon"]
    # (a briefly trained tiny codec puts little in its later codebooks: the gap is small but 100x the noise)
    assert (got - want).abs().max() < 1e-6 and (got - every).abs().max() > 1e-4
    with pytest.raises(ValueError, match="--decoder-only"):
        train_codec(tiny_cfg(tmp_path / "x", decode_codebooks=k), clips=ClipSet(evals))
    with pytest.raises(ValueError, match="codebooks"):
        train_codec(tiny_cfg(tmp_path / "y", init=str(out / "step-000040"), decoder_only=True,
                             decode_codebooks=mimi.cfg.num_codebooks + 1), clips=ClipSet(evals))


@pytest.mark.parametrize("int8", [False, True])
def test_init_from_packaged_codec(trained, tmp_path, int8):
    """--init also takes a packaged codec (save_mimi, float16 or int8 rows, codebooks without EMA statistics, as
    the shipped voice stores it): the decoder-only fine-tune then starts from exactly those weights and keeps its
    codes."""
    from csm.checkpoints import load_state_dict_file
    from csm.mimi import save_mimi

    out, _, evals = trained
    packed = save_mimi(load_mimi(out / "step-000040"), tmp_path / "packed", dtype=torch.float16, int8=int8)
    start = load_mimi(packed)
    model = CodecModel(preset("tiny"))
    model.load_codec(load_state_dict_file(packed / "model.safetensors"))
    assert all(torch.equal(v, start.state_dict()[k]) for k, v in model.mimi.state_dict().items())
    assert torch.equal(model.semantic_books.codebooks(), start.quantizer.semantic.codebooks)
    train_codec(tiny_cfg(tmp_path / "ft", init=str(packed), decoder_only=True, steps=3, warmup_steps=1),
                clips=ClipSet(synth_clips(4, 0.6)), eval_clips=evals)
    x = evals[0]
    assert torch.equal(start.encode(x), load_mimi(tmp_path / "ft" / "step-000003").encode(x))


def test_training_codes_match_inference_codes():
    torch.manual_seed(0)
    model = CodecModel(preset("tiny")).eval()
    cfg = tiny_cfg("unused")
    latent = torch.randn(2, model.cfg.dim, 7, requires_grad=True)
    keep = torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():  # a first training call initialises the codebooks from the batch and updates them
        quantize_train(model.mimi.quantizer.acoustic, model.acoustic_books, latent, keep, cfg)
    q, commit, codes, _ = quantize_train(model.mimi.quantizer.acoustic, model.acoustic_books, latent, keep, cfg,
                                         update=False)
    model.sync_codebooks()
    with torch.no_grad():
        ref = model.mimi.quantizer.acoustic.encode(latent, 3)
    assert torch.equal(codes, ref)
    # straight-through: the reconstruction's gradient reaches the latent, and so does the commitment loss'
    (q.square().sum() + commit).backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0
    # without the straight-through the forward value is the dequantized latent
    with torch.no_grad():
        assert torch.allclose(q, model.mimi.quantizer.acoustic.decode(codes), atol=1e-5)


def test_ema_update_and_dead_code_replacement():
    books = EMACodebooks(1, 4, 2)
    vecs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 3.0]])
    books.init_from(0, vecs)  # 4 vectors, 4 codes: each vector once, usage 1
    assert torch.allclose(books.cluster_usage[0], torch.ones(4))
    assert sorted(books.codebook(0).tolist()) == sorted(vecs.tolist())
    cb = books.codebook(0).clone()
    # Two batch vectors near code 0, none for the others; decay 0.5.
    target = cb[0]
    batch = torch.stack([target + 0.2, target - 0.1 + 0.1])
    idx = torch.zeros(2, dtype=torch.long)
    replaced = books.update(0, batch, idx, decay=0.5, dead_ratio=0.0)
    assert replaced == 0
    assert torch.allclose(books.cluster_usage[0], torch.tensor([1.5, 0.5, 0.5, 0.5]))
    expected0 = 0.5 * target + 0.5 * batch.sum(0)
    assert torch.allclose(books.embed_sum[0, 0], expected0)
    assert torch.allclose(books.codebook(0)[0], expected0 / 1.5)
    assert torch.allclose(books.codebook(0)[1:], cb[1:])  # unused codes: usage and sum decay together
    # Dead codes: after more batches without them, codes 1..3 fall below 0.5 x mean usage and are replaced
    # by batch vectors.
    torch.manual_seed(0)
    new_batch = torch.tensor([[10.0, 10.0], [10.0, 10.0]])
    replaced = books.update(0, new_batch, idx, decay=0.5, dead_ratio=0.5)
    assert replaced == 3
    cb = books.codebook(0)
    for i in (1, 2, 3):
        assert torch.allclose(cb[i], torch.tensor([10.0, 10.0]))
    mean = books.cluster_usage[0].sum() / 4
    assert torch.all(books.cluster_usage[0] >= 0.5 * mean - 1e-6)


def test_resume_continues_identically(tmp_path):
    clips = ClipSet(synth_clips(4, 0.5, seed=3))
    kw = dict(steps=6, segment_frames=20, batch_size=2, save_every=3, warmup_steps=2)
    full = train_codec(tiny_cfg(tmp_path / "a", **kw), clips=clips)
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "step-000003", tmp_path / "b" / "step-000003")
    resumed = train_codec(tiny_cfg(tmp_path / "b", resume="latest", **kw), clips=clips)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for a, b in zip(full[3:], resumed):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    a_sd = load_mimi(tmp_path / "a" / "step-000006").state_dict()
    b_sd = load_mimi(tmp_path / "b" / "step-000006").state_dict()
    for k in a_sd:
        assert torch.allclose(a_sd[k], b_sd[k], atol=1e-5), k


def test_adversarial_step_runs(tmp_path):
    clips = ClipSet(synth_clips(2, 0.5, seed=4))
    records = train_codec(tiny_cfg(tmp_path, steps=2, segment_frames=20, batch_size=2, adversarial=True,
                                   save_every=2), clips=clips)
    assert {"adv", "feat", "disc_loss"} <= set(records[-1])
    state = torch.load(tmp_path / "step-000002" / "train_state.pt", weights_only=True)
    assert "discriminator" in state


def test_mel_filterbank_and_loss():
    fb = mel_filterbank(512, 64, SR)
    assert fb.shape == (64, 257) and (fb.sum(1) > 0).all()
    assert parse_mel_scales("256,1024") == ((256, 32), (1024, 80))
    loss = MultiScaleMelLoss(SR, parse_mel_scales("256,512"))
    x = synth_clips(1, 0.3)[0][None]
    assert float(loss(x, x)) == 0.0
    assert float(loss(0.5 * x, x)) > 0.1


def write_code_folder(folder, frames=(6, 8, 7), draws=2, gta_offset=8):
    """A scripts/gta_codes.py folder whose codes and audio both say which frame they are: frame f of every clip is
    the constant (f + 1) / 100, its codes f (own) and f + gta_offset * (r + 1) (draw r)."""
    import soundfile as sf
    from safetensors.torch import save_file

    fs, k = preset("tiny").frame_size, preset("tiny").num_codebooks
    folder.mkdir()
    tensors, rows = {}, []
    for i, n in enumerate(frames):
        audio = torch.arange(1, n + 1).repeat_interleave(fs).float() / 100
        sf.write(str(folder / f"c{i}.wav"), audio[: n * fs - fs // 2].numpy(), SR, subtype="FLOAT")  # a short tail
        true = torch.arange(n).repeat(k, 1)
        tensors[f"true.{i}"] = true.to(torch.int16)
        tensors[f"gta.{i}"] = torch.stack([true + gta_offset * (r + 1) for r in range(draws)]).to(torch.int16)
        rows.append({"audio": str(folder / f"c{i}.wav"), "text": "x", "speaker": 0, "frames": n})
    save_file(tensors, str(folder / "codes.safetensors"))
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_code_folder_crops_stay_frame_aligned(tmp_path):
    """A GTA crop's audio is the very frames its codes stand for, whether the codes are the clip's own or a draw."""
    fs = preset("tiny").frame_size
    codes_set = CodeSet.load(write_code_folder(tmp_path / "gta"), SR, fs)
    assert [len(c) for c in codes_set.clips] == [6 * fs, 8 * fs, 7 * fs]  # the short tail padded to whole frames
    for share in (0.0, 1.0):
        wav, codes = codes_set.batch(16, 4, share, torch.Generator().manual_seed(0))
        assert wav.shape == (16, 1, 4 * fs) and codes.shape == (16, 4, 4)
        frame = codes % 8  # which frame of its clip each code stands for
        assert torch.equal(codes >= 8, torch.full_like(codes, share == 1.0))  # own codes or draws, as asked
        assert torch.equal(codes, codes[:, :1].expand_as(codes))  # all codebooks of a frame from the same source
        assert torch.equal(frame[:, 0, 1:] - frame[:, 0, :-1], torch.ones(16, 3, dtype=torch.long))
        level = wav[:, 0, fs // 4:: fs]  # a sample in each frame's first half (the written clips lack the second of their last)
        assert torch.allclose(level, (frame[:, 0] + 1).float() / 100)
    _, codes = codes_set.batch(64, 4, 0.5, torch.Generator().manual_seed(1))
    drawn = codes[:, 0, 0] >= 8
    assert 10 < int(drawn.sum()) < 54 and {8, 16} == set((codes[drawn, 0, 0] - codes[drawn, 0, 0] % 8).tolist())
    train, held = codes_set.split(1, seed=0)
    assert len(train) == 2 and len(held) == 1
    second = write_code_folder(tmp_path / "gta2", frames=(5,))
    both = CodeSet.load(f"{tmp_path / 'gta'},{second}", SR, fs)  # comma-joined folders: one set
    assert len(both) == 4 and torch.equal(both.true[3], CodeSet.load(second, SR, fs).true[0])


def test_decoder_learns_from_a_code_folder(trained, tmp_path):
    """--data a GTA folder + --decoder-only: the decoder trains on its codes, the codes' side stays frozen, the log
    holds the held-out draws' mel error; without --decoder-only it is refused."""
    out, _, _ = trained
    init = out / "step-000040"
    folder = write_code_folder(tmp_path / "gta", frames=(12, 14, 13, 12), gta_offset=8)
    records = train_codec(tiny_cfg(tmp_path / "ft", data=str(folder), init=str(init), decoder_only=True, steps=4,
                                   segment_frames=6, eval_clips=1, warmup_steps=1))
    assert any("val_gta_mel_l1" in r and math.isfinite(r["val_gta_mel_l1"]) for r in records)
    before, after = load_mimi(init).state_dict(), load_mimi(tmp_path / "ft" / "step-000004").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quantizer.")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    with pytest.raises(ValueError, match="--decoder-only"):
        train_codec(tiny_cfg(tmp_path / "x", data=str(folder), init=str(init)))


def test_data_and_cli(tmp_path):
    import soundfile as sf

    for i, clip in enumerate(synth_clips(2, 0.3)):
        sf.write(str(tmp_path / f"c{i}.wav"), clip.numpy(), 16_000)  # resampled to 24 kHz on load
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"audio": f"c{i}.wav", "text": "x"}) + "\n" for i in range(2)))
    assert len(audio_paths(tmp_path)) == 2 and len(audio_paths(tmp_path / "m.jsonl")) == 2
    mixed = audio_paths(f"{tmp_path / 'm.jsonl'},{tmp_path}")  # comma-joined sources: concatenated
    assert mixed == [tmp_path / "c0.wav", tmp_path / "c1.wav"] * 2
    clips = ClipSet.load(audio_paths(tmp_path / "m.jsonl"), SR)
    assert len(clips.clips[0]) == int(0.3 * SR) * 3 // 2  # 7200 samples written at 16 kHz: 0.45 s at 24 kHz
    batch = clips.batch(3, 10_000, torch.Generator().manual_seed(0))  # longer than the clips: zero-padded
    assert batch.shape == (3, 1, 10_000)
    p = argparse.ArgumentParser()
    add_subcommand(p.add_subparsers(dest="command"))
    args = p.parse_args(["train-codec", "--data", "d", "--out", "o", "--steps", "5", "--adversarial", "--resume"])
    assert args.steps == 5 and args.adversarial and args.resume == "latest" and args.preset == "embedded"


def test_registers_in_csm_cli():
    import csm.cli

    assert "csm.train.codec" in csm.cli.SUBCOMMAND_MODULES
    args = csm.cli.build_parser().parse_args(["train-codec", "--data", "d", "--out", "o"])
    assert args.command == "train-codec" and args.preset == "embedded" and callable(args.func)
