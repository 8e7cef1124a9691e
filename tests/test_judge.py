"""The CTC judge (csm/judge.py, csm/train/judge.py) and best-of-N generation (Generator.speak)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from csm.config import get_config
from csm.generate import Generator, Request, load_generator
from csm.judge import BEST_OF_SEED_STEP
from csm.judge import Judge, JudgeConfig, load_judge, save_judge, text_targets
from csm.model import CSM
from csm.train.judge import JudgeTrainConfig, draw_groups, load_examples, rank_loss, train_judge

WORDS = ["bad", "cab", "dab", "ace", "bead", "face", "fade", "deed"]


def test_text_targets_normalise():
    cfg = JudgeConfig()
    ids = text_targets("Well-done, Ann!  It's 5", cfg.alphabet)
    assert "".join(cfg.alphabet[i - 1] for i in ids) == "well done ann it's"
    assert 0 not in ids  # 0 is the CTC blank


def _synthetic_folder(path, n: int, seed: int):
    """A gta_codes.py-style folder whose codes spell the text: codebook 0 holds one id per character (a different
    id per character, one frame each, a silent frame between words), the other codebooks are random."""
    from safetensors.torch import save_file

    rng = random.Random(seed)
    path.mkdir()
    tensors, rows = {}, []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        c0 = [100 + ord(c) if c != " " else 7 for c in text]
        codes = torch.randint(0, 2048, (8, len(c0)), generator=torch.Generator().manual_seed(seed * 1000 + i))
        codes[0] = torch.tensor(c0)
        tensors[f"true.{i}"] = codes.to(torch.int16)
        tensors[f"gta.{i}"] = codes[None].to(torch.int16)
        rows.append({"audio": f"{i}.wav", "text": text.capitalize() + ".", "speaker": 0, "frames": len(c0)})
    save_file(tensors, str(path / "codes.safetensors"))
    (path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge")
    _synthetic_folder(root / "train", 400, seed=1)
    _synthetic_folder(root / "held", 40, seed=2)
    torch.manual_seed(0)
    out = train_judge(JudgeTrainConfig(data=str(root / "train"), eval_data=str(root / "held"), out=str(root / "run"),
                                       steps=250, batch_size=16, lr=3e-3, warmup_steps=20, eval_every=0,
                                       log_every=50, dim=48, progress=False))
    return out, [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def test_judge_learns_to_read_codes(trained):
    """Trained on codes that spell their text, the judge reads held-out lines and ranks the right codes first."""
    out, log = trained
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    assert log[-1]["val_cer"] < 0.1, log[-1]
    judge = load_judge(out)
    examples = load_examples(str(out.parent / "held"))
    (codes, text), other = examples[0], next(c for c, t in examples if t != examples[0][1])
    assert judge.greedy(codes[None])[0] == text.lower().rstrip(".")
    scores = judge.rank([other, codes, codes[:, :1], codes[:, :0]], text)
    assert scores.index(min(scores)) == 1  # its own codes, not another line's, a cut-off one or an empty one
    assert scores[3] == float("inf")


def test_examples_with_the_csms_draws(tmp_path):
    rows = _synthetic_folder(tmp_path / "gta", 5, seed=3)
    plain, with_draws = load_examples(str(tmp_path / "gta")), load_examples(str(tmp_path / "gta"), gta_draws=True)
    assert [t for _, t in plain] == [r["text"] for r in rows]
    assert len(with_draws) == 10 and [t for _, t in with_draws[5:]] == [r["text"] for r in rows]
    with pytest.raises(ValueError, match="neither a prepared corpus"):
        load_examples(str(tmp_path))


def _draws_file(path, folder_rows, codes):
    """A judge_check.py JSON: each line drawn twice; draw 0 heard right, draw 1 heard as another line."""
    rows = []
    for i, row in enumerate(folder_rows):
        other = folder_rows[(i + 1) % len(folder_rows)]["text"]
        rows.append({"text": row["text"], "hyps": [row["text"].upper(), f"{other.upper()}!"], "errors": [0, 3],
                     "codes": [codes[i].tolist(), codes[(i + 1) % len(folder_rows)].tolist()]})
    path.write_text(json.dumps({"summary": {}, "rows": rows}))


def test_finetune_on_draws_labelled_by_whisper(trained, tmp_path):
    """Draws files: a draw Whisper heard right keeps the line's own spelling, any other is labelled with what
    Whisper heard (normalised); --init continues from a trained judge instead of from scratch."""
    out, scratch_log = trained
    rows = _synthetic_folder(tmp_path / "gta", 30, seed=4)
    codes = [c for c, _ in load_examples(str(tmp_path / "gta"))]
    _draws_file(tmp_path / "draws.json", rows, codes)
    examples = load_examples(str(tmp_path / "draws.json"), draws_repeat=2)
    assert len(examples) == 120
    assert examples[0][1] == rows[0]["text"] and examples[1][1] == rows[1]["text"].lower().rstrip(".")
    assert torch.equal(examples[1][0], codes[1])
    tuned = train_judge(JudgeTrainConfig(data=str(tmp_path / "draws.json"), eval_data=str(out.parent / "held"),
                                         out=str(tmp_path / "run"), init=str(out), steps=20, batch_size=8, lr=1e-3,
                                         warmup_steps=2, eval_every=0, log_every=10, progress=False))
    log = [json.loads(x) for x in (tuned / "log.jsonl").read_text().splitlines()]
    assert load_judge(tuned).cfg.dim == 48  # the shape of --init, not the config's default
    assert log[0]["loss"] < 0.3 * next(r["loss"] for r in scratch_log if "loss" in r)
    assert log[-1]["val_cer"] < 0.1
    assert log[-1]["draws_files"] == [str(tmp_path / "draws.json")]  # the model card counts them from here
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"rows": [{"text": "x", "errors": [0], "codes": [[[1]]]}]}))
    with pytest.raises(ValueError, match="older judge_check"):
        load_examples(str(old))


def test_rank_loss_follows_whisper(trained, tmp_path):
    """The ranking loss is small when the judge already orders a line's draws as Whisper heard them (its own codes
    first), large when Whisper's errors say the opposite; lines whose draws Whisper heard alike are left out."""
    out, _ = trained
    judge = load_judge(out)
    rows = _synthetic_folder(tmp_path / "gta", 12, seed=5)
    codes = [c for c, _ in load_examples(str(tmp_path / "gta"))]
    _draws_file(tmp_path / "draws.json", rows, codes)  # draw 0 spells the line (0 errors), draw 1 another (3)
    groups = draw_groups(str(tmp_path / "draws.json"), judge.cfg)
    fits = [codes[(i + 1) % 12].shape[1] * 4 >= len(text_targets(r["text"], judge.cfg.alphabet))
            for i, r in enumerate(rows)]  # else draw 1 cannot hold the line and its group has one draw left
    assert 6 <= len(groups) == sum(fits) and all(e == [0, 3] for _, _, e in groups)
    with torch.no_grad():
        right = float(rank_loss(judge, groups))
        wrong = float(rank_loss(judge, [(d, t, e[::-1]) for d, t, e in groups]))
    assert right < 0.1 < 2.0 < wrong
    data = json.loads((tmp_path / "draws.json").read_text())
    for row in data["rows"]:
        row["errors"] = [1, 1]
    (tmp_path / "same.json").write_text(json.dumps(data))
    assert draw_groups(str(tmp_path / "same.json"), judge.cfg) == []
    with pytest.raises(ValueError, match="needs a draws file"):
        train_judge(JudgeTrainConfig(data=str(tmp_path / "gta"), out=str(tmp_path / "run"), rank_weight=1.0))


