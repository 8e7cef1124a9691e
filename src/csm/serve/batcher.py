"""Continuous batching: requests join and leave one running batch at any frame.

`Engine.run` runs a fixed batch until its last row stops, which a server cannot wait for. Here the batch
is a fixed set of slots, each owning one row of the KV caches. The requests that arrived since the last step are
prefilled together (a padded batch in a scratch cache, whose rows are then copied into free slots' rows), then step
with the others, one frame for every busy slot per step; a finished or cancelled request frees its slot at once. A request draws its sampling noise from its own generator
and no row's maths reads another's, so it gets the very frames it would get alone (`Generator.frames`), whatever
it shares the batch with.

Eagerly (the CPU), a step runs only the slots up to the last busy one (new requests take the lowest free slots, and
`KVCache.rows` views those first rows); with CUDA graphs or compiled steps it runs all slots, so that one captured
graph serves every step.
"""

from __future__ import annotations

import collections
import queue
import threading
from typing import Iterator

import torch

from ..engine import FrameStep, Prepared, frame_step_fns, sampling_rows
from ..generate import Generator, Request
from ..model import cache_rows

_DONE = object()


class Busy(RuntimeError):
    """More requests are waiting than the batcher accepts (`max_waiting`): try again later."""


class Job:
    """A submitted request. Iterate it for its frames [K] (on the CPU) as they are made; `cancel` frees its slot."""

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared
        self.cancelled = False
        self._out: queue.Queue = queue.Queue()

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            item = self._out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self) -> None:
        self.cancelled = True

    def _put(self, item) -> None:
        self._out.put(item)


