"""csm.mimi against the references: transformers' MimiModel (numerics, published layout) and, when installed, the
`moshi` package (numerics and key names of Kyutai's original checkpoint). Tiny fp32 models, random weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from csm.mimi import Mimi, MimiConfig, MimiWeightsError, convert_state_dict, load_into, load_mimi, preset
from csm.mimi.weights import KYUTAI_CHECKPOINT

pytest.importorskip("transformers")
MOSHI = "pip install --no-deps moshi==0.2.13 einops sentencepiece"  # moshi pins torch<2.10, hence --no-deps


# --- reference models with the same random weights as ours ----------------------------------------------------
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights at scales that keep activations O(1) (default inits leave codebooks at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():  # persistent only (not RoPE inv_freq)
            if not t.is_floating_point() or t.dim() == 0:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("initialized", "_initialized"):
                continue
            if "cluster_usage" in name:
                new = torch.rand(t.shape, generator=g) * 1.5 + 0.5
            elif "embed" in name:  # codebook sums (divided by cluster usage later)
                new = torch.randn(t.shape, generator=g)
            elif leaf == "scale":  # layer scale: large enough for the transformer to matter
                new = torch.rand(t.shape, generator=g) * 0.5 + 0.2
            elif "norm" in name:  # layer norms
                new = (1.0 if leaf == "weight" else 0.0) + 0.1 * torch.randn(t.shape, generator=g)
            elif t.dim() == 1:  # biases
                new = 0.1 * torch.randn(t.shape, generator=g)
            else:
                new = torch.randn(t.shape, generator=g) / math.sqrt(max(1, t[0].numel()))
            t.copy_(new.to(t.dtype))
    return module


def hf_pair(cfg: MimiConfig, seed: int = 0):
    """(transformers MimiModel, our Mimi) sharing the same random weights."""
    from transformers import MimiConfig as HFConfig
    from transformers import MimiModel

    torch.manual_seed(seed)
    hf = MimiModel(HFConfig(**cfg.to_transformers())).eval()
    randomize_(hf, seed)
    ours = Mimi(cfg).eval()
    load_into(ours, convert_state_dict(hf.state_dict(), cfg))
    return hf, ours


def audio(batch: int, samples: int, seed: int = 0) -> torch.Tensor:
    """Random-ish audio: a few sines plus noise, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 24_000
    f = torch.rand(batch, 3, 1, generator=g) * 800 + 100
    wav = (torch.sin(2 * math.pi * f * t).sum(1, keepdim=True) / 3 + 0.1 * torch.randn(batch, 1, samples, generator=g))
    return wav.clamp(-1, 1)


def moshi_config(cfg: MimiConfig) -> dict:
    """Our config as a `moshi.models.loaders.get_mimi` config dict."""
    return {
        "sample_rate": cfg.sample_rate, "channels": cfg.channels, "frame_rate": cfg.frame_rate,
        "seanet": {
            "channels": cfg.channels, "dimension": cfg.dim, "causal": True, "n_filters": cfg.num_filters,
            "n_residual_layers": cfg.num_residual_layers, "activation": "ELU", "compress": cfg.compress,
            "dilation_base": cfg.dilation_base, "disable_norm_outer_blocks": 0, "kernel_size": cfg.kernel_size,
            "residual_kernel_size": cfg.residual_kernel_size, "last_kernel_size": cfg.last_kernel_size,
            "norm": "none", "pad_mode": "constant", "ratios": list(cfg.ratios), "true_skip": True,
        },
        "quantizer": {"dimension": cfg.codebook_dim, "n_q": cfg.num_codebooks, "bins": cfg.codebook_size,
                      "input_dimension": cfg.dim, "output_dimension": cfg.dim},
        "transformer": {
            "d_model": cfg.dim, "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "causal": True,
            "layer_scale": 0.01, "context": cfg.context, "conv_layout": True, "max_period": cfg.rope_theta,
            "gating": "none", "norm": "layer_norm", "positional_embedding": "rope",
            "dim_feedforward": cfg.intermediate_size, "input_dimension": cfg.dim, "output_dimensions": [cfg.dim],
        },
    }


def moshi_pair(cfg: MimiConfig, seed: int = 0):
    """(moshi MimiModel, our Mimi loaded from its Kyutai-layout state dict), same random weights."""
    from moshi.models.loaders import get_mimi

    assert cfg.upsample_groups == cfg.dim, "moshi's upsampler is depthwise"
    torch.manual_seed(seed)
    ref = get_mimi(None, moshi_config(cfg), num_codebooks=cfg.num_codebooks).eval()
    randomize_(ref, seed)
    ours = Mimi(cfg).eval()
    load_into(ours, convert_state_dict(kyutai_published_names(ref.state_dict()), cfg))
    return ref, ours