def test_judge_round_trips_in_float16(trained, tmp_path):
    out, _ = trained
    judge = load_judge(out)
    save_judge(judge, tmp_path, dtype=torch.float16)
    half = load_judge(tmp_path)
    codes = load_examples(str(out.parent / "held"))[0][0][None]
    assert torch.allclose(judge(codes), half(codes), atol=0.05)
    with pytest.raises(FileNotFoundError, match="csm train-judge"):
        load_judge(tmp_path / "nowhere")


class ScriptedJudge:
    """Scores draws by a fixed list, recording what it was asked."""

    def __init__(self, scores):
        self.scores, self.calls = scores, []

    def rank(self, draws, text):
        self.calls.append((len(draws), text))
        return list(self.scores)


def test_best_of_keeps_the_judges_pick(tokenizer):
    torch.manual_seed(0)
    gen = Generator(CSM(get_config("tiny")), tokenizer)
    req = Request("hello there", speaker=1, max_audio_length_ms=800, topk=20, seed=5)
    alone = [gen.generate_batch([Request("hello there", 1, (), 800, 0.9, 20, 5 + i * BEST_OF_SEED_STEP)])[0].codes
             for i in range(3)]
    assert not torch.equal(alone[0], alone[2])
    assert torch.equal(gen.speak(req).codes, alone[0])  # no judge: one draw, whatever best_of says
    gen.judge = ScriptedJudge([0.5, 0.7, 0.1])
    picked = gen.speak(req, best_of=3)
    assert gen.judge.calls == [(3, "hello there")]
    assert torch.equal(picked.codes, alone[2])  # the judge's lowest score, generated as it would be alone
    assert torch.equal(gen.speak(req, best_of=1).codes, alone[0])  # best_of 1 is the plain draw
    gen.defaults["best_of"] = 3
    assert torch.equal(gen.generate("hello there", 1, max_audio_length_ms=800, topk=20, seed=5).codes, alone[2])
    with pytest.raises(ValueError, match="best_of"):
        gen.speak(req, best_of=0)
    gen.judge = None
    with pytest.raises(ValueError, match="needs a judge"):
        gen.use_best_of(2)