class Batcher:
    """Runs the requests submitted from any thread on one generator's model, `slots` at a time.

    `start()` steps in a background thread; `step()` is one iteration (admit waiting requests, then one frame for
    every busy slot), for callers that drive it themselves (tests). At most `max_waiting` requests may wait for a
    slot (beyond those a free slot will take at the next step); `submit` refuses more with `Busy`.
    """

    def __init__(self, gen: Generator, slots: int = 8, max_waiting: int = 64) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.gen, self.slots, self.max_waiting = gen, slots, max_waiting
        m, dev, k = gen.model, gen.device, gen.num_codebooks
        self.static = gen.engine.kind != "eager" or dev.type == "cuda"
        self.backbone_cache, self.decoder_cache = m.backbone.new_cache(slots), m.decoder.new_cache(slots)
        self.jobs: list[Job | None] = [None] * slots
        self.frame = torch.zeros(slots, k, dtype=torch.long, device=dev)  # each slot's newest frame
        self.positions = [0] * slots  # where each slot's next frame goes in its cache row
        self.remaining = [0] * slots  # frames each slot may still emit
        self.topk = torch.ones(slots, 1, dtype=torch.long, device=dev)
        self.temperature = torch.ones(slots, 1, device=dev)
        self._steps: dict[int, tuple] = {}  # rows stepped -> frame_step_fns
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    # --- the caller's side ------------------------------------------------------------------------------
    def submit(self, request: Request) -> Job:
        """Queue a request. Bad input (empty text, unknown speaker, a context too long...) raises here, in the
        caller's thread, before it takes a slot."""
        job = Job(self.gen.prepare(request))
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            free = sum(j is None for j in self.jobs)  # the first `free` of the waiting take a slot at the next step
            if len(self._waiting) >= self.max_waiting + free:
                raise Busy(f"{max(0, len(self._waiting) - free)} requests are already waiting for one of "
                           f"{self.slots} slots")
            self._waiting.append(job)
            self._cond.notify()
        return job

    def frames(self, request: Request) -> Iterator[torch.Tensor]:
        """The request's frames [K], as `Generator.frames` gives them; closing the iterator early cancels it (a
        client that hung up stops costing compute). A `source` for `Generator.stream_long`."""
        job = self.submit(request)
        try:
            yield from job
        finally:
            job.cancel()

    def stats(self) -> dict:
        with self._cond:
            return {"slots": self.slots, "busy": sum(j is not None for j in self.jobs), "waiting": len(self._waiting)}

    def start(self) -> Batcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="csm-batcher", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the background thread; requests still waiting or running end with an error."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        self._fail_all(RuntimeError("the server is shutting down"))

    def drain(self) -> None:
        """Step until every submitted request has ended (for callers that drive the batcher themselves)."""
        while self._waiting or any(self.jobs):
            self.step()

    # --- the engine's side ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not any(self.jobs):
                    self._cond.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception as e:  # e.g. out of memory: the running requests fail, the batcher keeps serving
                self._fail_all(e, waiting=False)

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests into free slots (prefilled together), then make one frame for every busy slot."""
        for i, job in enumerate(self.jobs):
            if job is not None and job.cancelled:
                self._finish(i)
        admitted: list[tuple[int, Job]] = []
        free = [i for i, job in enumerate(self.jobs) if job is None]
        with self._cond:
            while free and self._waiting:
                job = self._waiting.popleft()
                if job.cancelled:
                    job._put(_DONE)
                else:
                    admitted.append((free.pop(0), job))
        if admitted:
            try:
                self._admit(admitted)
            except Exception as e:  # these requests fail (a device error, say); the running ones go on
                for i, job in admitted:
                    job._put(e)
                    self.jobs[i] = None
        busy = [i for i, job in enumerate(self.jobs) if job is not None]
        if not busy:
            return
        n = self.slots if self.static else busy[-1] + 1
        if n not in self._steps:
            self._steps[n] = frame_step_fns(self.gen.model, self.gen.engine.kind, cache_rows(self.backbone_cache, 0, n),
                                            cache_rows(self.decoder_cache, 0, n))
        _, _, next_frame = self._steps[n]
        dev, k, vocab = self.gen.device, self.gen.num_codebooks, self.gen.model.cfg.audio_vocab_size
        noise = torch.ones(n, k, vocab, device=dev)  # idle rows compute junk that nobody reads
        for i in busy:
            noise[i] = self.jobs[i].prepared.noise()
        pos = torch.tensor(self.positions[:n], device=dev)[:, None]
        kv_len = self.gen.model.cfg.backbone.max_seq_len if self.static else max(self.positions[i] for i in busy) + 1
        max_topk = int(self.topk[busy].max())
        if self.static and max_topk > 1:
            # A captured graph (or compiled step) is kept per top-k bound; any bound >= every row's top-k samples
            # the same, so round it up to a power of two: a client's choice of top-k cannot pile up captures.
            max_topk = 1 << (max_topk - 1).bit_length()
        frames = next_frame(self.frame[:n].clone(), pos, kv_len, noise, self.temperature[:n], self.topk[:n], max_topk)
        self.frame[:n] = frames
        frames = frames.cpu()
        for i in busy:
            self.positions[i] += 1
            self._emit(i, frames[i])

    def _admit(self, admitted: list[tuple[int, Job]]) -> None:
        """Prefill the new requests' prompts in one padded batch (`Engine.prefill`), make their first frames, and
        copy each prompt's keys and values into its slot's cache row."""
        m = self.gen.model
        prepared = [job.prepared for _, job in admitted]
        lengths = [len(p.tokens) for p in prepared]
        # Scratch caches as long as the longest prompt: the rows of the slot caches need not be neighbours.
        scratch_b, scratch_d = m.backbone.new_cache(len(prepared), max(lengths)), m.decoder.new_cache(len(prepared))
        last = self.gen.engine.prefill(prepared, scratch_b)
        topk, temperature = sampling_rows(prepared, self.gen.device)
        first = FrameStep(m, scratch_b, scratch_d, static=self.static).frame_from_hidden(
            last, torch.stack([p.noise() for p in prepared]), temperature, topk, int(topk.max()))
        for slot, scratch in zip(self.backbone_cache, scratch_b):
            for j, (i, _) in enumerate(admitted):
                slot.kv[:, i, :, : lengths[j]] = scratch.kv[:, j, :, : lengths[j]]
        first_cpu = first.cpu()
        for j, (i, job) in enumerate(admitted):
            p = job.prepared
            self.jobs[i], self.positions[i], self.remaining[i] = job, lengths[j], p.budget
            self.topk[i], self.temperature[i], self.frame[i] = p.topk, p.temperature, first[j]
            self._emit(i, first_cpu[j])

    def _emit(self, i: int, frame: torch.Tensor) -> None:
        """Hand slot i's new frame to its job, or end the job: an all-zero frame is the end of the utterance."""
        if not frame.any():
            return self._finish(i)
        self.jobs[i]._put(frame)
        self.remaining[i] -= 1
        if self.remaining[i] == 0:
            self._finish(i)

    def _finish(self, i: int) -> None:
        self.jobs[i]._put(_DONE)
        self.jobs[i], self.positions[i] = None, 0

    def _fail_all(self, error: Exception, waiting: bool = True) -> None:
        for i, job in enumerate(self.jobs):
            if job is not None:
                job._put(error)
                self.jobs[i] = None
        with self._cond:
            while waiting and self._waiting:
                self._waiting.popleft()._put(error)
