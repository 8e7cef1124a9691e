"""Int8 weight-only quantization: close to the full-precision model, and the linears really are int8."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from csm.config import get_config
from csm.generate import Generator
from csm.model import CSM
from csm.quantize import Int8Linear, SumLinear, quantize_int8
from csm.tokenizer import train_tokenizer


def test_int8_linear_matches_float_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 512, bias=False)
    q = Int8Linear(lin)
    assert q.weight.dtype == torch.int8
    # per-row symmetric rounding: every weight within half a step of the original
    step = q.scale.float()[:, None]
    assert ((q.dequantized() - lin.weight).abs() <= step * 0.5 + 1e-3 * step).all()
    x = torch.randn(3, 7, 256)
    ref = lin(x)
    rel = (q(x) - ref).norm() / ref.norm()
    assert rel < 0.02 and q(x).shape == ref.shape and q(x).dtype == x.dtype


def test_quantized_model_stays_close_and_generates():
    torch.manual_seed(0)
    model = CSM(get_config("tiny")).eval()
    qmodel = quantize_int8(copy.deepcopy(model))
    n_int8 = sum(isinstance(m, Int8Linear) for m in qmodel.modules())
    assert n_int8 == 7 * (2 + 2) + 1  # 7 linears per block, 2 + 2 blocks, + the projection
    tokens = torch.randint(0, 2048, (1, 12, 33))
    tokens[..., 32] = 0  # audio-only frames: the text column is masked out
    mask = torch.zeros(1, 12, 33, dtype=torch.bool)
    mask[..., :32] = True
    with torch.no_grad():
        ref, got = model.backbone_forward(tokens, mask)[1], qmodel.backbone_forward(tokens, mask)[1]
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0)
    assert cos > 0.99
    tok = train_tokenizer(["hello there"] * 5, vocab_size=280)
    codes = Generator(qmodel, tok).generate("hello", max_audio_length_ms=240, seed=0).codes
    assert codes.shape == (32, 3)


def test_int8_gpu_form_matches_dequantized_matmul():
    """The CUDA path (multiply + sum for one token, dequantized matmul for more) computes the same product; run on
    the CPU here, since only the arithmetic is under test."""
    from csm.quantize import int8_matmul_gpu

    torch.manual_seed(0)
    q = Int8Linear(torch.nn.Linear(64, 96, bias=False))
    w = q.dequantized()
    for x in (torch.randn(1, 1, 64), torch.randn(2, 5, 64)):
        for chunk in (None, 16):  # split-K (profile_step.py --gemv-chunk) sums the same products
            got = int8_matmul_gpu(x, q.weight, q.scale, chunk)
            assert got.shape == (*x.shape[:-1], 96)
            torch.testing.assert_close(got, x @ w.T, rtol=1e-2, atol=1e-2)


def test_sum_linear_chunks_give_the_same_product():
    """SumLinear's split-K form (chunk) sums the same products in another order, eagerly and compiled; a chunk that
    does not divide the input falls back to the plain multiply + sum, and prefill-sized inputs to the matmul."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 24, bias=False)
    x = torch.randn(1, 2, 64)
    expected = lin(x)
    lin.__class__ = SumLinear
    plain = lin(x)
    torch.testing.assert_close(plain, expected)
    lin.chunk = 16
    chunked = lin(x)
    torch.testing.assert_close(chunked, expected)
    assert not torch.equal(chunked, plain)  # really another summation order, so the chunked path ran
    torch.testing.assert_close(torch.compile(lin, fullgraph=True)(x), expected)
    lin.chunk = 48
    assert torch.equal(lin(x), plain)
    many = torch.randn(3, 64)
    assert torch.equal(lin(many), nn.functional.linear(many, lin.weight))