def test_best_of_from_the_model_directory(tokenizer, tmp_path):
    from csm.checkpoints import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(CSM(get_config("tiny")), tmp_path)
    tokenizer.save(tmp_path / "tokenizer.json")
    (tmp_path / "generation.json").write_text(json.dumps({"best_of": 3}))
    with pytest.raises(ValueError, match="needs a judge"):
        load_generator(tmp_path, device="cpu")
    save_judge(Judge(JudgeConfig(dim=16)), tmp_path, dtype=torch.float16)
    gen = load_generator(tmp_path, device="cpu")
    assert gen.defaults["best_of"] == 3 and gen.judge is not None
    assert gen.generate("hello", max_audio_length_ms=400, seed=1).codes.shape[0] == 32
    (tmp_path / "generation.json").write_text(json.dumps({"best_of": 0}))
    with pytest.raises(ValueError, match="best_of"):
        load_generator(tmp_path, device="cpu")


def test_best_of_streams_the_pick_alone_or_through_the_batcher(tokenizer):
    """stream_long with best_of streams the judge's pick: the same audio as generate_long, sentence by sentence,
    whether the draws run in one batch here or as side-by-side jobs of the server's batcher; `spoken` gets the
    kept frames only."""
    from dataclasses import replace

    from csm.mimi import Mimi, preset
    from csm.serve.batcher import Batcher

    torch.manual_seed(0)
    codec = Mimi(replace(preset("tiny"), num_codebooks=32, codebook_size=2048)).eval()
    gen = Generator(CSM(get_config("tiny")), tokenizer, codec)
    gen.judge, gen.defaults["best_of"] = ScriptedJudge([0.3, 0.9, 0.1]), 3
    line = dict(speaker=1, max_audio_length_ms=6 * 80, topk=20, seed=7, max_words=2)
    whole = gen.generate_long("hello there. how are you", **line)
    assert len(gen.judge.calls) == 3 and {n for n, _ in gen.judge.calls} == {3}  # 3 sentences of <= 2 words
    spoken: list[torch.Tensor] = []
    chunks = list(gen.stream_long("hello there. how are you", chunk_frames=2, spoken=spoken, **line))
    torch.testing.assert_close(torch.cat(chunks), whole.audio, atol=1e-5, rtol=0)
    assert torch.equal(torch.stack(spoken, dim=1), whole.codes)
    batcher = Batcher(gen, slots=4).start()
    try:
        served = list(gen.stream_long("hello there. how are you", chunk_frames=2, source=batcher.frames, **line))
    finally:
        batcher.close()
    torch.testing.assert_close(torch.cat(served), whole.audio, atol=1e-5, rtol=0)
