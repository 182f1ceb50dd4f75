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
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import apply_min_p, apply_top_p

from pipeline.exec.worker import CacheTable, Driver
from pipeline.model.stage import near_tie_tolerance, top_summary
from pipeline.wire.ring import (
    FLAG_HEAD, FLAG_LOGITS, FLAG_RETURN, OP_END, OP_FILTER, OP_FORWARD, OP_JOIN, OP_OPEN,
    Message, send_request,
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
    token_times: list[float] = field(default_factory=list)  # perf_counter of each token's step
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
    summary = top_summary(logits, logits.shape[-1])
    return [int(i) for i in summary[:, 1]], [c > 1 for c in summary[:, 2]]


def combine_tops(first: np.ndarray, rest: np.ndarray, cut: int, tol: float
                 ) -> tuple[list[int], list[bool]]:
    """greedy_rows over logits split in two: `first` summarizes vocabulary [0, cut) and `rest`
    [cut, V) (top_summary rows). The first maximum wins ties like argmax; a row is a near tie
    when either part has one or the other part's maximum comes within 1.5 x tol of it (a
    margin over greedy_rows' test, which rounds the threshold in the logits' dtype)."""
    tokens, near = [], []
    for (m1, i1, c1), (m2, i2, c2) in zip(first.tolist(), rest.tolist()):
        if m1 >= m2:
            tokens.append(int(i1))
            near.append(c1 > 1 or m2 >= m1 - 1.5 * tol)
        else:
            tokens.append(cut + int(i2))
            near.append(c2 > 1 or m1 >= m2 - 1.5 * tol)
    return tokens, near


class HeadSplit:
    """Where a decode step's vocabulary is cut between the last stage (rows [0, cut) of the
    head, which it holds) and rank 0 ([cut, V)): the shared head.

    Rank 0 runs the final norm, the head and the sampling on top of its layers; cutting the
    head's work in two lets the last stage take over as much of it as evens out the two
    stages' busy time per micro-batch, measured as the job runs (rank 0's own, and the last
    stage's as it reports in each reply). After every WINDOW micro-batches measured at the
    current cut, the cut moves by half the median imbalance's worth of rows (in multiples of
    ALIGN, within [0, max_rows]); steps sent with an older cut are not counted."""

    ALIGN = 128
    WINDOW = 8
    DEADBAND_S = 0.5e-3

    def __init__(self, vocab: int, max_rows: int):
        self.vocab, self.max_rows = vocab, max_rows
        self.cut = self._fit(min(max_rows, vocab // 2))
        self.imbalance_s: float | None = None  # last window's median (rank 0 - last stage)
        self.moves = 0
        self._window: list[tuple[float, float]] = []

    def _fit(self, rows: float) -> int:
        rows = int(round(rows / self.ALIGN)) * self.ALIGN
        return max(0, min(self.max_rows, rows))

    def update(self, cut: int, rank0_s: float, last_s: float, head_s: float,
               head_rows: int) -> None:
        """One micro-batch sent with `cut`: both stages' busy seconds, and rank 0's seconds
        for its `head_rows` rows of the head (which prices one row)."""
        if cut != self.cut or head_rows <= 0 or head_s <= 0:
            return
        self._window.append((rank0_s - last_s, head_s / head_rows))
        if len(self._window) < self.WINDOW:
            return
        diff = statistics.median(d for d, _ in self._window)
        per_row = statistics.median(p for _, p in self._window)
        self._window.clear()
        self.imbalance_s = diff
        if abs(diff) > self.DEADBAND_S:
            # moving k rows changes the difference by about 2 k per_row: go half way there
            new = self._fit(self.cut + 0.5 * diff / (2 * per_row))
            self.moves += new != self.cut
            self.cut = new


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
        rows = getattr(driver, "head_share_rows", 0)
        if driver.ring is not None and rows > 0 and getattr(driver, "head_split", None) is None:
            driver.head_split = HeadSplit(self.stage.head.weight.shape[0], rows)
        # kept by the job (learnt once); one micro-batch has no second stage to even out with
        self.split = getattr(driver, "head_split", None) if self.microbatches > 1 else None
        self._cuts: dict[int, int] = {}  # micro-batch -> cut sent with its decode step
        self._head_cost = (0.0, 0)  # rank 0's last head: seconds, vocabulary rows
        self._step_cut = 0  # the cut the step being handled was sent with
        self._admitted = False  # a sequence was prefilled in this scheduling round

    # -- messages, applied here and sent down the ring in the same order ----------------
    def _control(self, op: int, mb: int, payload: list[int] | None = None) -> None:
        msg = Message(op, mb, payload=payload or [])
        self.table.apply(msg)
        if self.driver.ring is not None:
            self.driver.ring.send(msg)

    def _forward(self, mb: int, tokens: mx.array, flags: int, aux: int = 0) -> None:
        """Embed tokens: [B, L], run rank 0's layers and pass the result on."""
        ring = self.driver.ring
        h = self.stage.forward(self.stage.embed(tokens), self.table.get(mb),
                               ring.progress if ring is not None and ring.sending else None)
        mx.eval(h)
        if self.driver.ring is None:
            if flags & FLAG_RETURN:
                self._local.append(Message(OP_FORWARD, mb, flags, h=h))
        else:
            self.driver.ring.send(Message(OP_FORWARD, mb, flags, h=h, aux=aux))

    def _collect(self) -> Message:
        if self.driver.ring is None:
            return self._local.popleft()
        return self.driver.ring.recv()

    def _tokens(self, msg: Message) -> tuple[list[int], list[bool], mx.array | None]:
        """Greedy token and near-tie flag of every row of a returned decode step, and its
        logits when they were computed whole (None when the last stage sent a summary of
        its share of the head: rows that need exact logits then compute them)."""
        start = time.perf_counter()
        cut = self._cuts.pop(msg.mb, 0)
        self._step_cut = cut
        ring = self.driver.ring
        between = ring.progress if ring is not None and ring.sending else None
        if not cut or msg.part is None:
            logits = self.stage.logits(msg.h, between)
            tokens, near = greedy_rows(logits)
            self._head_cost = (time.perf_counter() - start, logits.shape[-1])
            return tokens, near, logits
        vocab = self.split.vocab
        mine = self.stage.head_logits(self.stage.final_norm(msg.h), cut,
                                      between=between)  # [B, V - cut]
        if msg.flags & FLAG_LOGITS:
            logits = mx.concatenate([msg.part, mine], axis=1)
            tokens, near = greedy_rows(logits)
        else:
            rest = top_summary(mine, vocab)
            tokens, near = combine_tops(msg.part, rest, cut,
                                        near_tie_tolerance(mine.dtype, vocab))
            logits = None
        self._head_cost = (time.perf_counter() - start, vocab - cut)
        return tokens, near, logits

    # -- scheduling --------------------------------------------------------------------
    def _admit(self, mb: int, batch: list[Sequence], pending: Iterator[Sequence]) -> None:
        """Prefill new sequences alone, then join them to micro-batch `mb`."""
        joining = []
        while len(batch) + len(joining) < self.per_batch and not self.interrupted:
            seq = next(pending, None)
            if seq is None:
                break
            seq.started = time.perf_counter()
            self._admitted = True
            sid = next(self._ids)
            self._control(OP_OPEN, sid)
            head = seq.prompt[:-1]
            for i in range(0, len(head), self.driver.prefill_chunk):
                self._forward(sid, mx.array([head[i : i + self.driver.prefill_chunk]]), 0)
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
                msg = self._collect()
                mb, busy, self._admitted = msg.mb, time.perf_counter(), False
                in_flight -= 1
                batch = batches[mb]
                greedy, near_tie, logits = self._tokens(msg)
                now = time.perf_counter()
                keep = []
                for row, seq in enumerate(batch):
                    if seq.temp == 0 and not near_tie[row]:
                        token = greedy[row]
                    else:  # sampled rows each with their own RNG, from exact logprobs
                        if logits is None:  # a near tie in a summarized step: rare
                            logits = self.stage.logits(msg.h)
                        token = seq.sample(logprobs_of(logits[row]))
                    if not seq.tokens:
                        seq.first_token = now
                    seq.tokens.append(token)
                    seq.token_times.append(now)
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
                busy = time.perf_counter() - busy
                self.stage.compute_s += busy
                if self.split is not None and msg.aux and not self._admitted:
                    self.split.update(self._step_cut, busy, msg.aux * 1e-6, *self._head_cost)
        finally:
            self.table.clear()
            if self.driver.ring is not None:
                self.driver.ring.send(Message(OP_END))

    def _step(self, mb: int, batch: list[Sequence]) -> None:
        """Send micro-batch `mb` round the ring for one decode step."""
        # a sequence that just joined feeds its last prompt token; the others their last token
        tokens = [s.tokens[-1] if s.tokens else s.prompt[-1] for s in batch]
        flags, cut = FLAG_RETURN, 0
        if self.split is not None and self.split.cut > 0:  # the last stage computes [0, cut)
            cut = self._cuts[mb] = self.split.cut
            flags |= FLAG_HEAD if all(s.temp == 0 for s in batch) else FLAG_LOGITS
        self._forward(mb, mx.array(tokens)[:, None], flags, cut)
