"""Training data: encode a corpus once (`prepare`), then read it back as packed batches of conversations.

On disk a prepared corpus is a directory:
    index.jsonl          one line per encoded utterance (id, shard, text, speaker, conversation, turn, frames, ...)
    shard-00000.safetensors  `{n}.codes` [K, F] int16 Mimi codes and `{n}.text` [L] int32 token ids per utterance
    tokenizer.json       the tokenizer the text ids come from (copied into every training checkpoint)
    meta.json            codec sample rate and number of codebooks
    errors.jsonl         the items the last run could not use, with the reason

The index line is written only after its shard is on disk, so an interrupted run loses at most one unfinished shard
and a re-run encodes exactly the items not yet in the index (bad items are retried).

A training example is a run of consecutive turns of one conversation (all of it if it fits `seq_len` frames), as
the frames of csm.frames: per turn, text frames "[speaker]text" then the audio frames and an all-zero EOS frame.
Examples are packed several to a row; each keeps its own positions (from 0) and sees only itself (block-diagonal
causal attention).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..frames import audio_frames

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
INDEX, META, ERRORS, TOKENIZER = "index.jsonl", "meta.json", "errors.jsonl", "tokenizer.json"


# --- the corpus description --------------------------------------------------------------------------------------


@dataclass
class Item:
    """One utterance to encode. `id` is unique within the corpus and is what a re-run uses to skip done work."""

    id: str
    audio: Path
    text: str
    speaker: int = 0
    conversation: str | None = None  # None: the utterance is a conversation of its own
    turn: int = 0


def read_items(source: str | os.PathLike, speaker: int = 0) -> tuple[list[Item], list[tuple[str, str]]]:
    """Items of a folder (audio files + same-name .txt transcripts) or a .jsonl/.csv manifest.

    Manifest fields: `audio` (path, relative to the manifest's folder), `text`, optional `speaker` (default
    `speaker`), `conversation` and `turn` (default: manifest order). Returns (items, [(id, reason)] of bad entries).
    """
    source = Path(source)
    if source.is_dir():
        return _folder_items(source, speaker)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such folder or manifest")
    suffix = source.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{source}:{n}: not valid JSON ({e})") from None
    elif suffix == ".csv":
        with open(source, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"{source}: expected a folder, a .jsonl or a .csv manifest")
    return _manifest_items(rows, source.parent, speaker, str(source))


def _folder_items(root: Path, speaker: int) -> tuple[list[Item], list[tuple[str, str]]]:
    items, bad = [], []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()):
        rel = path.relative_to(root).as_posix()
        txt = path.with_suffix(".txt")
        text = txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
        if not text:
            bad.append((rel, f"no transcript ({txt.name} is missing or empty)"))
            continue
        items.append(Item(rel, path, text, speaker))
    if not items and not bad:
        raise ValueError(f"{root}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) found")
    return items, bad


def _manifest_items(rows: list[dict], base: Path, speaker: int, name: str) -> tuple[list[Item], list[tuple[str, str]]]:
    items, bad, seen = [], [], set()
    for n, row in enumerate(rows):
        audio, text = str(row.get("audio") or "").strip(), str(row.get("text") or "").strip()
        item_id = audio or f"{name}#{n + 1}"
        problem = (
            "no `audio` field" if not audio
            else "no `text` (empty transcript)" if not text
            else "duplicate entry (the same audio is listed twice)" if audio in seen
            else None
        )
        try:
            spk = speaker if row.get("speaker") in (None, "") else int(row["speaker"])
            turn = n if row.get("turn") in (None, "") else int(row["turn"])
        except ValueError:
            problem = problem or f"speaker/turn must be integers, got {row.get('speaker')!r}/{row.get('turn')!r}"
        if problem:
            bad.append((item_id, problem))
            continue
        seen.add(audio)
        conv = None if row.get("conversation") in (None, "") else str(row["conversation"])
        path = Path(audio) if Path(audio).is_absolute() else base / audio
        items.append(Item(audio, path, text, spk, conv, turn))
    return items, bad


# --- prepare: encode once ---------------------------------------------------------------------------------------


@dataclass
class PrepareReport:
    encoded: int = 0
    already_done: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)


def load_codec(source: str, device: str | torch.device):
    """The Mimi codec from a path / hub id (imported lazily: training on prepared data does not need it)."""
    import csm.mimi as mimi

    if hasattr(mimi, "load_codec"):
        return mimi.load_codec(source, device=device)
    return mimi.load_mimi(source, device=device)


def prepare(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    codec,
    tokenizer,
    *,
    speaker: int = 0,
    max_seconds: float = 120.0,
    shard_size: int = 256,
    load_audio: Callable[[Path, int], torch.Tensor] | None = None,
    progress: bool = True,
) -> PrepareReport:
    """Encode every item of `source` (see read_items) with `codec` and `tokenizer` into `out_dir`.

    Re-running skips the items already in the index. Bad items (missing, unreadable, empty or longer than
    `max_seconds` audio, empty transcripts) are skipped, listed in errors.jsonl and counted in the report.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    if load_audio is None:
        from csm.audio import load_audio as _load

        def load_audio(path: Path, sample_rate: int) -> torch.Tensor:
            return _load(path, sample_rate, max_seconds=max_seconds)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_or_write_tokenizer(out, tokenizer)
    items, bad = read_items(source, speaker)
    done = {json.loads(line)["id"] for line in _lines(out / INDEX)}
    todo = [it for it in items if it.id not in done]
    report = PrepareReport(already_done=len(items) - len(todo), bad=list(bad))
    meta = {"sample_rate": int(codec.sample_rate), "num_codebooks": None}
    if (out / META).is_file():
        meta = json.loads((out / META).read_text())
        if meta["sample_rate"] != codec.sample_rate:
            raise ValueError(f"{out} was prepared at {meta['sample_rate']} Hz; this codec runs at {codec.sample_rate} Hz")

    device = _codec_device(codec)
    shard_no = 1 + max((int(p.stem.split("-")[1]) for p in out.glob("shard-*.safetensors")), default=-1)
    tensors, lines = {}, []

    def flush() -> None:
        nonlocal shard_no, tensors, lines
        if not lines:
            return
        name = f"shard-{shard_no:05d}.safetensors"
        save_file(tensors, str(out / (name + ".tmp")))
        os.replace(out / (name + ".tmp"), out / name)  # the shard is complete before the index refers to it
        with open(out / INDEX, "a", encoding="utf-8") as f:
            f.writelines(json.dumps({**line, "shard": name}) + "\n" for line in lines)
        shard_no, tensors, lines = shard_no + 1, {}, []

    bar = tqdm(todo, desc="encoding", unit="utt", disable=not progress, dynamic_ncols=True)
    for item_id, reason in bad:
        bar.write(f"skipping {item_id}: {reason}")
    try:
        for item in bar:
            try:
                wav = load_audio(item.audio, codec.sample_rate)
                seconds = wav.shape[-1] / codec.sample_rate
                if wav.numel() == 0:
                    raise ValueError("the file holds no audio samples")
                if seconds > max_seconds:
                    raise ValueError(f"{seconds:.1f} s of audio is longer than --max-seconds {max_seconds:g}")
                with torch.inference_mode():
                    codes = codec.encode(wav.reshape(1, 1, -1).to(device, torch.float32))[0].cpu()
                if codes.dim() != 2 or codes.shape[1] == 0:
                    raise ValueError(f"the codec returned no frames (codes of shape {tuple(codes.shape)})")
            except ValueError as e:  # csm.audio.AudioError is a ValueError
                report.bad.append((item.id, str(e)))
                bar.write(f"skipping {item.id}: {e}")
                continue
            if meta["num_codebooks"] is None:
                meta["num_codebooks"] = codes.shape[0]
                (out / META).write_text(json.dumps(meta) + "\n")
            elif codes.shape[0] != meta["num_codebooks"]:
                raise ValueError(f"codec gives {codes.shape[0]} codebooks; {out} holds {meta['num_codebooks']}")
            key = str(len(lines))
            tensors[f"{key}.codes"] = codes.to(torch.int16).contiguous()  # Mimi ids < 2048 fit int16: half the disk
            tensors[f"{key}.text"] = torch.tensor(tokenizer.encode(f"[{item.speaker}]{item.text}"), dtype=torch.int32)
            lines.append({"id": item.id, "key": key, "audio": str(item.audio), "text": item.text,
                          "speaker": item.speaker, "conversation": item.conversation, "turn": item.turn,
                          "frames": int(codes.shape[1]), "seconds": round(seconds, 3)})
            report.encoded += 1
            if len(lines) >= shard_size:
                flush()
    finally:  # also on Ctrl-C or a codec crash: keep what is already encoded
        flush()
    with open(out / ERRORS, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": i, "reason": r}) + "\n" for i, r in report.bad)
    return report


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.is_file() else []


def _codec_device(codec) -> torch.device:
    try:
        return next(codec.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _check_or_write_tokenizer(out: Path, tokenizer) -> None:
    path = out / TOKENIZER
    current = tokenizer.tokenizer.to_str()
    if path.is_file():
        if path.read_text(encoding="utf-8") != current:
            raise ValueError(f"{out} was prepared with a different tokenizer ({path}); use the same one or a new folder")
    else:
        path.write_text(current, encoding="utf-8")


# --- reading a prepared corpus ----------------------------------------------------------------------------------


@dataclass
class Utterance:
    codes: torch.Tensor  # [K, F] int16
    text: torch.Tensor  # [L] int32 ids of "[speaker]text" with bos/eos
    conversation: str
    turn: int

    @property
    def num_frames(self) -> int:
        return len(self.text) + self.codes.shape[1] + 1  # text frames, audio frames, EOS frame


@dataclass
class Corpus:
    utterances: list[Utterance]
    examples: list[list[int]]  # utterance indices of each example (consecutive turns of one conversation)
    lengths: list[int]  # frames per example
    skipped: int  # utterances that do not fit seq_len on their own
    sources: list[int]  # per example, the index of the directory it was read from

    def frames(self, example: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The example's frames, as csm.frames.conversation_frames makes them: tokens [S, K+1], mask [S, K+1]."""
        toks, masks = [], []
        for u in (self.utterances[i] for i in self.examples[example]):
            n, k = len(u.text), u.codes.shape[0]
            text = torch.zeros(n, k + 1, dtype=torch.long)
            text_mask = torch.zeros(n, k + 1, dtype=torch.bool)
            text[:, -1], text_mask[:, -1] = u.text.long(), True  # text_frames, with the ids tokenized at prepare time
            audio, audio_mask = audio_frames(u.codes)  # audio frames + the all-zero EOS frame
            toks += [text, audio]
            masks += [text_mask, audio_mask]
        return torch.cat(toks), torch.cat(masks)


def data_dirs(spec: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The prepared directories named by `spec`: one path, a comma-separated list, or a sequence of paths."""
    parts = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    dirs = [Path(x.strip()) for p in parts for x in str(p).split(",") if x.strip()]
    if not dirs:
        raise ValueError("no prepared data directory given")
    return dirs


def data_speakers(dirs: list[Path]) -> set[int]:
    """The speaker ids of the utterances in these prepared directories."""
    return {int(json.loads(line).get("speaker") or 0) for d in dirs for line in _lines(d / INDEX)}


def shared_tokenizer(dirs: list[Path]) -> Path:
    """The tokenizer file every directory was prepared with; the ids of two tokenizers cannot be mixed."""
    for d in dirs:
        if not (d / TOKENIZER).is_file():
            raise FileNotFoundError(f"{d / TOKENIZER} not found: is {d} a `csm prepare` output?")
    first = (dirs[0] / TOKENIZER).read_text(encoding="utf-8")
    for d in dirs[1:]:
        if (d / TOKENIZER).read_text(encoding="utf-8") != first:
            raise ValueError(f"{d} and {dirs[0]} were prepared with different tokenizers (use `csm prepare "
                             f"--tokenizer {dirs[0] / TOKENIZER}` for both)")
    return dirs[0] / TOKENIZER


def _read_utterances(data_dir: Path, num_codebooks: int | None, tag: str) -> list[Utterance]:
    from safetensors.torch import load_file

    lines = [json.loads(line) for line in _lines(data_dir / INDEX)]
    if not lines:
        raise ValueError(f"{data_dir}: no prepared data ({INDEX} is missing or empty); run `csm prepare` first")
    by_shard = defaultdict(list)
    for line in lines:
        by_shard[line["shard"]].append(line)
    utts = []
    for shard, shard_lines in by_shard.items():
        if not (data_dir / shard).is_file():
            raise ValueError(f"{data_dir}: {INDEX} refers to {shard}, which is missing")
        tensors = load_file(str(data_dir / shard))
        for line in shard_lines:
            codes = tensors[f"{line['key']}.codes"]
            if num_codebooks is not None:
                if codes.shape[0] < num_codebooks:
                    raise ValueError(f"{data_dir} holds {codes.shape[0]} codebooks; the model needs {num_codebooks}")
                codes = codes[:num_codebooks]
            conv = line["conversation"] if line.get("conversation") is not None else "\0" + line["id"]
            utts.append(Utterance(codes, tensors[f"{line['key']}.text"], tag + str(conv), int(line.get("turn") or 0)))
    return utts


def load_corpus(
    data: str | os.PathLike | Iterable[str | os.PathLike], seq_len: int, num_codebooks: int | None = None
) -> Corpus:
    """Read one or several prepared directories (see `data_dirs`) and cut their conversations into examples of at
    most `seq_len` frames. Several directories are one corpus; their conversation ids are kept apart."""
    dirs = data_dirs(data)
    utts, source = [], {}  # source: conversation -> index of its directory
    for k, d in enumerate(dirs):
        read = _read_utterances(d, num_codebooks, f"{k}/" if len(dirs) > 1 else "")
        utts += read
        source.update((u.conversation, k) for u in read)
    convs = defaultdict(list)
    for i, u in enumerate(utts):
        convs[u.conversation].append(i)
    examples, lengths, sources, skipped = [], [], [], 0
    for conv in sorted(convs):  # sorted: the example list, hence the data order, does not depend on file order
        current, length = [], 0
        for i in sorted(convs[conv], key=lambda i: utts[i].turn):
            n = utts[i].num_frames
            if n > seq_len:
                skipped += 1
                continue
            if length + n > seq_len and current:
                examples.append(current)
                lengths.append(length)
                sources.append(source[conv])
                current, length = [], 0
            current.append(i)
            length += n
        if current:
            examples.append(current)
            lengths.append(length)
            sources.append(source[conv])
    if not examples:
        raise ValueError(f"{', '.join(map(str, dirs))}: no utterance fits in {seq_len} frames")
    return Corpus(utts, examples, lengths, skipped, sources)


def split_examples(corpus: Corpus, eval_fraction: float, seed: int, ids: list[int] | None = None
                   ) -> tuple[list[int], list[int]]:
    """(train, eval) example indices among `ids` (default: all). Whole conversations go to one side, so no
    speaker turn leaks across."""
    ids = range(len(corpus.examples)) if ids is None else ids
    convs = sorted({corpus.utterances[corpus.examples[i][0]].conversation for i in ids})
    n_eval = min(len(convs) - 1, math.ceil(eval_fraction * len(convs))) if eval_fraction > 0 else 0
    perm = torch.randperm(len(convs), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {convs[i] for i in perm[:n_eval]}
    train = [i for i in ids if corpus.utterances[corpus.examples[i][0]].conversation not in held]
    evals = [i for i in ids if corpus.utterances[corpus.examples[i][0]].conversation in held]
    return train, evals


def shared_text_fraction(train: Corpus, train_ids: list[int], held: Corpus, held_ids: list[int]) -> float:
    """Share of the held-out utterances whose text (token ids, speaker tag included) also occurs in training. High
    for templated or synthetic corpora: the eval loss then measures recall of memorised lines as much as speech."""
    seen = {tuple(train.utterances[i].text.tolist()) for ex in train_ids for i in train.examples[ex]}
    held_utts = [held.utterances[i] for ex in held_ids for i in held.examples[ex]]
    return sum(tuple(u.text.tolist()) in seen for u in held_utts) / max(1, len(held_utts))


# --- packing and batches ----------------------------------------------------------------------------------------


def pack(order: Iterable[int], lengths: list[int], seq_len: int, pack_rows: bool = True) -> list[list[int]]:
    """Fill rows of up to `seq_len` frames with the examples in `order`, starting a new row whenever the next one
    does not fit (or for every example if not `pack_rows`)."""
    rows, row, used = [], [], 0
    for i in order:
        if row and (not pack_rows or used + lengths[i] > seq_len):
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += lengths[i]
    if row:
        rows.append(row)
    return rows


def epoch_batches(
    examples: list[int], lengths: list[int], seq_len: int, batch_size: int, seed: int, epoch: int, pack_rows: bool = True
) -> list[list[list[int]]]:
    """The batches (lists of rows of example ids) of one epoch: a shuffle seeded by (seed, epoch), then packing.

    Everything is a function of (seed, epoch), so a resumed run sees exactly the batches it would have seen.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = [examples[i] for i in torch.randperm(len(examples), generator=g).tolist()]
    rows = pack(order, lengths, seq_len, pack_rows)
    return [rows[i : i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]


def with_replay(own: list[int], replay: list[int], share: float, seed: int, epoch: int) -> list[int]:
    """One epoch's examples: all of `own` and, drawn afresh each epoch (seeded by seed and epoch, so a resume
    sees the same), as many of `replay` as make up `share` of the whole. Replaying the base model's own data keeps
    a fine-tune on minutes of audio from forgetting how to read new text."""
    if not replay or share <= 0:
        return own
    n = min(len(replay), round(len(own) * share / (1 - share)))
    g = torch.Generator().manual_seed(seed * 100_019 + epoch + 7)
    return own + [replay[i] for i in torch.randperm(len(replay), generator=g)[:n].tolist()]


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, S, K+1] long
    mask: torch.Tensor  # [B, S, K+1] bool
    input_pos: torch.Tensor | None  # [B, S] positions restarting at 0 per example; None: 0..S-1
    attn_mask: torch.Tensor | None  # [B, S, S] bool block-diagonal causal; None: plain causal
    num_frames: int  # real (non-padding) frames

    def to(self, device: torch.device | str) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.tokens), move(self.mask), move(self.input_pos), move(self.attn_mask), self.num_frames)


def collate(corpus: Corpus, rows: list[list[int]]) -> Batch:
    """Rows of example ids -> one padded batch. Padding frames have an all-False mask (no input, no loss)."""
    parts = [[corpus.frames(i) for i in row] for row in rows]
    s = max(sum(len(t) for t, _ in row) for row in parts)
    b, width = len(rows), parts[0][0][0].shape[1]
    tokens = torch.zeros(b, s, width, dtype=torch.long)
    mask = torch.zeros(b, s, width, dtype=torch.bool)
    pos = torch.zeros(b, s, dtype=torch.long)
    doc = torch.full((b, s), -1, dtype=torch.long)  # example id per position; padding is its own "document"
    for r, row in enumerate(parts):
        at = 0
        for d, (t, m) in enumerate(row):
            n = len(t)
            tokens[r, at : at + n], mask[r, at : at + n] = t, m
            pos[r, at : at + n] = torch.arange(n)
            doc[r, at : at + n] = d
            at += n
    num_frames = int((doc >= 0).sum())
    if all(len(row) == 1 for row in rows):
        # One example per row, padding only at the end: plain causal attention gives the same result, and lets
        # SDPA use its fastest (flash) kernel.
        return Batch(tokens, mask, None, None, num_frames)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    attn = (doc[:, :, None] == doc[:, None, :]) & causal
    return Batch(tokens, mask, pos, attn, num_frames)


def audio_targets(mask: torch.Tensor, num_codebooks: int) -> torch.Tensor:
    """[B, S-1] bool: frame t+1 is an audio frame (EOS included), so hidden state t is trained to predict it."""
    return mask[:, 1:, :num_codebooks].any(-1)


def decoder_frames(num_audio: int, amortization: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of the ~1/amortization of the `num_audio` audio frames the decoder is trained on (>= 1)."""
    if num_audio == 0:
        return torch.zeros(0, dtype=torch.long)
    n = max(1, round(num_audio / amortization))
    return torch.randperm(num_audio, generator=generator)[:n].sort().values


def noisy_codes(tokens: torch.Tensor, mask: torch.Tensor, num_codebooks: int, rate: float,
                generator: torch.Generator) -> torch.Tensor:
    """A copy of the batch's tokens [B, S, K+1] for the backbone to read, in which each acoustic code (codebooks
    1..K-1) of each audio frame is, with probability `rate`, swapped for the same codebook's code of a random audio
    frame of the batch. The marginal distribution of codes is kept; only which frame they belong to is lost.

    Why: at generation time the backbone reads acoustic codes the decoder *sampled*, which often differ from the
    ones a deterministic (e.g. synthetic) corpus pairs with the next frame. A backbone trained only on clean codes
    leans on them and drifts into babble; one trained on noisy codes leans on codebook 0 and the text instead.
    End-of-utterance frames (all zero) are left alone; targets are built from the clean tokens."""
    k = num_codebooks
    frames = mask[..., 0] & tokens[..., :k].any(-1)  # [B, S] audio frames, EOS excluded
    src = tokens[frames][:, 1:k]  # [N, K-1]
    if rate <= 0 or len(src) < 2:
        return tokens
    swap = torch.rand(src.shape, generator=generator) < rate
    donor = torch.randint(len(src), src.shape, generator=generator)  # per code: which frame to take it from
    replaced = torch.where(swap, src.gather(0, donor), src)
    out = tokens.clone()
    out[..., 1:k][frames] = replaced.to(tokens.dtype)
    return out