def kyutai_published_names(sd: dict) -> dict:
    """moshi >= 0.2.6 keeps `in_projs.0` / `out_projs.0` in memory; the published checkpoint says `in_proj_weight` /
    `out_proj.weight` (moshi renames them in a load hook). Use the published names."""
    out = {}
    for k, v in sd.items():
        k = k.replace(".self_attn.in_projs.0.weight", ".self_attn.in_proj_weight")
        out[k.replace(".self_attn.out_projs.0.weight", ".self_attn.out_proj.weight")] = v
    return out


PRESETS = ["tiny", "small"]  # tiny: shorter hop; small: the real strides and kernels with narrow widths


@pytest.fixture(scope="module", params=PRESETS)
def pair(request):
    cfg = preset(request.param)
    hf, ours = hf_pair(cfg, seed=1)
    return cfg, hf, ours


# --- one-shot parity with transformers -------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [0, 37], ids=["whole_frames", "partial_last_frame"])
def test_encode_decode_match_transformers(pair, extra):
    cfg, hf, ours = pair
    wav = audio(2, 5 * cfg.frame_size + extra, seed=2)  # 5 frames = 10 transformer steps > context
    with torch.no_grad():
        ref_codes = hf.encode(wav).audio_codes
        ref_wav = hf.decode(ref_codes).audio_values
    codes = ours.encode(wav)
    assert codes.shape == (2, cfg.num_codebooks, 5 + (extra > 0))
    assert codes.unique().numel() > cfg.num_codebooks  # not a degenerate codebook
    assert torch.equal(codes, ref_codes)
    out = ours.decode(ref_codes)
    assert out.shape == (2, 1, codes.shape[-1] * cfg.frame_size)
    torch.testing.assert_close(out, ref_wav, atol=1e-4, rtol=0)


def test_fewer_codebooks_match_transformers(pair):
    cfg, hf, ours = pair
    wav = audio(1, 3 * cfg.frame_size, seed=3)
    with torch.no_grad():
        ref = hf.encode(wav, num_quantizers=3).audio_codes
        ref_wav = hf.decode(ref).audio_values
    assert torch.equal(ours.encode(wav, num_codebooks=3), ref)
    torch.testing.assert_close(ours.decode(ref), ref_wav, atol=1e-4, rtol=0)


