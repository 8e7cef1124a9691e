"""`csm train-judge`: train the CTC judge (csm/judge.py) that picks the clearest of several draws of a line.

Data: prepared corpora (`csm prepare` output: codes + index.jsonl with the text), `scripts/gta_codes.py` folders (a
clip's own codes `true.i` + manifest.jsonl) and/or draws files (`scripts/judge_check.py --json`: the CSM's own draws,
each with what Whisper heard), comma-separated. Every utterance is one example: its codes and the characters of its
text. A draw's text is Whisper's transcript, not the line it was asked to say: the judge is to score draws the way
Whisper would hear them, and a slurred draw should not teach it that slurring reads as the line. Acoustic codes
(codebooks 1..K-1) are swapped for random ids at `code_noise`, since the judge reads sampled draws, whose acoustic
codes are noisier than a clip's own.

A held-out share of the utterances (or --eval-data) gives the validation CTC loss and the character error rate of
the judge's best-path reading (`val_cer`).
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..metrics import edit_distance
from ..judge import Judge, JudgeConfig, load_judge, save_judge, text_targets
from .data import _lines
from .train import lr_at


@dataclass
class JudgeTrainConfig:
    data: str
    out: str
    eval_data: str | None = None
    eval_fraction: float = 0.05
    steps: int = 4000
    batch_size: int = 32
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 200
    weight_decay: float = 0.01
    code_noise: float = 0.2
    gta_draws: bool = False
    draws_repeat: int = 1
    rank_weight: float = 0.0
    rank_lines: int = 8
    init: str | None = None
    max_minutes: float = 0.0
    eval_every: int = 500
    log_every: int = 100
    seed: int = 0
    threads: int = 0
    num_codebooks: int = 8
    dim: int = 160
    progress: bool = True


HELP = {
    "data": "prepared corpora (csm prepare) and/or scripts/gta_codes.py folders, comma-separated",
    "out": "output directory: judge.json + judge.safetensors (float32) and log.jsonl",
    "eval_data": "held-out folders, comma-separated (default: --eval-fraction of --data's utterances)",
    "code_noise": "chance that each acoustic code (codebooks 1..K-1) is swapped for a random id",
    "gta_draws": "also train on the CSM's draws in scripts/gta_codes.py folders, each labelled with its clip's text",
    "draws_repeat": "use each draw of a draws file this many times per pass (they are few and in the judge's domain)",
    "rank_weight": "weight of a pairwise ranking loss on the draws files' lines (0: off): the draw Whisper heard "
                   "better should score better",
    "rank_lines": "lines (each with all its draws) per step of the ranking loss",
    "init": "start from this judge's weights and shape (a folder with judge.json + judge.safetensors)",
    "max_minutes": "stop after this many minutes (0: off); the LR cosine follows the larger of step and time progress",
    "threads": "torch CPU threads (0: torch's default)",
    "num_codebooks": "codebooks the judge reads (the first N)",
    "dim": "the judge's width",
}


def is_draws_file(path: Path) -> bool:
    """Whether a --data entry is a judge_check.py draws file (the other entries are folders)."""
    return path.suffix == ".json" and path.is_file()


def draws_files(spec: str) -> list[str]:
    """The draws files among the comma-separated --data entries, as given."""
    return [p for p in spec.split(",") if p and is_draws_file(Path(p))]


def _draw_rows(path: Path) -> list[dict]:
    rows = json.loads(path.read_text())["rows"]
    if any("hyps" not in row for row in rows):
        raise ValueError(f"{path}: draws without Whisper's transcripts (made by an older judge_check.py)")
    return rows


def draw_examples(path: Path) -> list[tuple[torch.Tensor, str]]:
    """The draws of a judge_check.py JSON, each labelled with what Whisper heard: the line itself where Whisper got
    every word (its spelling keeps the line's contractions, as the judge will be asked), else the transcript."""
    from ..metrics import normalize_text

    out = []
    for row in _draw_rows(path):
        for codes, hyp, errors in zip(row["codes"], row["hyps"], row["errors"]):
            label = row["text"] if errors == 0 else normalize_text(hyp)
            if label and len(codes[0]):
                out.append((torch.tensor(codes, dtype=torch.long), label))
    return out


def load_examples(spec: str, gta_draws: bool = False, draws_repeat: int = 1) -> list[tuple[torch.Tensor, str]]:
    """(codes [K, F] long, text) of every utterance in the comma-separated folders and draws files (with
    `gta_draws`, also every draw of a gta_codes.py folder)."""
    from safetensors.torch import load_file

    out = []
    for folder in (Path(p) for p in spec.split(",") if p):
        if is_draws_file(folder):
            out += draw_examples(folder) * draws_repeat
        elif (folder / "index.jsonl").is_file():
            shards: dict[str, dict] = {}
            for line in map(json.loads, _lines(folder / "index.jsonl")):
                if line["shard"] not in shards:
                    shards[line["shard"]] = load_file(str(folder / line["shard"]))
                out.append((shards[line["shard"]][f"{line['key']}.codes"].long(), line["text"]))
        elif (folder / "codes.safetensors").is_file() and (folder / "manifest.jsonl").is_file():
            codes = load_file(str(folder / "codes.safetensors"))
            rows = [json.loads(x) for x in _lines(folder / "manifest.jsonl")]
            out += [(codes[f"true.{i}"].long(), row["text"]) for i, row in enumerate(rows)]
            if gta_draws:
                out += [(d.long(), row["text"]) for i, row in enumerate(rows) for d in codes[f"gta.{i}"]]
        else:
            raise ValueError(f"{folder}: neither a prepared corpus (index.jsonl), a gta_codes.py folder "
                             "(codes.safetensors + manifest.jsonl) nor a judge_check.py draws file (.json)")
    return out


def draw_groups(spec: str, cfg: JudgeConfig) -> list[tuple[list[torch.Tensor], str, list[int]]]:
    """(draws, line, Whisper's word errors per draw) of every line of the draws files in `spec` that has two draws
    Whisper heard differently; draws too short to hold the line are left out (the judge scores them inf anyway)."""
    groups = []
    for path in map(Path, draws_files(spec)):
        for row in _draw_rows(path):
            n = len(text_targets(row["text"], cfg.alphabet))
            kept = [(torch.tensor(c, dtype=torch.long), e) for c, e in zip(row["codes"], row["errors"])
                    if len(c[0]) * cfg.upsample >= n > 0]
            if len({e for _, e in kept}) > 1:
                groups.append(([c for c, _ in kept], row["text"], [e for _, e in kept]))
    return groups


def rank_loss(judge: Judge, groups: list[tuple[list[torch.Tensor], str, list[int]]], scale: float = 4.0):
    """Pairwise logistic loss on the judge's score (-log P(line | draw) per character): of two draws of a line, the
    one Whisper heard with fewer word errors should score lower, weighted by how many fewer."""
    batch = _batch([(d, text) for codes, text, _ in groups for d in codes], judge.cfg, 0.0, None)
    logp = judge(batch[0]).transpose(0, 1)
    nll = F.ctc_loss(logp, batch[2], batch[1], batch[3], reduction="none", zero_infinity=True) / batch[3]
    total, weight, at = 0.0, 0, 0
    for codes, _, errors in groups:
        for i in range(len(codes)):
            for j in range(len(codes)):
                if errors[i] < errors[j]:
                    total = total + (errors[j] - errors[i]) * F.softplus(scale * (nll[at + i] - nll[at + j]))
                    weight += errors[j] - errors[i]
        at += len(codes)
    return total / max(weight, 1)


def _batch(examples: list[tuple[torch.Tensor, str]], cfg: JudgeConfig, noise: float, gen: torch.Generator):
    """Padded codes [B, K, F], their frame counts, concatenated targets and their lengths."""
    frames = max(c.shape[1] for c, _ in examples)
    codes = torch.zeros(len(examples), cfg.num_codebooks, frames, dtype=torch.long)
    targets, lengths, target_lengths = [], [], []
    for i, (c, text) in enumerate(examples):
        codes[i, :, : c.shape[1]] = c[: cfg.num_codebooks]
        t = text_targets(text, cfg.alphabet)
        targets += t
        lengths.append(c.shape[1] * cfg.upsample)
        target_lengths.append(len(t))
    if noise > 0:
        swap = torch.rand(codes.shape, generator=gen) < noise
        swap[:, 0] = False
        codes = torch.where(swap, torch.randint(0, cfg.codebook_size, codes.shape, generator=gen), codes)
    return codes, torch.tensor(lengths), torch.tensor(targets), torch.tensor(target_lengths)


def ctc(judge: Judge, batch) -> torch.Tensor:
    codes, lengths, targets, target_lengths = batch
    logp = judge(codes).transpose(0, 1)  # [T, B, V]
    return F.ctc_loss(logp, targets, lengths, target_lengths, reduction="mean", zero_infinity=True)


def evaluate(judge: Judge, held: list[tuple[torch.Tensor, str]], batch_size: int = 64) -> dict:
    judge.eval()
    loss, errors, chars = 0.0, 0, 0
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for i in range(0, len(held), batch_size):
            part = held[i: i + batch_size]
            batch = _batch(part, judge.cfg, 0.0, gen)
            loss += float(ctc(judge, batch)) * len(part)
            for (c, text), hyp in zip(part, judge.greedy(batch[0], [c.shape[1] for c, _ in part])):
                ref = "".join(judge.cfg.alphabet[j - 1] for j in text_targets(text, judge.cfg.alphabet))
                errors += edit_distance(ref, hyp)  # characters are a sequence like words
                chars += len(ref)
    judge.train()
    return {"val_loss": loss / len(held), "val_cer": errors / max(chars, 1)}


def train_judge(tc: JudgeTrainConfig) -> Path:
    from tqdm import tqdm

    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    examples = load_examples(tc.data, tc.gta_draws, tc.draws_repeat)
    rng = random.Random(tc.seed)
    if tc.eval_data:
        held = load_examples(tc.eval_data)
    else:
        rng.shuffle(examples)
        n = max(1, int(len(examples) * tc.eval_fraction))
        held, examples = examples[:n], examples[n:]
    if not examples:
        raise ValueError(f"{tc.data}: no training utterances")
    if tc.init:
        judge = load_judge(tc.init).train()
        cfg = judge.cfg
    else:
        cfg = JudgeConfig(num_codebooks=tc.num_codebooks, dim=tc.dim)
        judge = Judge(cfg)
    groups = draw_groups(tc.data, cfg) if tc.rank_weight else []
    if tc.rank_weight and not groups:
        raise ValueError(f"--rank-weight needs a draws file (judge_check.py --json) among --data: {tc.data}")
    short = [t for c, t in examples if c.shape[1] * cfg.upsample < len(text_targets(t, cfg.alphabet))]
    if short:
        print(f"{len(short)} utterance(s) have more characters than the judge's steps; CTC skips them", file=sys.stderr)
    opt = torch.optim.AdamW(judge.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "log.jsonl").open("a")
    gen = torch.Generator().manual_seed(tc.seed)
    start, running = time.monotonic(), []
    bar = tqdm(range(tc.steps), unit="step", disable=not tc.progress)
    for step in bar:
        minutes = (time.monotonic() - start) / 60
        if tc.max_minutes and minutes >= tc.max_minutes:
            break
        lr = lr_at(tc, step, minutes / tc.max_minutes if tc.max_minutes else 0.0)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = ctc(judge, _batch(rng.sample(examples, min(tc.batch_size, len(examples))), cfg, tc.code_noise, gen))
        if groups:
            loss = loss + tc.rank_weight * rank_loss(judge, rng.sample(groups, min(tc.rank_lines, len(groups))))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(judge.parameters(), 1.0)
        opt.step()
        running.append(loss.item())
        if (step + 1) % tc.log_every == 0:
            bar.set_postfix(loss=f"{sum(running) / len(running):.3f}")
            log.write(json.dumps({"step": step + 1, "loss": sum(running) / len(running), "lr": lr,
                                  "minutes": round(minutes, 2)}) + "\n")
            log.flush()
            running = []
        if tc.eval_every and (step + 1) % tc.eval_every == 0:
            log.write(json.dumps({"step": step + 1, **evaluate(judge, held)}) + "\n")
            log.flush()
    final = {"step": step + 1, **evaluate(judge, held), "minutes": round((time.monotonic() - start) / 60, 2),
             "train_utterances": len(examples), "held_out": len(held),
             "draws_files": draws_files(tc.data), "config": asdict(tc)}
    log.write(json.dumps(final) + "\n")
    log.close()
    save_judge(judge, out)
    print(f"{out}: judge after {final['step']} steps, held-out CTC loss {final['val_loss']:.3f}, "
          f"character error rate {final['val_cer']:.1%}", file=sys.stderr)
    return out


def add_subcommand(subparsers) -> None:
    from .cli import add_config_flags

    p = subparsers.add_parser("train-judge", help="train the CTC judge that picks the clearest of N draws (best_of)",
                              description=__doc__.split("\n\n")[0])
    add_config_flags(p, JudgeTrainConfig, HELP)
    p.set_defaults(func=_train_judge)


def _train_judge(args) -> int:
    train_judge(JudgeTrainConfig(**{k: getattr(args, k) for k in JudgeTrainConfig.__dataclass_fields__}))
    return 0
