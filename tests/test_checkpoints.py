"""Checkpoint layouts at the real CSM-1B shapes (on the meta device: no memory, no download) and bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

from csm.checkpoints import CheckpointError, convert_from_ours, load_checkpoint, save_checkpoint
from csm.config import get_config
from csm.hub import ModelFilesNotFound
from csm.model import CSM

FULL = get_config("csm-1b")


def shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.fixture(scope="module")
def ours_full():
    with torch.device("meta"):
        return CSM(FULL)


def test_full_size_parameter_count(ours_full):
    # Llama-3.2-1B backbone + 100M decoder + embeddings/heads of the released model.
    assert 1.5e9 < ours_full.num_parameters() < 1.7e9


def test_full_size_transformers_layout_maps_every_key(ours_full):
    from transformers import CsmConfig, CsmForConditionalGeneration

    with torch.device("meta"):
        hf = CsmForConditionalGeneration(CsmConfig())  # transformers' defaults are the released csm-1b config
    ref = {k: v for k, v in shapes(hf.state_dict()).items() if not k.startswith("codec_model.")}
    mapped = shapes(convert_from_ours(ours_full.state_dict(), FULL, "transformers"))
    assert mapped == ref


def test_full_size_sesame_layout_maps_every_key(ours_full):
    import torchtune.models.llama3_2  # noqa: F401 - torchao allocates tensors at import: not under "meta"
    from oracles import SesameReference

    kw = dict(max_seq_len=2048, intermediate_dim=8192)
    with torch.device("meta"):
        ref = SesameReference(
            dict(num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048, **kw),
            dict(num_layers=4, num_heads=8, num_kv_heads=2, embed_dim=1024, **kw),
            text_vocab=128_256,
            audio_vocab=2051,
            codebooks=32,
        )
    mapped = shapes(convert_from_ours(ours_full.state_dict(), FULL, "sesame"))
    assert mapped == shapes(ref.state_dict())


def test_full_size_transformers_config_round_trip():
    from transformers import CsmConfig, CsmDepthDecoderConfig

    from csm.checkpoints import config_from_json, config_to_json
    from oracles import LLAMA3_ROPE

    # transformers' defaults are csm-1b's shapes; the released config.json adds llama3 RoPE scaling to both.
    hf = CsmConfig(rope_parameters=dict(LLAMA3_ROPE), depth_decoder_config=CsmDepthDecoderConfig(rope_parameters=dict(LLAMA3_ROPE)).to_dict())
    assert config_from_json(hf.to_dict(), "transformers") == FULL
    assert config_from_json(config_to_json(FULL, "transformers"), "transformers") == FULL
    assert config_to_json(FULL, "sesame")["backbone_flavor"] == "llama-1B"


@pytest.fixture
def tiny_dir(tmp_path):
    torch.manual_seed(0)
    return save_checkpoint(CSM(get_config("tiny")), tmp_path / "tiny")


def test_missing_and_unexpected_keys_are_listed(tiny_dir):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tiny_dir / "model.safetensors"))
    sd.pop("decoder.norm.weight")
    sd["backbone.layers.9.attn.wq.weight"] = torch.zeros(1)
    save_file(sd, str(tiny_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys \['decoder.norm.weight'\].*backbone.layers.9"):
        load_checkpoint(tiny_dir)


def test_wrong_shapes_are_listed(tiny_dir):
    meta = json.loads((tiny_dir / "config.json").read_text())
    meta["csm_config"]["backbone"]["intermediate_size"] = 100
    (tiny_dir / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"backbone.layers.0.mlp.w1.weight: checkpoint \(128, 64\) vs model \(100, 64\)"):
        load_checkpoint(tiny_dir)


def test_torch_file_loads_without_pickled_code(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    d = tmp_path / "pt"
    d.mkdir()
    torch.save(load_file(str(tiny_dir / "model.safetensors")), d / "ckpt.pt")
    (d / "config.json").write_text((tiny_dir / "config.json").read_text())
    model, _ = load_checkpoint(d)
    assert model.cfg == get_config("tiny")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, d / "ckpt.pt")
    with pytest.raises(CheckpointError, match="tensors-only"):
        load_checkpoint(d)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ModelFilesNotFound, match="model.safetensors"):
        load_checkpoint(tmp_path)
    with pytest.raises(ModelFilesNotFound, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_hub_id_offline_gives_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE at import time: set the constant itself (no network wait in CI).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelFilesNotFound, match=r"hub repo 'sesame/csm-1b'.*pass the directory"):
        load_checkpoint("sesame/csm-1b")


def test_int8_storage_round_trips_closely(tmp_path):
    """save_state_dict(int8=True) / save_mimi(int8=True): the big matrices as int8 rows with a scale each, about a
    quarter of float32's bytes; every loader unpacks them, and the model computes nearly what it did."""
    import torch

    from csm.checkpoints import load_checkpoint, pack_int8, save_checkpoint, unpack_int8
    from csm.config import get_config
    from csm.mimi import Mimi, load_mimi, preset, save_mimi
    from csm.model import CSM

    w = torch.randn(64, 300)
    back = unpack_int8(pack_int8({"w": w, "small": torch.randn(3, 4)}))
    assert back["w"].dtype == torch.float32 and (back["w"] - w).abs().max() <= w.abs().amax(1).max() / 254 + 1e-6
    torch.manual_seed(0)
    model = CSM(get_config("tiny")).eval()
    save_checkpoint(model, tmp_path / "f32")
    save_checkpoint(model, tmp_path / "i8", int8=True)
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "i8") < 0.3 * size(tmp_path / "f32")
    loaded, _ = load_checkpoint(tmp_path / "i8")
    tokens = torch.randint(0, 300, (1, 5, 33))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    pos = torch.arange(5)[None]
    with torch.no_grad():
        _, a = model.backbone_forward(tokens, mask, pos)
        _, b = loaded.backbone_forward(tokens, mask, pos)
    assert (a - b).abs().max() < 0.05 * a.abs().max() and not torch.equal(a, b)
    codec = Mimi(preset("tiny-mel")).eval()
    save_mimi(codec, tmp_path / "codec", int8=True)
    again = load_mimi(tmp_path / "codec")
    assert torch.equal(again.encoder.mel.fb, codec.encoder.mel.fb)  # buffers keep their precision
    wav = 0.1 * torch.randn(3 * 1920)
    assert (again.decode(codec.encode(wav)) - codec.decode(codec.encode(wav))).abs().max() < 0.05
