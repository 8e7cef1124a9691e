"""Sampling and the frame engine.

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

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from .model import CSM, causal_mask

FRAME_MS = 80  # Mimi: 12.5 frames per second


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


def stack_frames(frames: list[torch.Tensor], num_codebooks: int) -> torch.Tensor:
    """Frames [K] of one line -> its codes [K, F] ([K, 0] when it spoke none)."""
    return torch.stack(frames, dim=1) if frames else torch.zeros(num_codebooks, 0, dtype=torch.long)


class Engine:
    """A CSM model in its inference layout, and the batched frame loop over prepared prompts.

    kind: how the per-frame step runs. "eager": op by op (the CPU default: there launches are cheap and static
    shapes would only add work); "graph": captured once per batch size as a CUDA graph and replayed (the GPU
    default); "compile": the backbone step and the decoder step fused by torch.compile (Inductor), and on CUDA
    the whole frame of compiled kernels captured as one CUDA graph.

    The model is switched to its inference layout in place: eval mode, q/k/v and gate/up projections fused
    (`CSM.fuse_projections`: two matrix-vector products per layer instead of five; the maths is unchanged).
    `fuse=False` keeps the five separate projections (for measuring what fusion buys: `csm bench --no-fuse`).

    gemv: how a decoding step's matrix-vector products run. "matmul": the library's (cuBLAS on CUDA), bit for bit
    the eager engine's; "inductor" (compile only): written as multiply + sum so Inductor generates them fused with
    the norm and activation around them (quantize.inductor_gemv; ~10 % faster per frame on an H100, the same maths
    summed in another order).
    """

    def __init__(self, model: CSM, kind: str | None = None, *, fuse: bool = True, gemv: str = "matmul") -> None:
        self.model = model.eval().fuse_projections() if fuse else model.eval()
        self.num_codebooks = model.cfg.audio_num_codebooks
        self.kind = kind or ("graph" if self.device.type == "cuda" else "eager")
        if self.kind not in ENGINES:
            raise ValueError(f"unknown engine {self.kind!r}; choose one of {', '.join(ENGINES)}")
        if self.kind == "graph" and self.device.type != "cuda":
            raise ValueError("engine='graph' needs a CUDA device (use 'eager' or 'compile' on CPU)")
        if gemv not in GEMVS:
            raise ValueError(f"unknown gemv {gemv!r}; choose one of {', '.join(GEMVS)}")
        if gemv == "inductor":
            if self.kind != "compile":  # run eagerly, multiply + sum would materialise a weight-sized product
                raise ValueError(f"gemv='inductor' needs engine='compile' (got engine={self.kind!r})")
            from .quantize import inductor_gemv

            inductor_gemv(self.model)
        self.gemv = gemv
        self._step: tuple[int, FrameStep, Callable, Callable] | None = None  # (batch size, ...), see step_fns

    @property
    def device(self) -> torch.device:
        return self.model.text_embeddings.weight.device

    def budget(self, prompt_len: int, max_audio_length_ms: float) -> int:
        """The most frames a prompt of prompt_len frames may generate; ContextTooLongError when the two do not fit
        the backbone's context."""
        max_frames = int(max_audio_length_ms // FRAME_MS)
        if max_frames < 1:
            raise ValueError(f"max_audio_length_ms={max_audio_length_ms} is shorter than one {FRAME_MS} ms frame")
        limit = self.model.cfg.backbone.max_seq_len
        need = prompt_len + max_frames
        if need > limit:
            raise ContextTooLongError(
                f"prompt ({prompt_len} frames of context and text) + generation budget ({max_frames} frames = "
                f"{max_audio_length_ms:g} ms) needs {need} positions, {need - limit} over the model's {limit}; "
                "shorten the context or max_audio_length_ms"
            )
        return max_frames

    def prepare(self, tokens: torch.Tensor, mask: torch.Tensor, max_audio_length_ms: float, temperature: float,
                topk: int, seed: int | None) -> Prepared:
        """Prompt frames (tokens [S, K + 1] long, mask [S, K + 1] bool) made ready to run: the frame budget, the
        sampling settings and the request's own random generator. ValueError on bad input."""
        width = self.num_codebooks + 1
        if tokens.ndim != 2 or tokens.shape[1] != width or tokens.shape != mask.shape or len(tokens) == 0:
            raise ValueError(f"prompt frames must be tokens and mask of the same shape [S >= 1, {width}], "
                             f"got {tuple(tokens.shape)} and {tuple(mask.shape)}")
        budget = self.budget(len(tokens), max_audio_length_ms)
        rng = torch.Generator(device=self.device)
        rng.manual_seed(seed) if seed is not None else rng.seed()
        # Greedy requests (temperature <= 0) become top-1; temperature then only needs to be positive.
        greedy = temperature <= 0
        return Prepared(tokens.long().cpu(), mask.bool().cpu(), budget, 1 if greedy else max(1, topk),
                        1.0 if greedy else float(temperature), rng,
                        (self.num_codebooks, self.model.cfg.audio_vocab_size))

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

    def step_fns(self, batch_size: int) -> tuple[FrameStep, Callable, Callable]:
        """Caches + the frame functions (graphed or compiled when asked) for this batch size. Only the latest batch
        size's are kept, so caches of an old size do not pile up; a repeated size reuses them (and their capture)."""
        if self._step is None or self._step[0] != batch_size:
            m = self.model
            self._step = (batch_size, *frame_step_fns(m, self.kind, m.backbone.new_cache(batch_size),
                                                      m.decoder.new_cache(batch_size)))
        return self._step[1:]

    @torch.inference_mode()
    def run(self, prepared: Sequence[Prepared]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Run prepared prompts together; yield (frames [B, K], active [B] bool) per step until every row stopped.

        A row is inactive once it produced its all-zero EOS frame or used its budget; its frames are then junk.
        """
        if not prepared:
            raise ValueError("no requests")
        budgets, lengths = [p.budget for p in prepared], [len(p.tokens) for p in prepared]
        b, dev, s = len(prepared), self.device, max(lengths)
        topk, temperature = sampling_rows(prepared, dev)
        max_topk = int(topk.max())

        def noise() -> torch.Tensor:  # one row per request from its own generator: seeds stay per request
            return torch.stack([p.noise() for p in prepared])

        step, first_frame, next_frame = self.step_fns(b)
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

    def codes(self, prepared: Sequence[Prepared]) -> list[torch.Tensor]:
        """Each prompt's codes [K, F] (EOS excluded), generated in one batch."""
        per_row: list[list[torch.Tensor]] = [[] for _ in prepared]
        for frames, active in self.run(prepared):
            frames, active = frames.cpu(), active.cpu()
            for i in active.nonzero()[:, 0].tolist():
                per_row[i].append(frames[i])
        return [stack_frames(rows, self.num_codebooks) for rows in per_row]
