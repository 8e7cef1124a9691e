"""Generator behaviour: sampling, stopping, budgets and input errors (on a tiny random model)."""

from __future__ import annotations

import copy

import pytest
import torch

from csm.config import get_config
from csm.frames import Segment, audio_frames, text_frames
from csm.engine import sample_topk
from csm.generate import ContextTooLongError, Generator, Speech
from csm.model import CSM


@pytest.fixture(scope="module")
def gen(tokenizer):
    torch.manual_seed(0)
    return Generator(CSM(get_config("tiny")), tokenizer)


def test_text_frames_follow_the_reference_format(tokenizer):
    tokens, mask = text_frames(tokenizer, "hi", 3, 32)
    ids = tokenizer.encode("[3]hi")
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokens[:, -1].tolist() == ids and mask[:, -1].all() and not mask[:, :-1].any()
    assert not tokens[:, :-1].any()


def test_audio_frames_end_with_zero_eos_frame():
    codes = torch.randint(1, 2048, (32, 5))
    tokens, mask = audio_frames(codes)
    assert tokens.shape == (6, 33) and torch.equal(tokens[:5, :32], codes.T)
    assert not tokens[5].any() and mask[:, :32].all() and not mask[:, 32].any()


def test_sample_topk_greedy_and_support():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample_topk(logits, 1, 0.9).item() == 1
    assert sample_topk(logits, 50, 0.0).item() == 1
    g = torch.Generator().manual_seed(0)

    def noise():
        return torch.empty(1, 4).exponential_(1, generator=g)

    draws = [sample_topk(logits, 2, 1.0, noise()).item() for _ in range(2000)]
    assert set(draws) == {1, 3}  # only the top two ids, both reachable
    # ... in the softmax proportions: p(1) = e^3 / (e^3 + e^2) = 0.731
    assert abs(draws.count(1) / len(draws) - 0.731) < 0.04
    # per-row tensors give the same draw as scalars for the same noise
    n = noise()
    assert sample_topk(logits, torch.tensor([[2]]), torch.tensor([[1.0]]), n).item() == sample_topk(logits, 2, 1.0, n).item()
    # per-row top-k with every row greedy (max_topk 1) takes the argmax whatever the noise; ties go to the first id
    rows = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 1.0, 5.0, 0.0]])
    big = torch.tensor([[1e-9, 1.0, 1.0, 1.0], [1.0, 1.0, 1e-9, 1.0]])  # would pick ids 0 and 2 if it were used
    assert sample_topk(rows, torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1), big, 1).tolist() == [[1], [0]]
    # temperature sharpens: at T=0.05 the best id wins (almost) always
    assert all(sample_topk(logits, 4, 0.05, noise()).item() == 1 for _ in range(50))


def test_seeded_generation_is_reproducible(gen):
    a = gen.generate("hello there", 0, max_audio_length_ms=800, seed=7).codes
    b = gen.generate("hello there", 0, max_audio_length_ms=800, seed=7).codes
    c = gen.generate("hello there", 0, max_audio_length_ms=800, seed=8).codes
    assert a.shape == (32, 10) and torch.equal(a, b) and not torch.equal(a, c)


def test_stops_at_all_zero_frame(tokenizer):
    torch.manual_seed(0)
    model = CSM(get_config("tiny"))
    with torch.no_grad():  # zero heads: every logit ties, argmax picks id 0 -> the EOS frame at once
        model.codebook0_head.weight.zero_()
        model.audio_head.zero_()
    speech = Generator(model, tokenizer).generate("hello", 0, max_audio_length_ms=2000, topk=1)
    assert speech.codes.shape == (32, 0) and speech.audio is None


def test_stops_when_frame_is_zero_midway(tokenizer, monkeypatch):
    from csm.engine import FrameStep

    calls = []
    real = FrameStep.forward

    def fake(self, *a, **k):
        frame = real(self, *a, **k)
        calls.append(1)
        return frame * 0 if len(calls) == 3 else frame  # the 4th frame (3rd fed-back step) is EOS

    monkeypatch.setattr(FrameStep, "forward", fake)
    torch.manual_seed(0)
    gen = Generator(CSM(get_config("tiny")), tokenizer)
    assert gen.generate("hello", 0, max_audio_length_ms=2000, seed=0).codes.shape == (32, 3)


