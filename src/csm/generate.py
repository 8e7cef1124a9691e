"""Sampling and the generation engine.

Per 80 ms frame: one cached backbone step predicts codebook 0, then the decoder runs 31 short cached steps inside
the frame (its cache is simply overwritten from position 0 every frame), and the finished frame is fed back to the
backbone. A request stops at an all-zero frame (end of utterance) or at its length budget.

The engine is batched: several requests (different prompts, lengths, sampling settings and seeds) run in one
forward. Prompts are right-padded for the prefill; padding lands in cache slots past each row's prompt, which that
row overwrites before its attention mask ever reaches them. The per-frame step has static shapes (full-length
cache, positions and sampling noise as tensors), so it can be captured as a CUDA graph (`engine="graph"`, the
default on GPU) or compiled (`engine="compile"`), and its sampling needs no host synchronisation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import torch
import torch.nn as nn

from .frames import Segment, conversation_frames, text_frames
from .model import CSM, causal_mask
from .tokenizer import TextTokenizer, spell_numbers, split_sentences, spoken_words

FRAME_MS = 80  # Mimi: 12.5 frames per second
# Sampling defaults (Sesame's), and the longest line generate_long speaks in one piece (ours: ~10 s of speech, the
# default budget); a model directory may override them with a generation.json (see load_generator).
DEFAULTS = {"speaker": 0, "temperature": 0.9, "topk": 50, "max_words": 30, "spell_numbers": False, "best_of": 1}
# generation.json may also list the speaker ids the model was trained on ({"speakers": {"0": "description", ...}}):
# with such a list an unknown id is an error, not an untrained voice. "best_of": N > 1 draws every line N times
# and keeps the one the model directory's judge (judge.py) reads best; it needs a judge.json there.
GENERATION_KEYS = (*DEFAULTS, "speakers")
BEST_OF_SEED_STEP = 1_000_003  # draw i of a line seeded s uses s + i * this: clear of the seed + i of sentences


class Codec(Protocol):
    """What the generator needs from an audio codec (csm.mimi.Mimi provides it)."""

    sample_rate: int

    def encode(self, wav: torch.Tensor) -> torch.Tensor: ...  # [B, 1, T] float -> [B, K, F] long

    def decode(self, codes: torch.Tensor) -> torch.Tensor: ...  # [B, K, F] long -> [B, 1, T] float

    def decode_stream(self, batch_size: int = 1): ...  # object with .decode(codes [B, K, n]) -> [B, 1, n * hop]


def _check_text(text: str) -> None:
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text to speak is empty")


class ContextTooLongError(ValueError):
    """The conversation plus the generation budget does not fit the backbone's context."""


def sample_topk(
    logits: torch.Tensor,
    topk: torch.Tensor | int,
    temperature: torch.Tensor | float,
    noise: torch.Tensor | None = None,
    max_topk: int | None = None,
) -> torch.Tensor:
    """The one sampling function: one id per row of logits [B, V] -> [B, 1].

    Temperature scaling, then only the top-k ids stay (per-row `topk` [B, 1] allowed, then `max_topk` bounds it so
    a partial top-k replaces a full sort), then a draw. The draw is an exponential race: argmax(p / E) with
    E ~ Exp(1) picks id i with probability p_i, and because the noise E [B, V] is an input, a seeded run is
    reproducible and nothing synchronises with the host. topk == 1 is greedy.
    """
    if (topk == 1 if isinstance(topk, int) else max_topk == 1) or (isinstance(temperature, float) and temperature <= 0):
        return logits.argmax(dim=-1, keepdim=True)  # all rows greedy: no top-k select, softmax or noise needed
    logits = logits.float() / (temperature if isinstance(temperature, float) else temperature.float())
    if isinstance(topk, int):
        kth = torch.topk(logits, min(topk, logits.shape[-1]), dim=-1).values[..., -1:]
    else:
        top = min(max_topk or logits.shape[-1], logits.shape[-1])
        kth = torch.topk(logits, top, dim=-1).values.gather(-1, (topk - 1).clamp(max=top - 1))
    probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
    if noise is None:
        noise = torch.empty_like(probs).exponential_(1)
    drawn = (probs / noise).argmax(dim=-1, keepdim=True)
    if isinstance(topk, int):
        return drawn
    # Greedy rows take the plain argmax, so ties resolve as in the reference (first index), not by noise.
    return torch.where(topk == 1, logits.argmax(dim=-1, keepdim=True), drawn)


@dataclass
class Request:
    text: str
    speaker: int = 0
    context: Sequence[Segment] = ()
    max_audio_length_ms: float = 10_000
    temperature: float = 0.9
    topk: int = 50
    seed: int | None = None
    # Prompt frames (tokens [S, K + 1] long, mask [S, K + 1] bool) read instead of text + context: for callers that
    # hold token ids rather than text, such as a prepared training corpus.
    frames: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class Speech:
    codes: torch.Tensor  # [K, F] Mimi codes, EOS frame excluded
    audio: torch.Tensor | None  # [T] float waveform when a codec is attached
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return self.codes.shape[1] * FRAME_MS / 1000


@dataclass
class Prepared:
    """A request ready for the engine (Generator.prepare)."""

    tokens: torch.Tensor  # prompt frames [S, K + 1] long, on the CPU
    mask: torch.Tensor  # [S, K + 1] bool
    budget: int  # most frames to generate
    topk: int  # 1 = greedy
    temperature: float  # > 0
    rng: torch.Generator  # the request's own: its draws do not depend on what it is batched with
    noise_shape: tuple[int, int]  # (codebooks, audio vocab)

    def noise(self) -> torch.Tensor:
        """One frame's sampling noise [K, vocab] (see sample_topk), drawn from the request's generator."""
        return torch.empty(self.noise_shape, device=self.rng.device).exponential_(1, generator=self.rng)


