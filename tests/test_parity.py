"""Parity with the two reference implementations, on the same random weights.

transformers' CsmForConditionalGeneration is saved to disk and loaded through our checkpoint loader; a Sesame
model assembled from torchtune blocks is the oracle for the original checkpoint layout.
"""

from __future__ import annotations

import pytest
import torch

from csm.checkpoints import convert_to_ours, load_checkpoint, save_checkpoint, unfuse_state_dict
from csm.config import CSMConfig, TransformerConfig
from csm.frames import Segment
from csm.generate import Generator
from csm.model import CSM
from csm.tokenizer import train_tokenizer
from oracles import TINY_MIMI, SesameReference, hf_embed_frames, transformers_csm

TOL = 1e-5


@pytest.fixture(scope="module")
def hf_model():
    return transformers_csm(seed=0)


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_csm")
    hf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ours(hf_dir):
    model, codec = load_checkpoint(hf_dir)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["hello there how are you today", "the quick brown fox jumps over the lazy dog", "fine thanks"] * 5
    return train_tokenizer(texts, vocab_size=300)


def conversation(tokenizer, model: CSM, seed: int = 0):
    """A multi-segment conversation with text and audio frames (codes random), plus the line to speak."""
    g = torch.Generator().manual_seed(seed)
    ctx = [
        Segment(0, "hello there", torch.randint(0, 2048, (32, 7), generator=g)),
        Segment(1, "how are you today", torch.randint(0, 2048, (32, 5), generator=g)),
        Segment(0, "fine thanks", torch.randint(0, 2048, (32, 4), generator=g)),
    ]
    return ctx, "the quick brown fox"


def frames_for(tokenizer, model, seed=0):
    gen = Generator(model, tokenizer)
    ctx, text = conversation(tokenizer, model, seed)
    tokens, mask = gen.prompt_frames(text, 1, ctx)
    return tokens[None], mask[None]


def test_loader_reads_transformers_config(ours):
    cfg = ours.cfg
    assert (cfg.backbone.n_layers, cfg.backbone.dim, cfg.backbone.n_heads, cfg.backbone.n_kv_heads) == (2, 64, 4, 2)
    assert (cfg.decoder.n_layers, cfg.decoder.dim, cfg.decoder.n_heads, cfg.decoder.n_kv_heads) == (2, 48, 4, 1)
    assert cfg.backbone.rope_scale_factor == 32.0 and cfg.decoder.rope_base == 500_000.0
    assert cfg.text_vocab_size == 300 and cfg.audio_num_codebooks == 32


@torch.no_grad()
def test_backbone_and_decoder_logits_match_transformers(hf_model, ours, tokenizer):
    tokens, mask = frames_for(tokenizer, ours)
    assert mask[0, :, -1].any() and mask[0, :, :-1].any()  # both text and audio frames present
    ref = hf_model(inputs_embeds=hf_embed_frames(hf_model, tokens, mask)).logits
    h, logits = ours.backbone_forward(tokens, mask)
    torch.testing.assert_close(logits, ref, atol=TOL, rtol=0)
    assert ref.abs().max() > 0.5  # not trivially small

    # Decoder: every audio frame, teacher-forced from the hidden state of the frame before it.
    audio = mask[0, 1:, 0].nonzero()[:, 0] + 1
    codes, h_prev = tokens[0, audio, :-1], h[0, audio - 1]
    ref_dec = hf_model.depth_decoder(
        input_ids=torch.nn.functional.pad(codes[:, :-1], (1, 0)), backbone_last_hidden_state=h_prev
    ).logits
    torch.testing.assert_close(ours.decoder_logits(h_prev, codes), ref_dec, atol=TOL, rtol=0)


@torch.no_grad()
def test_greedy_generation_matches_transformers(hf_model, ours, tokenizer):
    frames = 24
    gen = Generator(ours, tokenizer)
    ctx, text = conversation(tokenizer, ours, seed=1)
    codes = gen.generate(text, 1, ctx, max_audio_length_ms=frames * 80, topk=1).codes
    tokens, mask = gen.prompt_frames(text, 1, ctx)
    ref = hf_model.generate(
        inputs_embeds=hf_embed_frames(hf_model, tokens[None], mask[None]),
        do_sample=False,
        depth_decoder_do_sample=False,
        max_new_tokens=frames,
    )
    assert codes.shape == (32, frames)
    assert torch.equal(codes, ref[0].T)
    assert len(set(codes[0].tolist())) > 3  # the frames actually vary