def test_context_too_long_names_the_overflow(gen):
    ctx = [Segment(1, "fine thanks", torch.randint(0, 2048, (32, 400)))]
    n_prompt = 401 + len(gen.tokenizer.encode("[1]fine thanks")) + len(gen.tokenizer.encode("[0]hello"))
    over = n_prompt + 125 - 512
    with pytest.raises(ContextTooLongError, match=rf"needs {n_prompt + 125} positions, {over} over the model's 512"):
        gen.generate("hello", 0, context=ctx, max_audio_length_ms=10_000)
    # the same context fits with a smaller budget
    assert gen.generate("hello", 0, context=ctx, max_audio_length_ms=160, seed=0).codes.shape[1] <= 2


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_text_is_rejected(gen, text):
    with pytest.raises(ValueError, match="empty"):
        gen.generate(text)


def test_bad_speaker_and_context_are_rejected(gen):
    with pytest.raises(ValueError, match="speaker"):
        gen.generate("hi", speaker=-1)
    with pytest.raises(ValueError, match="codebooks"):
        gen.generate("hi", context=[Segment(0, "x", torch.zeros(8, 3, dtype=torch.long))])
    with pytest.raises(ValueError, match="no audio codec"):
        gen.generate("hi", context=[Segment(0, "x", torch.zeros(24000))])


def test_huge_text_is_rejected(gen):
    with pytest.raises(ContextTooLongError):
        gen.generate("hello there " * 400)


def test_request_with_prompt_frames_equals_text(gen):
    """Request(frames=...) reads given frames instead of text + context: the same frames give the same codes."""
    from csm.generate import Request

    ctx = [Segment(1, "fine thanks", torch.randint(0, 2048, (32, 6), generator=torch.Generator().manual_seed(1)))]
    by_text = Request("hello", 0, ctx, max_audio_length_ms=400, temperature=0)
    by_frames = Request("", max_audio_length_ms=400, temperature=0, frames=gen.prompt_frames("hello", 0, ctx))
    a, b = gen.generate_batch([by_text, by_frames])
    assert torch.equal(a.codes, b.codes)
    with pytest.raises(ValueError, match=r"prompt frames .* \[S >= 1, 33\]"):
        gen.generate_batch([Request("", frames=(torch.zeros(3, 32, dtype=torch.long), torch.ones(3, 32)))])


def test_context_changes_the_output(gen):
    ctx = [Segment(1, "fine thanks", torch.randint(0, 2048, (32, 6), generator=torch.Generator().manual_seed(1)))]
    a = gen.generate("hello", 0, max_audio_length_ms=400, topk=1).codes
    b = gen.generate("hello", 0, context=ctx, max_audio_length_ms=400, topk=1).codes
    assert not torch.equal(a, b)


def test_batched_requests_equal_single_runs(gen):
    from csm.generate import Request

    ctx = [Segment(1, "fine thanks", torch.randint(0, 2048, (32, 6), generator=torch.Generator().manual_seed(2)))]
    reqs = [
        Request("hello there", 0, max_audio_length_ms=560, topk=1),
        Request("how are you?", 1, context=ctx, max_audio_length_ms=400, seed=5),  # longer prompt, sampled
        Request("fine", 0, max_audio_length_ms=240, temperature=0.7, topk=20, seed=9),  # shortest budget
    ]
    batched = gen.generate_batch(reqs)
    for req, got in zip(reqs, batched):
        alone = gen.generate_batch([req])[0].codes
        assert torch.equal(got.codes, alone)
    assert [s.codes.shape[1] for s in batched] == [7, 5, 3]


def test_compiled_step_equals_eager(tokenizer):
    """torch.compile(mode="reduce-overhead") of the frame step (CUDA graphs on GPU) gives the eager codes.
    A micro model (4 codebooks, 1 layer) keeps the CPU compile to well under a minute."""
    from dataclasses import replace

    from csm.config import CSMConfig, TransformerConfig

    tiny = TransformerConfig(n_layers=1, dim=32, n_heads=2, n_kv_heads=1, intermediate_size=64, max_seq_len=64)
    cfg = CSMConfig(backbone=tiny, decoder=replace(tiny, max_seq_len=4),
                    text_vocab_size=300, audio_vocab_size=67, audio_num_codebooks=4)
    torch.manual_seed(0)
    model = CSM(cfg)
    eager, compiled = Generator(model, tokenizer), Generator(model, tokenizer, engine="compile")
    codes = {}
    for name, kw in (("greedy", dict(topk=1)), ("sampled", dict(seed=3))):
        codes[name] = eager.generate("hello there", 0, max_audio_length_ms=640, **kw).codes
        b = compiled.generate("hello there", 0, max_audio_length_ms=640, **kw).codes
        assert codes[name].shape == (4, 8) and torch.equal(codes[name], b)
    # Inductor's own matrix-vector products: the same maths summed in another order, so the same greedy codes here
    with pytest.raises(ValueError, match="needs engine='compile'"):
        Generator(copy.deepcopy(model), tokenizer, gemv="inductor")
    sums = Generator(copy.deepcopy(model), tokenizer, engine="compile", gemv="inductor")
    assert sum(type(m).__name__ == "SumLinear" for m in sums.model.modules()) == 2 * 4 + 1
    assert torch.equal(codes["greedy"], sums.generate("hello there", 0, max_audio_length_ms=640, topk=1).codes)


