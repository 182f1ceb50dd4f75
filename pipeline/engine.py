"""Continuous micro-batched generation on rank 0 for many sequences at once.

Sequences live in M micro-batches (M = number of stages, so every stage has one to work
on once the pipe is full; see schedule.py). A new sequence is prefilled alone, as in
one-shot mode (prompt[:-1], in chunks that flow through the stages one behind the other),
then its caches join a micro-batch (mlx-lm's batch caches, left-padded), and its last
prompt token rides that micro-batch's next decode step. A finished sequence leaves its
micro-batch at once and the next prompt takes its place.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_p

from .generate import CacheTable, Driver
from .transport import (
    FLAG_RETURN, OP_END, OP_FILTER, OP_FORWARD, OP_JOIN, OP_OPEN, Message, send_request,
)


@dataclass
class Sequence:
    id: object
    prompt: list[int]
    max_tokens: int
    temp: float = 0.0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False
    extra: dict = field(default_factory=dict)  # carried to the result (e.g. the prompt text)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""
    started: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0
    cancelled: bool = False  # set from any thread: the engine ends it at its next step
    _key: object = None

    def sample(self, logprobs: mx.array) -> int:
        """One token from logprobs: [V] with this sequence's own settings and RNG."""
        if self.temp == 0:
            return int(mx.argmax(logprobs).item())
        if self._key is None:
            self._key = mx.random.key(self.seed if self.seed is not None else time.time_ns())
        self._key, sub = mx.random.split(self._key)
        logprobs = logprobs[None]
        if self.top_p < 1:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p > 0:
            logprobs = apply_min_p(logprobs, self.min_p)
        return int(mx.random.categorical(logprobs * (1 / self.temp), key=sub).item())


def logprobs_of(logits: mx.array) -> mx.array:
    """Log-probabilities as mlx-lm's generate_step computes them."""
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def greedy_rows(logits: mx.array) -> tuple[list[int], list[bool]]:
    """argmax of each row of logits: [B, V], without the logsumexp (0.4 ms a row on one CPU
    core for 32k tokens), and whether a row needs the exact path instead.

    mlx-lm takes the argmax of logits - c (c = logsumexp). Subtracting c keeps the order
    but rounding can merge two values that differ by less than a few ulps of |x - c|, and
    |x - c| <= |x - max| + log V near the top. A row whose runner-up is further than that
    below its maximum has the same argmax either way; the others (near ties, in practice
    never seen) take the exact path.
    """
    top = mx.max(logits, axis=-1, keepdims=True)
    eps = float(mx.finfo(logits.dtype).eps)
    tol = 8 * eps * (2 * math.log(logits.shape[-1]) + 1)
    close = mx.sum(logits >= top - tol, axis=-1)
    index = mx.argmax(logits, axis=-1)
    mx.eval(index, close)
    return index.tolist(), [c > 1 for c in close.tolist()]


