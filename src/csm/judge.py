"""A small CTC recogniser that reads Mimi codes and says how well a draw speaks its text.

A tiny CSM's samples differ a lot in how intelligible they are, and its own likelihood does not tell which one is
clear (docs/voice.md). This model does: it is trained with CTC to read the characters of a line from the line's
codes, so -log P(text | codes) ranks several draws of the same line, and `Generator` keeps the best (generation.json
"best_of"). It reads codes, not audio: ranking costs no codec decode, and only the winner is decoded.

    codes [K, F] -> per codebook an embedding, concatenated -> frame blocks (12.5 Hz) -> x`upsample` -> char blocks
    -> logits over blank + the alphabet, `upsample` per frame (CTC needs at least as many steps as characters)

Each block is a pre-norm residual: depthwise conv over time, then a position-wise MLP (as in QuartzNet/ConvNeXt);
no attention, so it reads any length at the cost of a few small matmuls.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .generate import Generator, Request

CONFIG, WEIGHTS = "judge.json", "judge.safetensors"


@dataclass
class JudgeConfig:
    num_codebooks: int = 8
    codebook_size: int = 2048
    code_dim: int = 32  # per codebook; concatenated, then projected to dim
    dim: int = 160  # 1.5 M parameters, 3 MB in float16: the shipped voice stays under 40 MB
    frame_layers: int = 6  # most of the depth at the frame rate, where a block costs a quarter
    char_layers: int = 2
    frame_kernel: int = 5
    char_kernel: int = 9
    upsample: int = 4
    alphabet: str = "abcdefghijklmnopqrstuvwxyz' "  # CTC blank is id 0, character i is id i + 1


def text_targets(text: str, alphabet: str) -> list[int]:
    """The CTC target of a line: lowercased, characters outside the alphabet dropped, spaces collapsed (and numbers
    are expected spelt out already, as the generator speaks them)."""
    keep = set(alphabet)
    chars = "".join(c for c in text.lower().replace("-", " ") if c in keep)
    chars = re.sub(r"\s+", " ", chars).strip()
    return [alphabet.index(c) + 1 for c in chars]


class Block(nn.Module):
    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        h = self.conv(self.norm(x).transpose(1, 2)).transpose(1, 2)
        return x + self.down(F.gelu(self.up(h)))


class Judge(nn.Module):
    def __init__(self, cfg: JudgeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.num_codebooks * cfg.codebook_size, cfg.code_dim)
        self.proj = nn.Linear(cfg.num_codebooks * cfg.code_dim, cfg.dim)
        self.frame_blocks = nn.ModuleList(Block(cfg.dim, cfg.frame_kernel) for _ in range(cfg.frame_layers))
        self.expand = nn.Linear(cfg.dim, cfg.upsample * cfg.dim)
        self.char_blocks = nn.ModuleList(Block(cfg.dim, cfg.char_kernel) for _ in range(cfg.char_layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, len(cfg.alphabet) + 1)
        self.register_buffer("offsets", torch.arange(cfg.num_codebooks) * cfg.codebook_size, persistent=False)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, F] (K >= num_codebooks; extra codebooks are ignored) -> log-probs [B, F * upsample, V]."""
        c = self.cfg
        codes = codes[:, : c.num_codebooks].clamp(0, c.codebook_size - 1)  # CSM's 3 spare ids read as id 0's range
        x = self.embed(codes.transpose(1, 2) + self.offsets)  # [B, F, K, E]
        x = self.proj(x.flatten(2))
        for block in self.frame_blocks:
            x = block(x)
        b, f, d = x.shape
        x = self.expand(x).view(b, f * c.upsample, d)
        for block in self.char_blocks:
            x = block(x)
        return self.head(self.norm(x)).float().log_softmax(-1)

    def nll(self, codes: torch.Tensor, text: str) -> torch.Tensor:
        """-log P(text | codes) per row of codes [B, K, F] (every row read to its full length F), divided by the
        text's length; inf where the codes are too short to hold it."""
        target = torch.tensor(text_targets(text, self.cfg.alphabet), dtype=torch.long)
        if len(target) == 0:
            raise ValueError(f"the judge reads no characters in {text!r}")
        with torch.inference_mode():
            logp = self(codes.to(self.embed.weight.device)).transpose(0, 1).cpu()  # [T, B, V]
        b, t = codes.shape[0], logp.shape[0]
        loss = F.ctc_loss(logp, target.repeat(b, 1), torch.full((b,), t), torch.full((b,), len(target)),
                          reduction="none", zero_infinity=False)
        return loss / len(target)

    def rank(self, draws: list[torch.Tensor], text: str) -> list[float]:
        """Scores (lower is better) of several draws [K, F_i] of one line. Each is read on its own length (an
        empty draw scores inf)."""
        return [float(self.nll(d[None], text)[0]) if d.shape[1] else float("inf") for d in draws]

    def greedy(self, codes: torch.Tensor, frames: list[int] | None = None) -> list[str]:
        """Best-path transcripts of codes [B, K, F], row i read up to frames[i] (default: all); for checking the
        judge, not used in generation."""
        with torch.inference_mode():
            ids = self(codes.to(self.embed.weight.device)).argmax(-1).cpu()
        out = []
        for i, row in enumerate(ids.tolist()):
            if frames is not None:
                row = row[: frames[i] * self.cfg.upsample]
            chars, prev = [], 0
            for token in row:  # best path: repeats merged, blanks (0) dropped
                if token != prev and token != 0:
                    chars.append(self.cfg.alphabet[token - 1])
                prev = token
            out.append("".join(chars).strip())
        return out


