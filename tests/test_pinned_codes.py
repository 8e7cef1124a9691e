"""Codes pinned for fixed seeds on a tiny random model. They were recorded before the Generator was split into
engine, planning and audio modules (#31); a refactor that moves code must not change a single code. If a change
is meant to alter generation, re-record them and say why in the commit."""

from __future__ import annotations

import hashlib

import pytest
import torch

from csm.config import get_config
from csm.frames import Segment
from csm.generate import Generator, Request
from csm.model import CSM


def digest(codes: torch.Tensor) -> tuple[str, tuple[int, ...]]:
    return hashlib.sha256(codes.contiguous().numpy().astype("int64").tobytes()).hexdigest()[:16], tuple(codes.shape)


@pytest.fixture(scope="module")
def gen(tokenizer):
    torch.manual_seed(0)
    return Generator(CSM(get_config("tiny")), tokenizer)


def test_one_line_sampled_and_greedy(gen):
    assert digest(gen.generate("hello there", seed=3, max_audio_length_ms=800).codes) == ("f9455cbe81e7e007", (32, 10))
    greedy = gen.generate("fine thanks", seed=1, temperature=0, max_audio_length_ms=640).codes
    assert digest(greedy) == ("d28117d6673d951c", (32, 8))


def test_a_batch_with_context_and_own_settings(gen):
    codes = torch.randint(0, 2048, (32, 6), generator=torch.Generator().manual_seed(2))
    context = [Segment(1, "how are you?", codes)]
    batch = gen.generate_batch([Request("hello", 0, context, 560, seed=4), Request("and you?", 1, (), 720, topk=5, seed=9)])
    assert [digest(s.codes) for s in batch] == [("ef31a95094e5e000", (32, 7)), ("5fb2a94f8b9bb9a4", (32, 9))]


def test_long_text_and_dialogue(gen):
    long = gen.generate_long("Hello there. How are you?", seed=5, max_audio_length_ms=400).codes
    assert digest(long) == ("94b700ace08b5bfd", (32, 10))
    turns = [(0, "Hello there."), (1, "Fine thanks, and you?")]
    assert digest(gen.generate_dialogue(turns, seed=6, max_audio_length_ms=400).codes) == ("bac089a14cfe1934", (32, 10))