class FrameStep(nn.Module):
    """The per-frame work with static shapes: a backbone step (frame in -> hidden state), codebook 0 from the
    hidden state, then 31 decoder steps (one per codebook). With `compile`, the backbone step and the decoder step
    are each compiled once by Inductor (codebook indices are tensors, so one compiled decoder step serves all 31);
    a CUDA graph around the whole frame then removes the launch gaps between the fused kernels."""

    def __init__(self, model: CSM, backbone_cache: nn.ModuleList, decoder_cache: nn.ModuleList, *,
                 static: bool, compile: bool = False) -> None:
        super().__init__()
        self.model, self.backbone_cache, self.decoder_cache = model, backbone_cache, decoder_cache
        self.static = static  # attention over the full cache length (graphs, compile) instead of the filled prefix
        k, dev = model.cfg.audio_num_codebooks, model.audio_head.device
        self.codebooks: list = [torch.tensor(i, device=dev) for i in range(k)] if compile else list(range(k))
        # Codebook i's head matrix as a view (no copy): an input of the same shape for every codebook, so one compiled
        # decoder step serves all of them without gathering the matrix (a 4 MB copy per step at CSM-1B's size).
        self.heads = [None] + [model.audio_head[i - 1] for i in range(1, k)]
        self.backbone_step, self.decoder_step = self._backbone_step, self._decoder_step
        if compile:
            self.backbone_step = torch.compile(self._backbone_step, fullgraph=True, dynamic=False)
            self.decoder_step = torch.compile(self._decoder_step, fullgraph=True, dynamic=False)

    def _backbone_step(self, frame, input_pos, kv_len: int):
        """The previous frames [B, K] at input_pos [B, 1] -> the backbone's hidden state [B, dim]."""
        m, k = self.model, self.model.cfg.audio_num_codebooks
        tokens = torch.cat([frame, torch.zeros_like(frame[:, :1])], dim=1)[:, None]
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[..., k] = False  # audio-only frame
        return m.backbone(m.embed_frames(tokens, mask), input_pos, causal_mask(input_pos, kv_len),
                          self.backbone_cache)[:, -1]

    def _decoder_step(self, x, pos, codebook, head, noise, temperature, topk, max_topk: int, kv_len: int):
        """Decoder inputs x [B, S, backbone dim] at positions pos [B, S] -> (code of `codebook` [B, 1], its
        embedding [B, 1, backbone dim]: the next step's input). `head` is that codebook's audio_head matrix."""
        m = self.model
        out = m.decoder(m.projection(x), pos, causal_mask(pos, kv_len), self.decoder_cache)
        code = sample_topk(out[:, -1] @ head, topk, temperature, noise, max_topk)
        return code, m.embed_audio(codebook, code)

    def frame_from_hidden(self, h, noise, temperature, topk, max_topk: int):
        """h [B, dim] (the backbone's last hidden state) -> codes [B, K]: codebook 0 from the backbone head,
        then the decoder fills codebooks 1..K-1 one by one (its cache is rewritten from position 0)."""
        m = self.model
        code = sample_topk(m.codebook0_head(h), topk, temperature, noise[:, 0], max_topk)
        codes = [code]
        x = torch.cat([h[:, None], m.embed_audio(0, code)], dim=1)  # decoder positions 0 (h) and 1 (c0)
        pos = torch.arange(2, device=h.device).expand(h.shape[0], 2)
        for i in range(1, m.cfg.audio_num_codebooks):
            kv_len = m.cfg.decoder.max_seq_len if self.static else i + 1
            code, x = self.decoder_step(x, pos, self.codebooks[i], self.heads[i], noise[:, i], temperature, topk,
                                        max_topk, kv_len)
            codes.append(code)
            pos = pos[:, -1:] + 1
        return torch.cat(codes, dim=1)

    def forward(self, frame, input_pos, kv_len: int, noise, temperature, topk, max_topk: int):
        """Feed the previous frames [B, K] at input_pos [B, 1]; return the next frames [B, K]."""
        h = self.backbone_step(frame, input_pos, kv_len)
        return self.frame_from_hidden(h, noise, temperature, topk, max_topk)


class _CUDAGraph:
    """`fn` captured as a CUDA graph, then replayed: a frame step is thousands of small kernels (1 backbone step and
    31 decoder steps, each tens of kernels per layer, plus sampling), so launching them one by one from Python costs
    more than running them.

    Tensor arguments are copied into the captured inputs, so they must keep their shapes; non-tensor arguments
    (top-k bound, cache length) are baked into a graph, so each distinct set gets its own capture. The step only
    overwrites cache slots it owns, so the eager warm-up before a capture is harmless: the replay rewrites them."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list, torch.Tensor]] = {}

    def __call__(self, *args):
        key = tuple(a for a in args if not isinstance(a, torch.Tensor))
        if key not in self.graphs:
            held = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # lazy initialisation (cuBLAS workspaces, ...) must not be captured
                self.fn(*held)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a server's other threads (codec decoding) may use the GPU while a step is captured
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = self.fn(*held)
            self.graphs[key] = graph, held, out
        graph, held, out = self.graphs[key]
        for dst, src in zip(held, args):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        graph.replay()
        return out.clone()  # the next replay overwrites `out`


def sampling_rows(prepared: Sequence[Prepared], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The requests' top-k [B, 1] and temperature [B, 1], as the frame step takes them."""
    return (torch.tensor([[p.topk] for p in prepared], device=device),
            torch.tensor([[p.temperature] for p in prepared], device=device))