def save_judge(judge: Judge, out: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(json.dumps(asdict(judge.cfg), indent=1) + "\n")
    save_file({k: v.detach().to(dtype or v.dtype).contiguous() for k, v in judge.state_dict().items()},
              str(out / WEIGHTS))


def load_judge(source: str | os.PathLike, device: str | torch.device = "cpu") -> Judge:
    """A judge from a folder holding judge.json + judge.safetensors (a voice folder, or a training checkpoint)."""
    from safetensors.torch import load_file

    source = Path(source)
    if not (source / CONFIG).is_file() or not (source / WEIGHTS).is_file():
        raise FileNotFoundError(f"{source}: no {CONFIG} + {WEIGHTS} (a judge made by `csm train-judge`)")
    cfg = JudgeConfig(**json.loads((source / CONFIG).read_text()))
    judge = Judge(cfg)
    state = load_file(str(source / WEIGHTS))
    judge.load_state_dict({k: v.float() for k, v in state.items()})
    return judge.to(device).eval()


def model_judge(source: str | os.PathLike, device: str | torch.device, needed: bool) -> Judge | None:
    """The judge beside a model: loaded when a local model directory holds one, or when `needed` (generation.json's
    "best_of" > 1), which makes its absence an error."""
    from .hub import ModelFilesNotFound, find_files

    local = Path(source).expanduser()
    if local.is_dir() and (local / CONFIG).is_file() and (local / WEIGHTS).is_file():
        return load_judge(local, device)
    if not needed:
        return None
    try:
        folder = find_files(source, [CONFIG]).parent
        find_files(source, [WEIGHTS])
    except ModelFilesNotFound as e:
        raise ValueError(f'{source}: its generation.json asks for "best_of" > 1, which needs a judge ({CONFIG} + '
                         f"{WEIGHTS}, made by `csm train-judge`): {e}") from None
    return load_judge(folder, device)


# --- best of n: what the Generator does with a judge -----------------------------------------------------------
BEST_OF_SEED_STEP = 1_000_003  # draw i of a line seeded s uses s + i * this: clear of the seed + i of sentences


def draws(gen: Generator, request: Request, n: int,
          source: Callable[[Request], Iterator[torch.Tensor]] | None = None) -> list[torch.Tensor]:
    """n draws [K, F] of one request, draw i seeded seed + i * BEST_OF_SEED_STEP (draw 0 is the request's own draw):
    one batch here, or, with a `source` (the server's batcher), n jobs read side by side."""
    from dataclasses import replace

    from .engine import stack_frames

    if request.seed is None:  # distinct random draws, still reproducible from one seed drawn here
        request = replace(request, seed=int(torch.randint(0, 2**31, ())))
    requests = [replace(request, seed=request.seed + i * BEST_OF_SEED_STEP) for i in range(n)]
    if source is None:
        return gen.engine.codes([gen.prepare(r) for r in requests])
    streams = [source(r) for r in requests]
    rows: list[list[torch.Tensor]] = [[] for _ in requests]
    try:
        live = list(range(n))
        while live:
            for i in list(live):
                frame = next(streams[i], None)
                if frame is None:
                    live.remove(i)
                else:
                    rows[i].append(frame.cpu())
    finally:
        for stream in streams:
            stream.close()
    return [stack_frames(r, gen.num_codebooks) for r in rows]


def best_draw(gen: Generator, request: Request, n: int,
              source: Callable[[Request], Iterator[torch.Tensor]] | None = None) -> torch.Tensor:
    """The codes [K, F] of the judge's pick of n `draws` of the request."""
    found = draws(gen, request, n, source)
    scores = gen.judge.rank(found, request.text)
    return found[min(range(n), key=scores.__getitem__)]