def test_stream_chunks_concatenate_to_the_one_shot_audio(tokenizer):
    from dataclasses import replace

    from csm.generate import Request
    from csm.mimi import Mimi, preset

    torch.manual_seed(0)
    codec = Mimi(replace(preset("tiny"), num_codebooks=32, codebook_size=2048)).eval()
    gen = Generator(CSM(get_config("tiny")), tokenizer, codec)
    req = Request("hello there", 0, max_audio_length_ms=7 * 80, seed=4)
    one_shot = gen.generate_batch([req])[0]
    chunks = list(gen.stream(req, chunk_frames=3))
    hop = codec.frame_size
    assert [len(c) for c in chunks] == [3 * hop, 3 * hop, hop]  # 7 frames: 3 + 3 + 1
    torch.testing.assert_close(torch.cat(chunks), one_shot.audio, atol=1e-5, rtol=0)


def test_engine_choice_is_checked(tokenizer):
    model = CSM(get_config("tiny"))
    assert Generator(model, tokenizer).engine.kind == "eager"  # the CPU default
    with pytest.raises(ValueError, match="unknown engine"):
        Generator(model, tokenizer, engine="turbo")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Generator(model, tokenizer, engine="graph")


def test_fused_projections_keep_the_maths_and_save_unfused(tokenizer, tmp_path):
    """Generator fuses q/k/v and gate/up in place; outputs match the unfused model and checkpoints keep the usual
    keys (split back on save)."""
    from csm.checkpoints import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = CSM(get_config("tiny")).eval()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, 50, (2, 6, model.cfg.audio_num_codebooks + 1))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    with torch.no_grad():
        h0, logits0 = model.backbone_forward(tokens, mask)
        dec0 = model.decoder_logits(h0[:, -1], tokens[:, -1, :-1])
    gen = Generator(model, tokenizer)
    assert model.backbone.layers[0].attn.fused and model.decoder.layers[0].mlp.fused
    assert not hasattr(model.backbone.layers[0].attn, "wq")
    with torch.no_grad():
        h1, logits1 = model.backbone_forward(tokens, mask)
        dec1 = model.decoder_logits(h1[:, -1], tokens[:, -1, :-1])
    torch.testing.assert_close(logits1, logits0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dec1, dec0, rtol=1e-5, atol=1e-5)
    assert gen.generate("hello", 0, max_audio_length_ms=400, topk=1, seed=0).codes.numel() > 0

    save_checkpoint(model, tmp_path / "ckpt")
    loaded, _ = load_checkpoint(tmp_path / "ckpt", dtype=torch.float32)
    assert set(loaded.state_dict()) == set(reference)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_model_directory_generation_defaults(tokenizer, tmp_path):
    """generation.json in a model directory sets speaker / temperature / topk for calls that leave them unset."""
    import json

    from csm.checkpoints import save_checkpoint
    from csm.generate import load_generator

    torch.manual_seed(0)
    save_checkpoint(CSM(get_config("tiny")), tmp_path)
    tokenizer.save(tmp_path / "tokenizer.json")
    plain = load_generator(tmp_path, device="cpu")
    assert plain.defaults == {"speaker": 0, "temperature": 0.9, "topk": 50, "max_words": 30}
    (tmp_path / "generation.json").write_text(json.dumps({"speaker": 2, "topk": 1, "max_words": 3}))
    gen = load_generator(tmp_path, device="cpu")
    assert gen.defaults == {"speaker": 2, "temperature": 0.9, "topk": 1, "max_words": 3}
    spoken = []
    real = Generator.generate_batch
    gen.generate_batch = lambda reqs: spoken.extend(r.text for r in reqs) or real(gen, reqs)
    gen.generate_long("hello there how are you", max_audio_length_ms=160, seed=0)  # cut at the model's max_words
    gen.generate_long("hello there how are you", max_audio_length_ms=160, seed=0, max_words=30)
    assert spoken == ["hello there how", "are you", "hello there how are you"]
    del gen.generate_batch
    line = dict(max_audio_length_ms=480, seed=3)
    assert torch.equal(gen.generate("hello", **line).codes, plain.generate("hello", 2, topk=1, **line).codes)
    assert torch.equal(gen.generate("hello", 1, topk=50, **line).codes, plain.generate("hello", 1, **line).codes)
    (tmp_path / "generation.json").write_text(json.dumps({"top_k": 5}))
    with pytest.raises(ValueError, match="unknown keys"):
        load_generator(tmp_path, device="cpu")
    (tmp_path / "generation.json").write_text(json.dumps({"max_words": 0}))
    with pytest.raises(ValueError, match="max_words"):
        load_generator(tmp_path, device="cpu")