class Engine:
    """Rank 0's batch scheduler over a Driver's stage and ring."""

    def __init__(self, driver: Driver, concurrency: int, microbatches: int | None = None):
        self.driver, self.stage = driver, driver.stage
        self.size = driver.size
        self.concurrency = max(1, concurrency)
        self.microbatches = max(1, min(microbatches or self.size, self.concurrency))
        self.per_batch = math.ceil(self.concurrency / self.microbatches)
        self.table = CacheTable(self.stage)
        self.eos = set(driver.tokenizer.eos_token_ids)
        self._ids = itertools.count(self.microbatches + 1)  # ids for sequences in prefill
        self._local: deque = deque()  # one rank: activations "sent round" to ourselves
        self.interrupted = False

    # -- messages, applied here and sent down the ring in the same order ----------------
    def _control(self, op: int, mb: int, payload: list[int] | None = None) -> None:
        msg = Message(op, mb, payload=payload or [])
        self.table.apply(msg)
        if self.driver.ring is not None:
            self.driver.ring.send(msg)

    def _forward(self, mb: int, tokens: mx.array, want: bool) -> None:
        """Embed tokens: [B, L], run rank 0's layers and pass the result on."""
        ring = self.driver.ring
        h = self.stage.forward(self.stage.embed(tokens), self.table.get(mb),
                               ring.progress if ring is not None and ring.sending else None)
        mx.eval(h)
        if self.driver.ring is None:
            if want:
                self._local.append((mb, h))
        else:
            self.driver.ring.send(Message(OP_FORWARD, mb, FLAG_RETURN if want else 0, h=h))

    def _collect(self) -> tuple[int, mx.array]:
        if self.driver.ring is None:
            return self._local.popleft()
        msg = self.driver.ring.recv()
        return msg.mb, msg.h

    # -- scheduling --------------------------------------------------------------------
    def _admit(self, mb: int, batch: list[Sequence], pending: Iterator[Sequence]) -> None:
        """Prefill new sequences alone, then join them to micro-batch `mb`."""
        joining = []
        while len(batch) + len(joining) < self.per_batch and not self.interrupted:
            seq = next(pending, None)
            if seq is None:
                break
            seq.started = time.perf_counter()
            sid = next(self._ids)
            self._control(OP_OPEN, sid)
            head = seq.prompt[:-1]
            for i in range(0, len(head), self.driver.prefill_chunk):
                self._forward(sid, mx.array([head[i : i + self.driver.prefill_chunk]]), False)
            joining.append((sid, seq))
        if joining:
            self._control(OP_JOIN, mb, [sid for sid, _ in joining])
            batch.extend(seq for _, seq in joining)

    def run(self, sequences: Iterable[Sequence], on_done: Callable[[Sequence], None],
            on_token: Callable[[Sequence, int], None] | None = None) -> None:
        """Generate every sequence; `on_done` gets each as soon as it finishes, `on_token` each
        token of the answer as it comes (not an EOS that ends it).

        `sequences` may be an iterator that has nothing now and more later (the server's
        queue): new ones are taken whenever a micro-batch has room; run returns once every
        sequence taken is done and the iterator has nothing."""
        pending = iter(sequences)
        if self.driver.ring is not None:
            send_request(self.driver.comm, {"op": "batch"})
        self.driver.reset()  # the batch does not use (or keep) the conversation's cache
        batches: dict[int, list[Sequence]] = {mb: [] for mb in range(1, self.microbatches + 1)}
        try:
            for mb, batch in batches.items():  # fill the pipe: one micro-batch per stage
                self._admit(mb, batch, pending)
                if batch:
                    self._step(mb, batch)
            in_flight = sum(1 for b in batches.values() if b)
            while in_flight:
                mb, h = self._collect()
                busy = time.perf_counter()
                in_flight -= 1
                batch = batches[mb]
                logits = self.stage.logits(h)  # [B, V]
                greedy, near_tie = greedy_rows(logits)
                now = time.perf_counter()
                keep = []
                for row, seq in enumerate(batch):
                    if seq.temp == 0 and not near_tie[row]:
                        token = greedy[row]
                    else:  # sampled rows each with their own RNG, from exact logprobs
                        token = seq.sample(logprobs_of(logits[row]))
                    if not seq.tokens:
                        seq.first_token = now
                    seq.tokens.append(token)
                    if on_token is not None and (token not in self.eos or seq.ignore_eos):
                        on_token(seq, token)
                    if token in self.eos and not seq.ignore_eos:
                        seq.finish_reason = "stop"
                    elif len(seq.tokens) >= seq.max_tokens:
                        seq.finish_reason = "length"
                    elif seq.cancelled:
                        seq.finish_reason = "cancelled"
                    elif self.interrupted:
                        seq.finish_reason = "interrupted"
                    else:
                        keep.append(row)
                        continue
                    seq.finished = now
                    on_done(seq)
                if len(keep) < len(batch):
                    self._control(OP_FILTER, mb, keep)
                    batches[mb] = batch = [batch[i] for i in keep]
                self._admit(mb, batch, pending)
                if batch:
                    self._step(mb, batch)
                    in_flight += 1
                for idle_mb, idle in batches.items():  # late arrivals also fill empty ones
                    if not idle:
                        self._admit(idle_mb, idle, pending)
                        if idle:
                            self._step(idle_mb, idle)
                            in_flight += 1
                self.stage.compute_s += time.perf_counter() - busy
        finally:
            self.table.clear()
            if self.driver.ring is not None:
                self.driver.ring.send(Message(OP_END))

    def _step(self, mb: int, batch: list[Sequence]) -> None:
        """Send micro-batch `mb` round the ring for one decode step."""
        # a sequence that just joined feeds its last prompt token; the others their last token
        tokens = [s.tokens[-1] if s.tokens else s.prompt[-1] for s in batch]
        self._forward(mb, mx.array(tokens)[:, None], True)
