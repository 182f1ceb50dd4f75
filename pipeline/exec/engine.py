"""Continuous micro-batched generation on rank 0 for many sequences at once.

Sequences live in M micro-batches (M = number of stages, so every stage has one to work
on once the pipe is full). A new sequence is prefilled alone, as in
one-shot mode (prompt[:-1], in chunks that flow through the stages one behind the other),
then its caches join a micro-batch (mlx-lm's batch caches, left-padded), and its last
prompt token rides that micro-batch's next decode step. A finished sequence leaves its
micro-batch at once and the next prompt takes its place.

With a prompt cache (prompt_cache_bytes > 0) a new sequence starts from the longest cached
prefix of its prompt (prefix.py decides, every rank copies its share of the entry: Op.OPEN
with a payload) and prefills only the rest; a finished one leaves its caches, prompt and
answer, as an entry (Op.SAVE) for a later prompt that starts the same way, such as the next
turn of its conversation; a prefilled prompt is kept at once too, for the sequences admitted
after it (an entry that a longer one extends is dropped, see prefix.py).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import mlx.core as mx

from pipeline.exec.driver import Driver
from pipeline.exec.prefix import PrefixIndex
from pipeline.exec.head import (HeadSplit, SummaryCounts, combine_tops, greedy_rows, part_lse,
                                part_summary)
from pipeline.exec.sampling import Sampler, SamplingParams, logprobs_of, top_logprobs
from pipeline.exec.worker import CacheTable, used_bytes
from pipeline.model.shell import UnsupportedModel
from pipeline.wire.protocol import Batch, Flag, Message, Op


@dataclass
class Sequence:
    id: object
    prompt: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    extra: dict = field(default_factory=dict)  # carried to the result (e.g. the prompt text)
    tokens: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # perf_counter of each token's step
    finish_reason: str = ""
    started: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0
    cancelled: bool = False  # set from any thread: the engine ends it at its next step
    max_tokens: int = 0  # set by the engine: sampling.max_tokens within the context window
    logprobs: int | None = None  # per token: its log-probability and this many top ones
    token_logprobs: list = field(default_factory=list)  # (logprob, [(token, logprob)]) per token
    constraint: object | None = None  # allowed(width) / apply(logprobs) / accept(token): a grammar
    cached_tokens: int = 0  # prompt tokens taken from the prompt cache, not prefilled

    def __post_init__(self):
        self.sampler = Sampler(self.sampling)  # its own random stream (see sampling.py)
        self.max_tokens = self.sampling.max_tokens


class Engine:
    """Rank 0's batch scheduler over a Driver's stage and ring."""

    def __init__(self, driver: Driver, concurrency: int, microbatches: int | None = None,
                 prompt_cache_bytes: int = 0):
        self.driver, self.stage = driver, driver.stage
        if self.stage.batch_problem:
            raise UnsupportedModel(f"{self.stage.model_type} cannot run batched: "
                                   f"{self.stage.batch_problem}")
        self.size = driver.size
        self.concurrency = max(1, concurrency)
        self.microbatches = max(1, min(microbatches or self.size, self.concurrency))
        self.per_batch = math.ceil(self.concurrency / self.microbatches)
        self.table = CacheTable(self.stage)
        self.eos = set(driver.tokenizer.eos_token_ids)
        self._ids = itertools.count(self.microbatches + 1)  # ids for sequences in prefill
        self.interrupted = False
        rows = driver.head_share_rows
        if driver.ring is not None and rows > 0 and driver.head_split is None:
            driver.head_split = HeadSplit(self.stage.head.weight.shape[0], rows)
        # kept by the job (learnt once); one micro-batch has no second stage to even out with
        self.split = driver.head_split if self.microbatches > 1 else None
        self._cuts: dict[int, int] = {}  # micro-batch -> cut sent with its decode step
        self._head_cost = (0.0, 0)  # rank 0's last head: seconds, vocabulary rows
        self._step_cut = 0  # the cut the step being handled was sent with
        self._admitted = False  # a sequence was prefilled in this scheduling round
        self.summaries = SummaryCounts()  # greedy steps whose head came summarized
        # the prompt cache's index (None: off); the entries live in every rank's table.store
        self.prefixes = (PrefixIndex(prompt_cache_bytes, self.stage.can_keep)
                         if prompt_cache_bytes > 0 else None)
        self._new = True  # no run yet: other ranks may still hold an earlier engine's entries
        self._oversized: set[int] = set()  # id() of running sequences too big to keep

    # -- messages, applied here and sent down the ring in the same order ----------------
    def _control(self, op: Op, mb: int, payload: list[int] | None = None) -> None:
        msg = Message(op, mb, payload=payload or [])
        self.table.apply(msg)
        self.driver.send(msg)

    def _tokens(self, msg: Message) -> tuple[list[int], list[bool], mx.array | None]:
        """Greedy token of every row of a returned decode step, whether a row needs its exact
        log-probabilities instead, and the step's logits when they were computed whole (None
        when the last stage sent a summary of its share of the head: rows that need exact
        log-probabilities then compute the whole head)."""
        start = time.perf_counter()
        cut = self._cuts.pop(msg.mb, 0)
        self._step_cut = cut
        ring = self.driver.ring
        between = ring.progress if ring is not None and ring.sending else None
        if not cut or msg.part is None:
            logits = self.stage.logits(msg.h, between)
            tokens, exact = greedy_rows(logits)
            self._head_cost = (time.perf_counter() - start, logits.shape[-1])
            return tokens, exact, logits
        vocab = self.split.vocab
        mine = self.stage.head_logits(self.stage.final_norm(msg.h), cut,
                                      between=between)  # [B, V - cut]
        if msg.flags & Flag.LOGITS:
            logits = mx.concatenate([msg.part, mine], axis=1)
            tokens, exact = greedy_rows(logits)
        else:
            rest = part_summary(mine, vocab, lse=False)  # its logsumexp only where needed
            tokens, exact = combine_tops(msg.part, rest, cut, mine.dtype, vocab,
                                         lambda rows: part_lse(mine[mx.array(rows)]))
            self.summaries.add(exact)
            logits = None
        self._head_cost = (time.perf_counter() - start, vocab - cut)
        return tokens, exact, logits

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
            context = self.driver.context
            if context is not None:  # prompt + answer within the window, as serve counts
                seq.max_tokens = min(seq.max_tokens, context - len(seq.prompt))
            entry, keep = (None, 0) if self.prefixes is None else self.prefixes.lookup(seq.prompt)
            if entry is None:
                self._control(Op.OPEN, sid)
            else:  # every rank copies its share of the entry, cut back to `keep` tokens
                self.prefixes.pin(entry.id)
                self._control(Op.OPEN, sid, [entry.id, keep, len(entry)])
            seq.cached_tokens = keep
            self.driver.prefill(seq.prompt[keep:-1], self.table.get(sid), sid)
            if self.prefixes is not None and len(seq.prompt) - 1 > keep:
                self._keep_prompt(sid, seq)
            joining.append((sid, seq, entry))
        if joining:
            self._control(Op.JOIN, mb, [sid for sid, _, _ in joining])
            batch.extend(seq for _, seq, _ in joining)
            for _, _, entry in joining:  # copied into the micro-batch: evictable again
                if entry is not None:
                    self.prefixes.unpin(entry.id)

    def _keep_prompt(self, sid: int, seq: Sequence) -> None:
        """Save a just-prefilled prompt at once, for the next ones that start alike (a shared
        system prompt, a batch file's preamble): they need not wait for it to finish. Not one
        that rank 0's caches say cannot fit (every rank would copy it only to drop it), nor
        then its prompt and answer."""
        size = sum(map(used_bytes, self.table.get(sid))) * self.driver.cache_scale
        if size > self.prefixes.budget:
            self._oversized.add(id(seq))
        else:
            self._save(sid, None, seq.prompt[:-1])

    def _save(self, mb: int, row: int | None, tokens: list[int]) -> None:
        """Keep the caches of `tokens` as an entry: row `row` of micro-batch `mb`, or (None) a
        sequence `mb` just prefilled. Not when an entry holds them already."""
        if self.prefixes.covered(tokens):
            return
        entry = self.prefixes.new_id()
        self._control(Op.SAVE, mb, [entry] if row is None else [entry, row])
        nbytes = int(self.table.entry_bytes(entry) * self.driver.cache_scale)
        drop = self.prefixes.add(entry, tokens, nbytes)
        if drop:
            self._control(Op.DROP, 0, drop)

    def run(self, sequences: Iterable[Sequence], on_done: Callable[[Sequence], None],
            on_token: Callable[[Sequence, int], None] | None = None) -> None:
        """Generate every sequence; `on_done` gets each as soon as it finishes, `on_token` each
        token of the answer as it comes (not an EOS that ends it).

        `sequences` may be an iterator that has nothing now and more later (the server's
        queue): new ones are taken whenever a micro-batch has room; run returns once every
        sequence taken is done and the iterator has nothing."""
        pending = iter(sequences)
        self.driver.request(Batch())
        self.driver.reset()  # the batch does not use (or keep) the conversation's cache
        if self._new:  # this engine's index starts empty: so does every rank's store
            self._control(Op.DROP, 0)
            self._new = False
        batches: dict[int, list[Sequence]] = {mb: [] for mb in range(1, self.microbatches + 1)}
        try:
            for mb, batch in batches.items():  # fill the pipe: one micro-batch per stage
                self._admit(mb, batch, pending)
                if batch:
                    self._step(mb, batch)
            in_flight = sum(1 for b in batches.values() if b)
            while in_flight:
                msg = self.driver.collect()
                mb, busy, self._admitted = msg.mb, time.perf_counter(), False
                in_flight -= 1
                batch = batches[mb]
                greedy, exact, logits = self._tokens(msg)
                now = time.perf_counter()
                keep = []
                for row, seq in enumerate(batch):
                    grammar = seq.constraint
                    # the greedy token, unless exact logprobs or a grammar must decide
                    decided = seq.sampling.greedy and not exact[row] and grammar is None
                    logprobs = None
                    if not decided or seq.logprobs is not None:
                        if logits is None:  # a summarized step that combine_tops left open
                            logits = self.stage.logits(msg.h)
                        logprobs = logprobs_of(logits[row : row + 1])
                    # sampled rows each with their own RNG, from exact logprobs
                    drawn = logprobs if grammar is None else grammar.apply(logprobs)
                    token = greedy[row] if decided else seq.sampler(drawn)
                    if grammar is not None:
                        grammar.accept(token)
                    if seq.logprobs is not None:  # of the logits the token was drawn from:
                        # after a grammar's mask, normalized over the tokens it allowed
                        shown = logprobs if grammar is None else logprobs_of(drawn)
                        lp, top = top_logprobs(shown, token, seq.logprobs)
                        if grammar is not None:  # refused tokens (-inf) are not listed
                            top = [(t, v) for t, v in top if v > -math.inf]
                        seq.token_logprobs.append((lp, top))
                    if not seq.tokens:
                        seq.first_token = now
                    seq.tokens.append(token)
                    seq.token_times.append(now)
                    if on_token is not None and (token not in self.eos or seq.sampling.ignore_eos):
                        on_token(seq, token)
                    if token in self.eos and not seq.sampling.ignore_eos:
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
                    if self.prefixes is not None and seq.finish_reason in ("stop", "length") and (
                            id(seq) not in self._oversized):
                        # prompt and answer but its last token (sampled, never fed back)
                        self._save(mb, row, seq.prompt + seq.tokens[:-1])
                    self._oversized.discard(id(seq))
                    on_done(seq)
                if len(keep) < len(batch):
                    self._control(Op.FILTER, mb, keep)
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
                if self.split is not None and msg.busy_us and not self._admitted:
                    self.split.update(self._step_cut, busy, msg.busy_us * 1e-6, *self._head_cost)
        finally:
            self.table.clear()
            self._oversized.clear()
            self.driver.send(Message(Op.END))

    def _step(self, mb: int, batch: list[Sequence]) -> None:
        """Send micro-batch `mb` round the ring for one decode step."""
        # a sequence that just joined feeds its last prompt token; the others their last token
        tokens = [s.tokens[-1] if s.tokens else s.prompt[-1] for s in batch]
        flags, cut = Flag.RETURN, 0
        if self.split is not None and self.split.cut > 0:  # the last stage computes [0, cut)
            cut = self._cuts[mb] = self.split.cut
            flags |= Flag.HEAD if all(s.sampling.greedy for s in batch) else Flag.LOGITS
        self.driver.step(mx.array(tokens)[:, None], self.table.get(mb), mb, flags, cut)