@torch.no_grad()
def test_writer_round_trip_into_transformers(ours, tmp_path, tokenizer):
    from transformers import CsmForConditionalGeneration, MimiConfig

    save_checkpoint(ours, tmp_path, layout="transformers", extra_config={"codec_config": MimiConfig(**TINY_MIMI).to_dict()})
    hf = CsmForConditionalGeneration.from_pretrained(tmp_path).eval()
    tokens, mask = frames_for(tokenizer, ours, seed=2)
    ref = hf(inputs_embeds=hf_embed_frames(hf, tokens, mask)).logits
    torch.testing.assert_close(ours.backbone_forward(tokens, mask)[1], ref, atol=TOL, rtol=0)
    # and back through our loader in every layout
    for layout in ("csm", "sesame", "transformers"):
        save_checkpoint(ours, tmp_path / layout, layout=layout)
        again, _ = load_checkpoint(tmp_path / layout)
        expected = unfuse_state_dict(ours.state_dict(), ours.cfg)  # a Generator earlier fused `ours` in place
        assert set(again.state_dict()) == set(expected)
        for k, b in again.state_dict().items():
            assert torch.equal(expected[k], b), (layout, k)


# --- the original (Sesame / torchtune) layout -----------------------------------------------------------------

SESAME_BACKBONE = dict(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=256, intermediate_dim=96)
SESAME_DECODER = dict(num_layers=2, num_heads=4, num_kv_heads=1, embed_dim=48, max_seq_len=32, intermediate_dim=80)
SESAME_CFG = CSMConfig(
    backbone=TransformerConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, intermediate_size=96, max_seq_len=256),
    decoder=TransformerConfig(n_layers=2, dim=48, n_heads=4, n_kv_heads=1, intermediate_size=80, max_seq_len=32),
    text_vocab_size=300,
)


@pytest.fixture(scope="module")
def sesame_ref():
    torch.manual_seed(0)
    ref = SesameReference(SESAME_BACKBONE, SESAME_DECODER, 300, 2051, 32).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return ref


@torch.no_grad()
def test_sesame_layout_matches_torchtune_reference(sesame_ref, tokenizer, tmp_path):
    from safetensors.torch import save_file

    # Write the reference's own state dict as an original-layout checkpoint and load it like a user would.
    save_file({k: v.contiguous() for k, v in sesame_ref.state_dict().items()}, str(tmp_path / "model.safetensors"))
    model = CSM(SESAME_CFG)
    save_checkpoint(model, tmp_path / "cfg", layout="sesame")  # only for its config.json
    (tmp_path / "config.json").write_text((tmp_path / "cfg" / "config.json").read_text())
    ours, _ = load_checkpoint(tmp_path)

    tokens, mask = frames_for(tokenizer, ours, seed=3)
    h_ref, ref = sesame_ref.backbone_logits(tokens, mask)
    h, logits = ours.backbone_forward(tokens, mask)
    torch.testing.assert_close(logits, ref, atol=TOL, rtol=0)
    audio = mask[0, 1:, 0].nonzero()[:, 0] + 1
    codes = tokens[0, audio, :-1]
    torch.testing.assert_close(
        ours.decoder_logits(h[0, audio - 1], codes), sesame_ref.decoder_logits(h_ref[0, audio - 1], codes), atol=TOL, rtol=0
    )

    # ours -> sesame layout -> the torchtune reference loads it and agrees
    save_checkpoint(ours, tmp_path / "out", layout="sesame")
    from csm.checkpoints import load_state_dict_file

    ref2 = SesameReference(SESAME_BACKBONE, SESAME_DECODER, 300, 2051, 32).eval()
    ref2.load_state_dict(load_state_dict_file(tmp_path / "out" / "model.safetensors"))
    torch.testing.assert_close(ref2.backbone_logits(tokens, mask)[1], ref, atol=TOL, rtol=0)


def test_sesame_mapping_is_not_identity_on_qk(sesame_ref):
    """The q/k permutation matters: loading without it must change the output (guards the test above)."""
    sd = sesame_ref.state_dict()
    ours = convert_to_ours(sd, SESAME_CFG, "sesame")
    q = "backbone.layers.0.attn.wq.weight"
    assert not torch.equal(ours[q], sd["backbone.layers.0.attn.q_proj.weight"])