def frame_step_fns(model: CSM, engine: str, backbone_cache: nn.ModuleList,
                   decoder_cache: nn.ModuleList) -> tuple[FrameStep, Callable, Callable]:
    """The frame step over these caches, and its two entry points (first frame from the prefill's hidden state;
    next frame from the previous one) as `engine` runs them: eagerly, compiled, or captured as CUDA graphs."""
    cuda = model.audio_head.device.type == "cuda"
    # Eager CPU attends only to the filled cache prefix; the others attend over the full, static length.
    step = FrameStep(model, backbone_cache, decoder_cache, static=engine != "eager" or cuda,
                     compile=engine == "compile")
    first, nxt = step.frame_from_hidden, step.forward
    if engine == "graph" or (engine == "compile" and cuda):
        first, nxt = _CUDAGraph(first), _CUDAGraph(nxt)
    return step, first, nxt


ENGINES = ("eager", "graph", "compile")
GEMVS = ("matmul", "inductor")


class Generator:
    """Speaks lines in context with a CSM model (+ tokenizer, + optional audio codec).

    engine: how the per-frame step runs. "eager": op by op (the CPU default: there launches are cheap and static
    shapes would only add work); "graph": captured once per batch size as a CUDA graph and replayed (the GPU
    default); "compile": the backbone step and the decoder step fused by torch.compile (Inductor), and on CUDA
    the whole frame of compiled kernels captured as one CUDA graph.

    The model is switched to its inference layout in place: eval mode, q/k/v and gate/up projections fused
    (`CSM.fuse_projections`: two matrix-vector products per layer instead of five; the maths is unchanged).
    `fuse=False` keeps the five separate projections (for measuring what fusion buys: `csm bench --no-fuse`).

    gemv: how a decoding step's matrix-vector products run. "matmul": the library's (cuBLAS on CUDA), bit for bit
    the eager engine's; "inductor" (compile engine only): written as multiply + sum so Inductor generates them fused
    with the norm and activation around them (quantize.inductor_gemv; ~10 % faster per frame on an H100, the same
    maths summed in another order).
    """

    def __init__(self, model: CSM, tokenizer: TextTokenizer, codec: Codec | None = None, *, engine: str | None = None,
                 fuse: bool = True, gemv: str = "matmul"):
        self.model = model.eval().fuse_projections() if fuse else model.eval()
        self.tokenizer = tokenizer
        self.codec = codec
        self.defaults = dict(DEFAULTS)  # used for whatever a call leaves as None
        self.speakers: dict[int, str] | None = None  # id -> description, when the model says which it knows
        self.vocabulary: frozenset[str] | None = None  # the words it learnt, when its directory lists them
        self.judge = None  # a csm.judge.Judge, when the model directory has one: picks the best of "best_of" draws
        self.num_codebooks = model.cfg.audio_num_codebooks
        self.sample_rate = codec.sample_rate if codec is not None else 24_000
        self.engine = engine or ("graph" if self.device.type == "cuda" else "eager")
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.engine == "graph" and self.device.type != "cuda":
            raise ValueError("engine='graph' needs a CUDA device (use 'eager' or 'compile' on CPU)")
        if gemv not in GEMVS:
            raise ValueError(f"unknown gemv {gemv!r}; choose one of {', '.join(GEMVS)}")
        if gemv == "inductor":
            if self.engine != "compile":  # run eagerly, multiply + sum would materialise a weight-sized product
                raise ValueError(f"gemv='inductor' needs engine='compile' (got engine={self.engine!r})")
            from .quantize import inductor_gemv

            inductor_gemv(self.model)
        self.gemv = gemv
        self._step: tuple[int, FrameStep, Callable, Callable] | None = None  # (batch size, ...), see _step_fns

    @property
    def device(self) -> torch.device:
        return self.model.text_embeddings.weight.device

    # --- inputs -----------------------------------------------------------------------------------------
    def encode_audio(self, wav: torch.Tensor) -> torch.Tensor:
        """A mono waveform [T] at the codec's sample rate -> Mimi codes [K, F]."""
        if self.codec is None:
            raise ValueError("this generator has no audio codec: give context audio as Mimi codes [K, F]")
        with torch.inference_mode():
            codes = self.codec.encode(wav.to(self.device, torch.float32).reshape(1, 1, -1))[0]
        if codes.shape[0] < self.num_codebooks:
            raise ValueError(f"the codec gives {codes.shape[0]} codebooks, the model needs {self.num_codebooks}")
        return codes[: self.num_codebooks].cpu()

    def prompt_frames(self, text: str, speaker: int, context: Sequence[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
        """The frames the backbone reads before speaking: every context segment, then the line's text."""
        _check_text(text)
        if self.tokenizer.phonemes and not any(c.isalpha() for c in self.tokenizer.phonemize(text)):
            raise ValueError(f"nothing to say in {text!r}: espeak-ng reads no sounds in it")
        self.check_speaker(speaker, "speaker")
        for seg in context:
            self.check_speaker(seg.speaker, "context speaker")
        segments = [self._encoded(seg) for seg in context]
        ctx_tokens, ctx_mask = conversation_frames(self.tokenizer, segments, self.num_codebooks)
        tokens, mask = text_frames(self.tokenizer, text, speaker, self.num_codebooks)
        return torch.cat([ctx_tokens, tokens]), torch.cat([ctx_mask, mask])

    def _encoded(self, segment: Segment) -> Segment:
        """The segment with a waveform replaced by its codes (codes and audio-less segments as they are)."""
        audio = segment.audio
        if audio is None or not audio.is_floating_point():
            return segment
        return Segment(segment.speaker, segment.text, self.encode_audio(audio))

    def check_speaker(self, speaker: int, what: str) -> None:
        if not isinstance(speaker, int) or isinstance(speaker, bool) or speaker < 0:
            raise ValueError(f"{what} must be a non-negative integer, got {speaker!r}")
        if self.speakers is not None and speaker not in self.speakers:
            known = "; ".join(f"{i}: {d}" if d else str(i) for i, d in sorted(self.speakers.items()))
            raise ValueError(f"{what} {speaker} is not one this model was trained on ({known})")

    def _check_frames(self, frames: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, mask = frames
        width = self.num_codebooks + 1
        if tokens.ndim != 2 or tokens.shape[1] != width or tokens.shape != mask.shape or len(tokens) == 0:
            raise ValueError(f"prompt frames must be tokens and mask of the same shape [S >= 1, {width}], "
                             f"got {tuple(tokens.shape)} and {tuple(mask.shape)}")
        return tokens.long().cpu(), mask.bool().cpu()

    def _check_budget(self, prompt_len: int, req: Request) -> int:
        max_frames = int(req.max_audio_length_ms // FRAME_MS)
        if max_frames < 1:
            raise ValueError(f"max_audio_length_ms={req.max_audio_length_ms} is shorter than one {FRAME_MS} ms frame")
        limit = self.model.cfg.backbone.max_seq_len
        need = prompt_len + max_frames
        if need > limit:
            raise ContextTooLongError(
                f"prompt ({prompt_len} frames of context and text) + generation budget ({max_frames} frames = "
                f"{req.max_audio_length_ms:g} ms) needs {need} positions, {need - limit} over the model's {limit}; "
                "shorten the context or max_audio_length_ms"
            )
        return max_frames

    def prepare(self, request: Request) -> Prepared:
        """A request checked and made ready to run: its prompt frames, frame budget, sampling settings and random
        generator. Raises ValueError (ContextTooLongError for a prompt + budget over the context) on bad input."""
        tokens, mask = (self.prompt_frames(request.text, request.speaker, request.context) if request.frames is None
                        else self._check_frames(request.frames))
        budget = self._check_budget(len(tokens), request)
        rng = torch.Generator(device=self.device)
        rng.manual_seed(request.seed) if request.seed is not None else rng.seed()
        # Greedy requests (temperature <= 0) become top-1; temperature then only needs to be positive.
        greedy = request.temperature <= 0
        return Prepared(tokens, mask, budget, 1 if greedy else max(1, request.topk),
                        1.0 if greedy else float(request.temperature), rng,
                        (self.num_codebooks, self.model.cfg.audio_vocab_size))

    # --- the engine -------------------------------------------------------------------------------------
    def prefill(self, prepared: Sequence[Prepared], cache: nn.ModuleList) -> torch.Tensor:
        """The prompts, right-padded into one batch, through the backbone into the first len(prepared) rows of
        `cache`: each row's hidden state at its last prompt frame [B, dim]. Padding lands in cache slots past a
        row's prompt, which the row overwrites before its attention mask reaches them."""
        b, dev, width = len(prepared), self.device, self.num_codebooks + 1
        lengths = [len(p.tokens) for p in prepared]
        s = max(lengths)
        tokens = torch.zeros(b, s, width, dtype=torch.long)
        mask = torch.zeros(b, s, width, dtype=torch.bool)
        for i, p in enumerate(prepared):
            tokens[i, : lengths[i]], mask[i, : lengths[i]] = p.tokens, p.mask
        input_pos = torch.arange(s, device=dev).expand(b, s)
        h, _ = self.model.backbone_forward(tokens.to(dev), mask.to(dev), input_pos, causal_mask(input_pos, s), cache)
        return h[torch.arange(b, device=dev), torch.tensor(lengths, device=dev) - 1]

    def _step_fns(self, batch_size: int) -> tuple[FrameStep, Callable, Callable]:
        """Caches + the frame functions (graphed or compiled when asked) for this batch size. Only the latest batch
        size's are kept, so caches of an old size do not pile up; a repeated size reuses them (and their capture)."""
        if self._step is None or self._step[0] != batch_size:
            m = self.model
            self._step = (batch_size, *frame_step_fns(m, self.engine, m.backbone.new_cache(batch_size),
                                                      m.decoder.new_cache(batch_size)))
        return self._step[1:]

    @torch.inference_mode()
    def iter_frames(self, requests: Sequence[Request]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Run requests together; yield (frames [B, K], active [B] bool) per step until every row has stopped.

        A row is inactive once it produced its all-zero EOS frame or used its budget; its frames are then junk.
        """
        if not requests:
            raise ValueError("no requests")
        prepared = [self.prepare(r) for r in requests]
        budgets, lengths = [p.budget for p in prepared], [len(p.tokens) for p in prepared]
        b, dev, s = len(requests), self.device, max(lengths)
        topk, temperature = sampling_rows(prepared, dev)
        max_topk = int(topk.max())

        def noise() -> torch.Tensor:  # one row per request from its own generator: seeds stay per request
            return torch.stack([p.noise() for p in prepared])

        step, first_frame, next_frame = self._step_fns(b)
        frame = first_frame(self.prefill(prepared, step.backbone_cache), noise(), temperature, topk, max_topk)

        pos = torch.tensor(lengths, device=dev)[:, None]  # where each row's newest frame goes
        active = torch.ones(b, dtype=torch.bool, device=dev)
        remaining = torch.tensor(budgets, device=dev)
        # Eager CPU attends only to the filled cache prefix. Graphs and compiled steps need the full static length,
        # and eager CUDA uses it too, so that its kernels (and greedy codes) are exactly the graph's.
        full = self.model.cfg.backbone.max_seq_len
        for t in range(max(budgets)):
            active &= frame.any(dim=1) & (remaining > 0)
            if not bool(active.any()):  # the caller reads every frame anyway, so this sync costs nothing extra
                return
            yield frame, active.clone()
            remaining -= 1
            if t + 1 == max(budgets):
                return
            kv_len = full if step.static else s + t + 1
            frame = next_frame(frame.clone(), pos.clone(), kv_len, noise(), temperature, topk, max_topk)
            pos += 1

    def generate_batch(self, requests: Sequence[Request]) -> list[Speech]:
        """Generate several requests in one batch; each stops on its own EOS or budget."""
        return [self._speech(codes) for codes in self._codes_batch(requests)]

    def _codes_batch(self, requests: Sequence[Request]) -> list[torch.Tensor]:
        """Each request's codes [K, F] (EOS excluded), generated in one batch."""
        per_row: list[list[torch.Tensor]] = [[] for _ in requests]
        for frames, active in self.iter_frames(requests):
            frames, active = frames.cpu(), active.cpu()
            for i in active.nonzero()[:, 0].tolist():
                per_row[i].append(frames[i])
        return [self._stacked(rows) for rows in per_row]

    def _stacked(self, frames: list[torch.Tensor]) -> torch.Tensor:
        """Frames [K] of one line -> its codes [K, F] ([K, 0] when it spoke none)."""
        return torch.stack(frames, dim=1) if frames else torch.zeros(self.num_codebooks, 0, dtype=torch.long)

    def _speech(self, codes: torch.Tensor) -> Speech:
        return Speech(codes=codes, audio=self.decode_audio(codes), sample_rate=self.sample_rate)

    def use_best_of(self, best_of: int | None, judge: str | os.PathLike | None = None) -> None:
        """Override generation.json's "best_of" and/or the judge (a `csm train-judge` output folder)."""
        if judge is not None:
            from .judge import load_judge

            self.judge = load_judge(judge, self.device)
        if best_of is not None:
            if best_of < 1:
                raise ValueError(f"best_of must be at least 1, got {best_of}")
            self.defaults["best_of"] = best_of
        if self.defaults["best_of"] > 1 and self.judge is None:
            raise ValueError(f"best_of {self.defaults['best_of']} needs a judge: this model has none (give one made "
                             "by `csm train-judge`)")

    def speak(self, request: Request, best_of: int | None = None) -> Speech:
        """One request. With a judge and best_of > 1 (default: generation.json's "best_of"), the line is drawn
        best_of times in one batch (draw i seeded seed + i * BEST_OF_SEED_STEP; draw 0 is what best_of=1 gives) and
        the draw the judge reads best is kept; only that one is decoded to audio."""
        n = self._best_of(best_of)
        if n == 1:
            return self.generate_batch([request])[0]
        return self._speech(self._best_draw(request, n))

    def _best_of(self, best_of: int | None = None) -> int:
        """How many draws a line gets: best_of (default generation.json's), 1 without a judge."""
        n = self.defaults["best_of"] if best_of is None else best_of
        if n < 1:
            raise ValueError(f"best_of must be at least 1, got {n}")
        return n if self.judge is not None else 1

    def draws(self, request: Request, n: int,
              source: Callable[[Request], Iterator[torch.Tensor]] | None = None) -> list[torch.Tensor]:
        """n draws [K, F] of one request, draw i seeded seed + i * BEST_OF_SEED_STEP (draw 0 is the request's own
        draw): one batch here, or, with a `source` (the server's batcher), n jobs read side by side."""
        if request.seed is None:  # distinct random draws, still reproducible from one seed drawn here
            request = replace(request, seed=int(torch.randint(0, 2**31, ())))
        requests = [replace(request, seed=request.seed + i * BEST_OF_SEED_STEP) for i in range(n)]
        if source is None:
            return self._codes_batch(requests)
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
        return [self._stacked(r) for r in rows]

    def _best_draw(self, request: Request, n: int,
                   source: Callable[[Request], Iterator[torch.Tensor]] | None = None) -> torch.Tensor:
        """The codes [K, F] of the judge's pick of n `draws` of the request."""
        draws = self.draws(request, n, source)
        scores = self.judge.rank(draws, request.text)
        return draws[min(range(n), key=scores.__getitem__)]

    def generate(
        self,
        text: str,
        speaker: int | None = None,
        context: Sequence[Segment] = (),
        max_audio_length_ms: float = 10_000,
        temperature: float | None = None,
        topk: int | None = None,
        seed: int | None = None,
    ) -> Speech:
        """Speak one line. speaker / temperature / topk left as None take `self.defaults`."""
        return self.speak(self.request(text, speaker, context, max_audio_length_ms, temperature, topk, seed))

    def generate_long(
        self,
        text: str,
        speaker: int | None = None,
        context: Sequence[Segment] = (),
        max_audio_length_ms: float = 10_000,
        temperature: float | None = None,
        topk: int | None = None,
        seed: int | None = None,
        *,
        max_words: int | None = None,
        pause_ms: float = 200,
        chain: bool = True,
        progress: bool = False,
    ) -> Speech:
        """Speak text of any length, one sentence at a time (`tokenizer.split_sentences`).

        Each sentence is a line of its own (`max_audio_length_ms` is its budget, `seed + i` its seed). With `chain`,
        its context is the given context plus the sentence before it, as text and the codes just generated (the
        conversation so far, as CSM is meant to be run); that sentence is left out when it would not fit. The
        sentences' audio is joined with `pause_ms` of silence; `codes` is their frames back to back."""
        from tqdm import tqdm

        lines, spk, context = self._long_setup(text, speaker, context, max_words, pause_ms)
        parts: list[Speech] = []
        previous: Segment | None = None
        for i, line in enumerate(tqdm(lines, unit="sentence", leave=False, disable=not progress or len(lines) < 2)):
            req = self._line_request(line, i, spk, context, previous, max_audio_length_ms, temperature, topk, seed)
            speech = self.speak(req)
            if speech.codes.shape[1] > 0:
                parts.append(speech)
                previous = Segment(spk, line, speech.codes) if chain else None
        return self._joined(parts, pause_ms)

    def generate_dialogue(
        self,
        turns: Sequence[tuple[int | None, str]],
        context: Sequence[Segment] = (),
        max_audio_length_ms: float = 10_000,
        temperature: float | None = None,
        topk: int | None = None,
        seed: int | None = None,
        *,
        max_words: int | None = None,
        pause_ms: float = 200,
        progress: bool = False,
    ) -> Speech:
        """Speak a conversation: each (speaker, text) turn as `generate_long` speaks it, in the context of `context`
        and of the turns before it (their text as the model read it and the codes just generated), what CSM is
        made for. The oldest turns are left out when they do not fit beside the turn's longest sentence. Turn i
        uses seed + 1000 * i; the turns' audio is joined with `pause_ms` of silence."""
        from tqdm import tqdm

        if not turns:
            raise ValueError("the dialogue has no turns")
        for _, text in turns:  # before any work
            _check_text(text)
        context = [self._encoded(c) for c in context]
        history: list[Segment] = []
        parts: list[Speech] = []
        for i, (speaker, text) in enumerate(tqdm(turns, unit="turn", leave=False, disable=not progress)):
            lines, spk, _ = self._long_setup(text, speaker, (), max_words, pause_ms)
            history = self.fit_history(text, spk, context, history, (), max_audio_length_ms, max_words)
            speech = self.generate_long(text, spk, [*context, *history], max_audio_length_ms, temperature, topk,
                                        None if seed is None else seed + 1000 * i, max_words=max_words,
                                        pause_ms=pause_ms)
            if speech.codes.shape[1] > 0:
                history.append(Segment(spk, " ".join(lines), speech.codes))
                parts.append(speech)
        return self._joined(parts, pause_ms)

    def fit_history(self, text: str, speaker: int | None, before: Sequence[Segment], history: Sequence[Segment],
                    after: Sequence[Segment] = (), max_audio_length_ms: float = 10_000,
                    max_words: int | None = None) -> list[Segment]:
        """The latest turns of `history` that fit in the context between `before` and `after` (all as codes), so
        that each sentence of `text` still fits the backbone with its generation budget: the oldest go first."""
        lines, spk, _ = self._long_setup(text, speaker, (), max_words, 0)
        history = list(history)
        while history and not self._fits(lines, spk, [*before, *history, *after], max_audio_length_ms):
            history.pop(0)
        return history

    def _fits(self, lines: list[str], speaker: int, context: list[Segment], max_audio_length_ms: float) -> bool:
        """Whether every line fits the backbone's context after `context`, with its generation budget."""
        return all(self._has_room(self.request(line, speaker, context, max_audio_length_ms)) for line in lines)

    def _has_room(self, req: Request) -> bool:
        """Whether the request's prompt and generation budget fit the backbone's context."""
        try:
            self._check_budget(len(self.prompt_frames(req.text, req.speaker, req.context)[0]), req)
        except ContextTooLongError:
            return False
        return True

    def _joined(self, parts: list[Speech], pause_ms: float) -> Speech:
        """Pieces of speech back to back: their codes, and their audio with `pause_ms` of silence between."""
        codes = torch.cat([p.codes for p in parts], dim=1) if parts else \
            torch.zeros(self.num_codebooks, 0, dtype=torch.long)
        audio = None
        if self.codec is not None and parts:
            gap = self._pause(pause_ms)
            audio = torch.cat([x for p in parts for x in (gap, p.audio)][1:])
        return Speech(codes=codes, audio=audio, sample_rate=self.sample_rate)

    def stream_long(
        self,
        text: str,
        speaker: int | None = None,
        context: Sequence[Segment] = (),
        max_audio_length_ms: float = 10_000,
        temperature: float | None = None,
        topk: int | None = None,
        seed: int | None = None,
        *,
        chunk_frames: int = 4,
        max_words: int | None = None,
        pause_ms: float = 200,
        chain: bool = True,
        source: Callable[[Request], Iterator[torch.Tensor]] | None = None,
        spoken: list[torch.Tensor] | None = None,
    ) -> Iterator[torch.Tensor]:
        """`generate_long` as a stream: audio chunks [T] as `stream` yields them, sentence after sentence, with the
        pause as a chunk of its own between sentences. The chunks concatenate to generate_long's audio.

        source: what runs each sentence's request, yielding its frames [K] (default: this generator, alone; the
        server passes its continuous batcher's, which gives the same frames). spoken: when given, each sentence's
        frames [K] are appended to it as they are streamed.

        With best_of > 1 (and a judge) a sentence streams only once all its draws are made and the judge has picked
        one: the first audio comes a sentence later, the price of the clearer draw."""
        if self.codec is None:
            raise ValueError("streaming audio needs a codec")
        lines, spk, context = self._long_setup(text, speaker, context, max_words, pause_ms)
        n = self._best_of()
        previous: Segment | None = None
        started = False
        for i, line in enumerate(lines):
            req = self._line_request(line, i, spk, context, previous, max_audio_length_ms, temperature, topk, seed)
            frames: list[torch.Tensor] = []
            line_source = source
            if n > 1:
                best = self._best_draw(req, n, source)
                line_source = lambda _, best=best: iter(best.unbind(1))  # noqa: E731
            for j, chunk in enumerate(self._stream(req, chunk_frames, frames, line_source)):
                if j == 0 and started:
                    yield self._pause(pause_ms)
                yield chunk
            if spoken is not None:
                spoken.extend(frames)
            if frames:
                started = True
                previous = Segment(spk, line, torch.stack(frames, dim=1)) if chain else None

    def check_lines(self, text: str, speaker: int | None = None, context: Sequence[Segment] = (),
                    max_audio_length_ms: float = 10_000, max_words: int | None = None) -> list[str]:
        """The sentences `generate_long` / `stream_long` would speak, each checked as its request will be (text,
        speaker, context, budget; the previous sentence aside), so that a request that would fail at its third
        sentence fails before any audio. Context audio must already be codes. Raises ValueError naming the sentence."""
        lines, spk, _ = self._long_setup(text, speaker, (), max_words, 0)
        for line in lines:
            try:
                self.prepare(self.request(line, spk, context, max_audio_length_ms))
                if self._best_of() > 1:
                    from .judge import text_targets

                    if not text_targets(line, self.judge.cfg.alphabet):
                        raise ValueError("the judge reads no letters in it; write it out in words")
            except ContextTooLongError:
                raise
            except ValueError as e:
                raise ValueError(f"sentence {line!r}: {e}") from None
        return lines

    def _long_setup(self, text: str, speaker: int | None, context: Sequence[Segment], max_words: int | None,
                    pause_ms: float) -> tuple[list[str], int, list[Segment]]:
        """generate_long's checks: (sentences, speaker, context with waveforms encoded once for all sentences)."""
        _check_text(text)
        if pause_ms < 0:
            raise ValueError(f"pause_ms must be >= 0, got {pause_ms}")
        context = [self._encoded(c) for c in context]
        lines = split_sentences(text, self.defaults["max_words"] if max_words is None else max_words,
                                spell=self.defaults["spell_numbers"])
        return lines, self.defaults["speaker"] if speaker is None else speaker, context

    def _line_request(self, line: str, i: int, speaker: int, context: list[Segment], previous: Segment | None,
                      max_audio_length_ms: float, temperature: float | None, topk: int | None,
                      seed: int | None) -> Request:
        """Sentence i's request: seed + i, and the previous sentence after the context if it fits."""
        req = self.request(line, speaker, context, max_audio_length_ms, temperature, topk,
                           None if seed is None else seed + i)
        if previous is not None:
            chained = replace(req, context=[*req.context, previous])
            if self._has_room(chained):  # else no room beside the given context: this sentence goes without it
                return chained
        return req

    def _pause(self, pause_ms: float) -> torch.Tensor:
        return torch.zeros(int(self.sample_rate * pause_ms / 1000))

    def request(self, text: str, speaker: int | None = None, context: Sequence[Segment] = (),
                max_audio_length_ms: float = 10_000, temperature: float | None = None, topk: int | None = None,
                seed: int | None = None) -> Request:
        """A Request, with the model's defaults for whatever is None (and its texts as the model reads them:
        `_spoken`)."""
        d = self.defaults
        context = [replace(seg, text=self._spoken(seg.text)) for seg in context]
        return Request(self._spoken(text), d["speaker"] if speaker is None else speaker, context, max_audio_length_ms,
                       d["temperature"] if temperature is None else temperature, d["topk"] if topk is None else topk,
                       seed)

    def unknown_words(self, text: str) -> list[str]:
        """Words of `text` (as the model reads it) that the model's vocabulary.txt does not list, in order; [] when
        the model lists none. A small voice mumbles words it never heard; CSM-1B lists none."""
        if self.vocabulary is None:
            return []
        return [w for w in dict.fromkeys(spoken_words(self._spoken(text))) if w not in self.vocabulary]

    def _spoken(self, text: str) -> str:
        """Text as this model is given it: numbers spelt out when its generation.json asks (a voice that learnt them
        only as words)."""
        return spell_numbers(text) if self.defaults["spell_numbers"] and isinstance(text, str) else text

    def stream(self, request: Request, chunk_frames: int = 4) -> Iterator[torch.Tensor]:
        """Yield audio chunks [T] (float, codec sample rate) as frames are produced: every `chunk_frames` frames,
        decoded by the codec's streaming decoder, so the concatenation equals the one-shot decode."""
        yield from self._stream(request, chunk_frames)

    def frames(self, request: Request) -> Iterator[torch.Tensor]:
        """One request's frames [K], as they are made, until its end of utterance or budget."""
        for step, active in self.iter_frames([request]):
            if not bool(active[0]):
                return
            yield step[0]

    def _stream(self, request: Request, chunk_frames: int, frames: list[torch.Tensor] | None = None,
                source: Callable[[Request], Iterator[torch.Tensor]] | None = None) -> Iterator[torch.Tensor]:
        """stream(), also appending the line's frames [K] (on the CPU) to `frames` when given; `source` as in
        stream_long."""
        if self.codec is None:
            raise ValueError("streaming audio needs a codec")
        if chunk_frames < 1:
            raise ValueError("chunk_frames must be at least 1")
        decoder = self.codec.decode_stream(1)
        pending: list[torch.Tensor] = []
        for frame in (source or self.frames)(request):
            pending.append(frame)
            if frames is not None:
                frames.append(frame.cpu())
            if len(pending) == chunk_frames:
                yield self._stream_chunk(decoder, pending)
                pending = []
        if pending:
            yield self._stream_chunk(decoder, pending)

    def _codec_ready(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, K, n] the codec can decode. CSM's vocabulary has 3 ids past the codec's 2048 entries; a trained
        model does not emit them, an untrained one may: they become 0 rather than crash the decoder."""
        size = getattr(getattr(self.codec, "cfg", None), "codebook_size", None)
        if size is not None:
            codes = codes.masked_fill(codes >= size, 0)
        return codes.to(self.device)

    def _stream_chunk(self, decoder, frames: list[torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            return decoder.decode(self._codec_ready(torch.stack(frames, dim=1)[None]))[0, 0].float().cpu()

    def decode_audio(self, codes: torch.Tensor) -> torch.Tensor | None:
        """Mimi codes [K, F] -> a mono waveform [T] at the codec's sample rate (None without a codec or frames)."""
        if self.codec is None or codes.shape[1] == 0:
            return None
        with torch.inference_mode():
            return self.codec.decode(self._codec_ready(codes[None]))[0, 0].float().cpu()


def load_generator(
    source: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    codec: Codec | None = None,
    engine: str | None = None,
    quantize: str | None = None,
    gemv: str = "matmul",
) -> Generator:
    """Model + tokenizer from a checkpoint directory or hub id (any layout, see checkpoints.py).

    quantize="int8": int8 weight-only transformer linears (quantize.py), ~1.7x faster on a CPU, close to but not
    bit-identical with the full-precision model."""
    from .checkpoints import load_checkpoint

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_checkpoint(source, device=device, dtype=dtype)
    if quantize == "int8":
        from .quantize import quantize_int8

        quantize_int8(model)
    elif quantize is not None:
        raise ValueError(f"unknown quantization {quantize!r}; supported: int8")
    tokenizer = TextTokenizer.from_pretrained(source)
    gen = Generator(model, tokenizer, codec, engine=engine, gemv=gemv)
    found = generation_defaults(source)
    gen.speakers = found.pop("speakers", None)
    gen.defaults.update(found)
    gen.vocabulary = model_vocabulary(source)
    gen.judge = model_judge(source, device, needed=gen.defaults["best_of"] > 1)
    return gen


def model_judge(source: str | os.PathLike, device: str | torch.device, needed: bool):
    """The judge (judge.py) beside a model: loaded when a local model directory holds one, or when `needed`
    (generation.json's "best_of" > 1), which makes its absence an error."""
    from .hub import ModelFilesNotFound, find_files
    from .judge import CONFIG, WEIGHTS, load_judge

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


def model_vocabulary(source: str | os.PathLike) -> frozenset[str] | None:
    """The words listed in a model directory's vocabulary.txt (one per line), or None without one."""
    from .hub import ModelFilesNotFound, find_files

    try:
        path = find_files(source, ["vocabulary.txt"])
    except ModelFilesNotFound:
        return None
    return frozenset(w for line in path.read_text(encoding="utf-8").splitlines() for w in spoken_words(line))


def generation_defaults(source: str | os.PathLike) -> dict:
    """The defaults a model directory recommends in generation.json ({"speaker", "temperature", "topk",
    "max_words", "spell_numbers", "best_of"}, all optional), e.g. the embedded voice, whose tiny model speaks more
    clearly with a small top-k and its judge's pick of several draws, learnt from lines of at most 14 words and never
    saw a digit; {} if none. "speakers"
    ({"id": "description"}), if present, comes back as {int id: description}."""
    import json

    from .hub import ModelFilesNotFound, find_files

    try:
        path = find_files(source, ["generation.json"])
    except ModelFilesNotFound:
        return {}
    try:
        found = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    unknown = set(found) - set(GENERATION_KEYS) if isinstance(found, dict) else {"(not an object)"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected some of {sorted(GENERATION_KEYS)}")
    if not isinstance(found.get("spell_numbers", False), bool):
        raise ValueError(f'{path}: "spell_numbers" must be true or false, got {found["spell_numbers"]!r}')
    for key in ("max_words", "best_of"):
        n = found.get(key, 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f'{path}: "{key}" must be a positive integer, got {n!r}')
    if "speakers" in found:
        listed = found["speakers"]
        try:
            speakers = {int(k): str(v) for k, v in listed.items()}
        except (AttributeError, ValueError):
            speakers = {}
        if not speakers or min(speakers) < 0:
            raise ValueError(f'{path}: "speakers" must map non-negative ids to descriptions, got {listed!r}')
        if found.get("speaker", DEFAULTS["speaker"]) not in speakers:
            raise ValueError(f"{path}: the default speaker {found.get('speaker', DEFAULTS['speaker'])} is not among "
                             f"its speakers {sorted(speakers)}")
        found["speakers"] = speakers
    return found