def test_long_oneshot_attends_block_by_block(pair, monkeypatch):
    import csm.mimi.transformer as tr

    cfg, hf, ours = pair
    codes = torch.randint(0, cfg.codebook_size, (1, cfg.num_codebooks, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf.decode(codes).audio_values
    monkeypatch.setattr(tr, "ATTN_BLOCK", 4)  # 18 steps: 5 blocks, each against its window only
    torch.testing.assert_close(ours.decode(codes), ref, atol=1e-4, rtol=0)


def test_unbatched_shapes(pair):
    cfg, _, ours = pair
    wav = audio(1, 2 * cfg.frame_size, seed=4)
    codes = ours.encode(wav[0, 0])
    assert codes.shape == (cfg.num_codebooks, 2) and codes.dtype == torch.long
    assert torch.equal(codes, ours.encode(wav)[0])
    assert ours.decode(codes).shape == (2 * cfg.frame_size,)
    emb = torch.nn.Embedding(cfg.codebook_size, 3)  # codes can feed a model that is being trained
    emb(codes).sum().backward()


# --- streaming ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunks", [[1] * 9, [2, 1, 3, 3]], ids=["frame_by_frame", "mixed_chunks"])
def test_streaming_decode_equals_oneshot(pair, chunks):
    cfg, _, ours = pair
    codes = torch.randint(0, cfg.codebook_size, (2, cfg.num_codebooks, sum(chunks)), generator=torch.Generator().manual_seed(5))
    full = ours.decode(codes)
    stream = ours.decode_stream(batch_size=2)
    for _ in range(2):  # a reset stream starts over
        out, t = [], 0
        for n in chunks:
            y = stream.decode(codes[..., t : t + n])
            assert y.shape == (2, 1, n * cfg.frame_size)
            out.append(y)
            t += n
        torch.testing.assert_close(torch.cat(out, -1), full, atol=1e-5, rtol=0)
        stream.reset()


def test_streaming_state_is_bounded(pair):
    cfg, _, ours = pair
    stream = ours.decode_stream()
    sizes = lambda: sum(t.numel() for t in _tensors(stream.state))
    before = sizes()
    for _ in range(3 * cfg.context):  # well past the attention window
        stream.decode(torch.zeros(1, cfg.num_codebooks, 1, dtype=torch.long))
    assert sizes() == before
    assert stream.state["transformer"].k.shape[-2] == cfg.context


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif hasattr(x, "__dataclass_fields__"):
        for f in x.__dataclass_fields__:
            yield from _tensors(getattr(x, f))


def test_streaming_encode_equals_oneshot(pair):
    cfg, _, ours = pair
    wav = audio(2, 7 * cfg.frame_size, seed=6)
    full = ours.encode(wav)
    stream = ours.encode_stream(batch_size=2)
    out, t = [], 0
    for n in [1, 2, 1, 3]:
        out.append(stream.encode(wav[..., t * cfg.frame_size : (t + n) * cfg.frame_size]))
        t += n
    assert torch.equal(torch.cat(out, -1), full)
    with pytest.raises(ValueError, match="multiple"):
        stream.encode(wav[..., : cfg.frame_size + 1])


def test_input_errors(pair):
    cfg, _, ours = pair
    with pytest.raises(ValueError, match="empty"):
        ours.encode(torch.zeros(1, 1, 0))
    with pytest.raises(ValueError, match="codes must be in"):
        ours.decode(torch.full((1, cfg.num_codebooks, 2), cfg.codebook_size))
    with pytest.raises(ValueError, match="shape"):
        ours.encode(torch.zeros(1, 2, 100))


# --- Kyutai's original layout, numerically against moshi ----------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_kyutai_layout_matches_moshi(name):
    pytest.importorskip("moshi.models.loaders", reason=MOSHI)
    cfg = preset(name)
    ref, ours = moshi_pair(cfg, seed=7)
    wav = audio(2, 4 * cfg.frame_size, seed=8)
    with torch.no_grad():
        ref_codes = ref.encode(wav)
        ref_wav = ref.decode(ref_codes)
    assert torch.equal(ours.encode(wav), ref_codes)
    torch.testing.assert_close(ours.decode(ref_codes), ref_wav, atol=1e-4, rtol=0)


# --- the real full-size shapes, built on the meta device -------------------------------------------------------
def _meta_mimi(cfg: MimiConfig) -> Mimi:
    with torch.device("meta"):
        return Mimi(cfg)


def test_full_size_transformers_layout_maps_exactly():
    from transformers import MimiConfig as HFConfig
    from transformers import MimiModel

    cfg = preset("kyutai/mimi")
    assert MimiConfig.from_transformers(HFConfig().to_dict()) == cfg  # the transformers defaults are kyutai/mimi
    v4 = {k: v for k, v in HFConfig().to_dict().items() if k != "rope_parameters"}  # transformers 4.x config.json
    assert MimiConfig.from_transformers(v4 | {"rope_theta": 10000.0, "frame_rate": 12.5}) == cfg
    with pytest.raises(ValueError, match="use_conv_shortcut"):
        MimiConfig.from_transformers(v4 | {"use_conv_shortcut": True})
    with torch.device("meta"):
        hf = MimiModel(HFConfig())
    sd = hf.state_dict()
    try:  # the names written by save_pretrained (= the published model.safetensors), not the in-memory ones
        from transformers.core_model_loading import revert_weight_conversion

        sd = revert_weight_conversion(hf, sd)
    except ImportError:
        pass
    assert "encoder.layers.0.conv.weight" in sd and "quantizer.semantic_residual_vector_quantizer.input_proj.weight" in sd
    model = _meta_mimi(cfg)
    load_into(model, convert_state_dict(sd, cfg))  # raises on any missing / unexpected / mis-shaped tensor
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
    # ... also under the CSM prefix, next to unrelated CSM tensors
    csm = {f"codec_model.{k}": v for k, v in sd.items()} | {"backbone.layers.0.attn.q_proj.weight": torch.empty(1)}
    load_into(_meta_mimi(cfg), convert_state_dict(csm, cfg))


def test_full_size_kyutai_layout_maps_exactly():
    loaders = pytest.importorskip("moshi.models.loaders", reason=MOSHI)
    cfg = preset("kyutai/mimi")
    with torch.device("meta"):
        ref = loaders.get_mimi(None, device="meta", num_codebooks=32)
    sd = kyutai_published_names(ref.state_dict())
    assert "encoder.model.0.conv.conv.weight" in sd
    assert "encoder_transformer.transformer.layers.7.self_attn.in_proj_weight" in sd
    assert "quantizer.rvq_rest.vq.layers.30._codebook.embedding_sum" in sd
    load_into(_meta_mimi(cfg), convert_state_dict(sd, cfg))
    # The 8 codebooks moshi uses by default: extra codebooks of a checkpoint are dropped
    load_into(_meta_mimi(cfg.with_codebooks(8)), convert_state_dict(sd, cfg.with_codebooks(8)))


# --- loading from files ------------------------------------------------------------------------------------------
def _reference_outputs(ours: Mimi, cfg: MimiConfig):
    wav = audio(1, 3 * cfg.frame_size, seed=9)
    return wav, ours.encode(wav), ours.decode(ours.encode(wav))


def _same(model: Mimi, ref) -> None:
    wav, codes, out = ref
    assert torch.equal(model.encode(wav), codes)
    torch.testing.assert_close(model.decode(codes), out, atol=1e-6, rtol=0)


def test_load_transformers_and_csm_directories(tmp_path):
    cfg = preset("tiny")
    hf, ours = hf_pair(cfg, seed=10)
    ref = _reference_outputs(ours, cfg)
    hf.save_pretrained(tmp_path / "mimi")  # model.safetensors (published layout) + config.json
    _same(load_mimi(str(tmp_path / "mimi")), ref)
    _same(load_mimi(tmp_path / "mimi" / "model.safetensors", config=cfg), ref)

    # A transformers CSM checkpoint: codec under `codec_model.`, its config under `codec_config`.
    from safetensors.torch import load_file

    flat = load_file(tmp_path / "mimi" / "model.safetensors")
    csm = tmp_path / "csm"
    csm.mkdir()
    tensors = {f"codec_model.{k}": v for k, v in flat.items()} | {"backbone_model.embed.weight": torch.zeros(3, 2)}
    save_file(tensors, csm / "model.safetensors")
    (csm / "config.json").write_text(json.dumps({"model_type": "csm", "codec_config": hf.config.to_dict()}))
    _same(load_mimi(csm), ref)

    # The same, sharded with an index.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, sharded / shard)
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    (sharded / "config.json").write_text((csm / "config.json").read_text())
    _same(load_mimi(sharded), ref)

    # num_codebooks keeps the first n
    assert load_mimi(csm, num_codebooks=2).encode(ref[0]).shape[1] == 2


def test_load_kyutai_checkpoint(tmp_path):
    pytest.importorskip("moshi.models.loaders", reason=MOSHI)
    cfg = preset("tiny")
    ref_model, ours = moshi_pair(cfg, seed=11)
    sd = {k: v.contiguous() for k, v in kyutai_published_names(ref_model.state_dict()).items()}
    save_file(sd, tmp_path / KYUTAI_CHECKPOINT)
    _same(load_mimi(tmp_path, config=cfg), _reference_outputs(ours, cfg))


def test_load_own_state_dict_weights_only(tmp_path):
    cfg = preset("tiny")
    _, ours = hf_pair(cfg, seed=14)
    torch.save(ours.state_dict(), tmp_path / "mimi.pt")
    _same(load_mimi(tmp_path / "mimi.pt", config=cfg), _reference_outputs(ours, cfg))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_mimi(tmp_path / "nowhere")


def test_weight_errors_list_every_problem():
    cfg = preset("tiny")
    hf, _ = hf_pair(cfg, seed=12)
    sd = dict(hf.state_dict())
    del sd["encoder.encoder_seanet.layers.0.conv.bias"]
    sd["decoder.decoder_seanet.layers.0.conv.weight"] = torch.zeros(3, 3, 3)
    sd["encoder.encoder_transformer.layers.0.bogus"] = torch.zeros(1)
    with pytest.raises(MimiWeightsError) as e:
        load_into(Mimi(cfg), convert_state_dict(sd, cfg))
    msg = str(e.value)
    assert "encoder.layers.0.conv.bias" in msg and "decoder.layers.0.conv.weight" in msg and "bogus" in msg
    with pytest.raises(MimiWeightsError, match=r"quantizer\.acoustic\.codebooks\.2 "):  # a 4-codebook model from a 3-codebook checkpoint
        sd = {k: v for k, v in hf.state_dict().items() if "acoustic_residual_vector_quantizer.layers.2." not in k}
        load_into(Mimi(cfg), convert_state_dict(sd, cfg))


def test_weight_norm_checkpoints_are_folded():
    cfg = preset("tiny")
    _, ours = hf_pair(cfg, seed=13)
    sd = dict(ours.state_dict())
    w = sd.pop("encoder.layers.0.conv.weight")
    g = w.norm(dim=(1, 2), keepdim=True)
    sd["encoder.layers.0.conv.weight_g"], sd["encoder.layers.0.conv.weight_v"] = g, 3 * w
    model = load_into(Mimi(cfg), convert_state_dict(sd, cfg))
    torch.testing.assert_close(model.encoder.layers[0].conv.weight, w)
