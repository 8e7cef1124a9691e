"""The mel / iSTFT codec (csm/mimi/spectral.py): its STFT and inverse STFT against torch's, exact streaming, training
and loading through the same paths as the SEANet Mimi."""

from __future__ import annotations

import json

import pytest
import torch

from csm.mimi import Mimi, load_mimi, preset, save_mimi
from csm.mimi.spectral import CausalLogMel, ISTFTDecoder, LOG_FLOOR, mel_filterbank

CFG = preset("tiny-mel")


@pytest.fixture(scope="module")
def codec() -> Mimi:
    torch.manual_seed(0)
    return Mimi(CFG).eval()


def test_log_mel_matches_torch_stft():
    """Frame t of the causal log-mel is torch.stft's frame of the same window, left-padded by n_fft - hop."""
    mel = CausalLogMel(CFG)
    x = 0.1 * torch.randn(2, 1, 20 * 240, generator=torch.Generator().manual_seed(1))
    ours = mel(x)
    padded = torch.nn.functional.pad(x[:, 0], (CFG.n_fft - 240, 0))
    spec = torch.stft(padded, CFG.n_fft, 240, window=torch.hann_window(CFG.n_fft), center=False, return_complex=True)
    ref = torch.log((mel_filterbank(CFG.n_fft, CFG.n_mels, 24_000) @ spec.abs()).clamp(min=LOG_FLOOR))
    assert ours.shape == (2, CFG.n_mels, 20)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_istft_matches_torch_istft():
    """The decoder's overlap-add is torch.istft's (which divides by the summed squared window, 1.5 at a quarter-
    window hop, where ours divides by the summed window, 2) wherever all four windows overlap."""
    dec = ISTFTDecoder(CFG)
    n, bins = 12, CFG.n_fft // 2 + 1
    g = torch.Generator().manual_seed(2)
    spec = torch.polar(torch.rand(1, n, bins, generator=g), 6.3 * torch.rand(1, n, bins, generator=g))
    frames = torch.fft.irfft(spec, n=CFG.n_fft, dim=-1) * dec.window
    ours = torch.nn.functional.fold(frames.transpose(1, 2), (1, (n - 1) * 240 + CFG.n_fft), (1, CFG.n_fft),
                                    stride=(1, 240))[0, 0, 0]
    # center=True: torch's sample j is our j + n_fft / 2
    ref = torch.istft(spec.transpose(1, 2), CFG.n_fft, 240, window=torch.hann_window(CFG.n_fft), center=True)[0]
    half = CFG.n_fft // 2
    steady = slice(CFG.n_fft, (n - 3) * 240)
    torch.testing.assert_close(ours[steady], 0.75 * ref[steady.start - half: steady.stop - half], atol=1e-5,
                               rtol=1e-4)


@pytest.mark.parametrize("chunks", [[1] * 6, [2, 3, 1]], ids=["frame_by_frame", "mixed"])
def test_streaming_equals_oneshot(codec, chunks):
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, CFG.codebook_size, (2, CFG.num_codebooks, sum(chunks)), generator=g)
    full = codec.decode(codes)
    assert full.shape == (2, 1, sum(chunks) * 1920)
    stream, out, t = codec.decode_stream(batch_size=2), [], 0
    for n in chunks:
        out.append(stream.decode(codes[..., t: t + n]))
        t += n
    torch.testing.assert_close(torch.cat(out, -1), full, atol=1e-5, rtol=0)

    wav = 0.1 * torch.randn(2, 1, 6 * 1920, generator=g)
    enc, parts, t = codec.encode_stream(batch_size=2), [], 0
    for n in chunks:
        parts.append(enc.encode(wav[..., t * 1920: (t + n) * 1920]))
        t += n
    assert torch.equal(torch.cat(parts, -1), codec.encode(wav))


def test_save_and_load_round_trip(codec, tmp_path):
    save_mimi(codec, tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["model_type"] == "csm_mel_codec" and config["csm_frontend"] == "mel"  # not a transformers Mimi
    loaded = load_mimi(tmp_path / "c")
    assert loaded.cfg == CFG
    wav = 0.1 * torch.randn(3 * 1920, generator=torch.Generator().manual_seed(4))
    assert torch.equal(loaded.encode(wav), codec.encode(wav))
    assert torch.equal(loaded.decode(codec.encode(wav)), codec.decode(codec.encode(wav)))


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="ratios"):
        preset("tiny-mel").__class__(frontend="mel", ratios=(8, 6, 5, 4))
    with pytest.raises(ValueError, match="frontend"):
        preset("tiny-mel").__class__(frontend="wavenet")


def test_trains_and_resumes(tmp_path):
    """csm train-codec with a mel preset: the loss falls, and a run resumed from a checkpoint retraces the
    unbroken run step for step."""
    import shutil

    from test_codec_train import synth_clips, tiny_cfg

    from csm.train.codec import train_codec
    from csm.train.codec_data import ClipSet

    clips, evals = ClipSet(synth_clips(6, 0.6)), synth_clips(2, 0.4, seed=1)
    kw = dict(preset="tiny-mel", segment_frames=4, steps=30, save_every=15)
    full = train_codec(tiny_cfg(tmp_path / "a", **kw), clips=clips, eval_clips=evals)
    mel = [r["mel_loss"] for r in full if "mel_loss" in r]
    assert sum(mel[-5:]) / 5 < 0.85 * sum(mel[:5]) / 5
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "step-000015", tmp_path / "b" / "step-000015")
    resumed = train_codec(tiny_cfg(tmp_path / "b", resume="latest", **kw), clips=clips, eval_clips=evals)
    assert [r["step"] for r in resumed if "loss" in r] == list(range(16, 31))
    assert resumed[-1]["loss"] == pytest.approx(full[-1]["loss"], rel=1e-5)
    assert resumed[-1]["val_mel_l1"] == pytest.approx(full[-1]["val_mel_l1"], rel=1e-5)