def test_model_directory_speaker_list(tokenizer, tmp_path):
    """A generation.json that lists the model's speakers turns an unknown id into an error naming the known ones."""
    import json

    from csm.checkpoints import save_checkpoint
    from csm.generate import load_generator

    torch.manual_seed(0)
    save_checkpoint(CSM(get_config("tiny")), tmp_path)
    tokenizer.save(tmp_path / "tokenizer.json")
    assert load_generator(tmp_path, device="cpu").speakers is None  # no list: any id goes (CSM-1B's case)
    (tmp_path / "generation.json").write_text(json.dumps({"speaker": 1, "speakers": {"0": "low", "1": "high"}}))
    gen = load_generator(tmp_path, device="cpu")
    assert gen.speakers == {0: "low", 1: "high"} and gen.defaults["speaker"] == 1
    assert gen.generate("hello", 0, max_audio_length_ms=160, seed=0).codes.shape[0] == 32
    with pytest.raises(ValueError, match=r"speaker 2 is not one this model was trained on \(0: low; 1: high\)"):
        gen.generate("hello", 2)
    with pytest.raises(ValueError, match="context speaker 5 is not one"):
        gen.generate("hello", 1, context=[Segment(5, "hi", torch.zeros(32, 2, dtype=torch.long))])
    for bad, match in [({"speakers": ["low"]}, "must map non-negative ids"), ({"speakers": {}}, "must map"),
                       ({"speakers": {"-1": "x"}}, "must map"), ({"speaker": 3, "speakers": {"0": "x"}},
                                                                 "default speaker 3 is not among")]:
        (tmp_path / "generation.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            load_generator(tmp_path, device="cpu")


def test_split_sentences():
    from csm.tokenizer import split_sentences

    text = 'Hello there. Dr. Smith met J. R. Jones! Is it No. 5? "Yes." No. Then\n\nno stop here'
    assert split_sentences(text) == ["Hello there.", "Dr. Smith met J. R. Jones!", "Is it No. 5?", '"Yes."', "No.",
                                     "Then", "no stop here"]
    # a long sentence is cut at clause punctuation first, then between words
    assert split_sentences("a, b c d, e f; g h i j k l m n: o", max_words=3) == \
        ["a,", "b c d,", "e f;", "g h i", "j k l", "m n: o"]
    assert split_sentences("one two three four five.", max_words=10) == ["one two three four five."]
    with pytest.raises(ValueError, match="max_words"):
        split_sentences("hi", max_words=0)
    assert split_sentences("Is it No. 5? It is 621.", max_words=3) == ["Is it No.", "5?", "It is 621."]


def test_generate_long_speaks_sentence_by_sentence(tokenizer):
    """Each sentence is its own line with seed + i; chained, the previous sentence and its codes are its context;
    the audio is the sentences' audio joined by the pause."""
    from dataclasses import replace

    from csm.mimi import Mimi, preset

    torch.manual_seed(0)
    codec = Mimi(replace(preset("tiny"), num_codebooks=32, codebook_size=2048)).eval()
    g = Generator(CSM(get_config("tiny")), tokenizer, codec)
    kw = dict(max_audio_length_ms=240, topk=1)
    first = g.generate("hello there.", 0, seed=3, **kw)
    assert first.codes.shape[1] > 0
    second_alone = g.generate("how are you?", 0, seed=4, **kw)
    second_chained = g.generate("how are you?", 0, context=[Segment(0, "hello there.", first.codes)], seed=4, **kw)
    assert not torch.equal(second_alone.codes, second_chained.codes)  # the context matters, so the test can fail

    one = g.generate_long("hello there.", 0, seed=3, **kw)
    assert torch.equal(one.codes, first.codes) and torch.equal(one.audio, first.audio)
    chained = g.generate_long("hello there. how are you?", 0, seed=3, pause_ms=100, **kw)
    assert torch.equal(chained.codes, torch.cat([first.codes, second_chained.codes], dim=1))
    gap = torch.zeros(int(g.sample_rate * 0.1))
    assert torch.equal(chained.audio, torch.cat([first.audio, gap, second_chained.audio]))
    apart = g.generate_long("hello there. how are you?", 0, seed=3, chain=False, **kw)
    assert torch.equal(apart.codes, torch.cat([first.codes, second_alone.codes], dim=1))
    # streamed: the same audio, chunk by chunk, the pause a chunk of its own
    chunks = list(g.stream_long("hello there. how are you?", 0, seed=3, pause_ms=100, chunk_frames=2, **kw))
    hop = codec.frame_size
    n1, n2 = first.codes.shape[1], second_chained.codes.shape[1]
    sizes = [2 * hop] * (n1 // 2) + [hop] * (n1 % 2) + [len(gap)] + [2 * hop] * (n2 // 2) + [hop] * (n2 % 2)
    assert [len(c) for c in chunks] == sizes
    torch.testing.assert_close(torch.cat(chunks), chained.audio, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="empty"):
        g.generate_long("  ")
    with pytest.raises(ValueError, match="pause_ms"):
        g.generate_long("hi.", pause_ms=-1)


def test_generate_long_leaves_out_a_previous_sentence_that_does_not_fit(gen):
    """The chained sentence is dropped when it would not fit beside the given context (which is kept); a line that
    does not fit even alone is an error."""
    ctx = [Segment(1, "fine thanks", torch.randint(0, 2048, (32, 400), generator=torch.Generator().manual_seed(3)))]
    kw = dict(max_audio_length_ms=80 * 80, topk=1)  # 401 context frames + ~10 text + 80 fit 512; + the previous not
    speech = gen.generate_long("hello there. how are you?", 0, context=ctx, seed=0, **kw)
    first = gen.generate("hello there.", 0, context=ctx, seed=0, **kw).codes
    second = gen.generate("how are you?", 0, context=ctx, seed=1, **kw).codes
    assert first.shape[1] > 10 and torch.equal(speech.codes, torch.cat([first, second], dim=1))
    with pytest.raises(ContextTooLongError):
        gen.generate_long("hello", 0, context=ctx, max_audio_length_ms=10_000)


def test_generate_dialogue_speaks_each_turn_in_the_context_of_the_last(gen):
    """Turn i is generate_long(text, speaker, context + the earlier turns as spoken, seed + 1000 i); the oldest
    turns are left out when they do not fit; the turns are joined like sentences."""
    kw = dict(max_audio_length_ms=240, topk=1)
    ctx = [Segment(1, "fine thanks", torch.randint(0, 2048, (32, 3), generator=torch.Generator().manual_seed(1)))]
    speech = gen.generate_dialogue([(0, "hello there."), (1, "how are you?"), (None, "fine thanks.")], ctx, seed=5,
                                   **kw)
    a = gen.generate_long("hello there.", 0, ctx, seed=5, **kw).codes
    b = gen.generate_long("how are you?", 1, [*ctx, Segment(0, "hello there.", a)], seed=1005, **kw).codes
    c = gen.generate_long("fine thanks.", 0, [*ctx, Segment(0, "hello there.", a), Segment(1, "how are you?", b)],
                          seed=2005, **kw).codes
    assert a.shape[1] > 0 and b.shape[1] > 0 and c.shape[1] > 0
    assert torch.equal(speech.codes, torch.cat([a, b, c], dim=1))
    alone = gen.generate_long("fine thanks.", 0, ctx, seed=2005, **kw).codes
    assert not torch.equal(alone, c)  # the history matters, so the test can fail

    # A budget that leaves room for one earlier turn of 100 frames but not two: turn 3 hears turn 2 only.
    long = dict(max_audio_length_ms=80 * 300, topk=1)
    turns = [(0, "hello there."), (1, "how are you?"), (0, "fine thanks.")]
    seen = []
    real = Generator.generate_long
    gen.generate_long = lambda text, speaker, context, *a, **k: (
        seen.append([s.text for s in context]), Speech(torch.zeros(32, 100, dtype=torch.long), None, 24_000))[1]
    try:
        gen.generate_dialogue(turns, seed=0, **long)
    finally:
        del gen.generate_long
    assert real is Generator.generate_long
    assert seen == [[], ["hello there."], ["how are you?"]]
    with pytest.raises(ValueError, match="no turns"):
        gen.generate_dialogue([])
    with pytest.raises(ValueError, match="empty"):
        gen.generate_dialogue([(0, "hi."), (1, " ")], **kw)

