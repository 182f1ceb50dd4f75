"""Generation: rank 0 drives the ring (tokenize, prefill, sample, stop); the others serve.

Prefill is pipelined for free: rank 0 posts chunk k to rank 1 and goes straight on to
chunk k+1, so stages work on different chunks at the same time; only the step that needs
logits asks the last stage to send its output back (FLAG_RETURN).
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from pipeline.model.stage import Stage, top_summary
from pipeline.wire.ring import (
    FLAG_HEAD, FLAG_LOGITS, FLAG_RETURN, OP_END, OP_FILTER, OP_FORWARD, OP_JOIN, OP_OPEN, Message, Ring, gather_stats,
    reply_stats, send_request, wait_request,
)

DEFAULT_MAX_TOKENS = 256
DEFAULT_PREFILL_CHUNK = 512

# Test hook (tests/test_faults.py): PIPELINE_FAULT=rank1:step5 makes rank 1 raise at its 5th
# forward step, to check that an exception on any rank ends the whole job. Unset: no effect.
FAULT = os.environ.get("PIPELINE_FAULT", "")


def _injected_fault(rank: int, step: int) -> None:
    if FAULT == f"rank{rank}:step{step}":
        raise RuntimeError(f"fault injected by PIPELINE_FAULT={FAULT}")


@dataclass
class Sampling:
    temp: float = 0.0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    ignore_eos: bool = False

    def check(self) -> None:
        if self.temp < 0:
            raise ValueError(f"--temp {self.temp} is negative: use 0 for greedy or a positive value")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p} is outside (0, 1]")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"--min-p {self.min_p} is outside [0, 1)")
        if self.max_tokens <= 0:
            raise ValueError(f"--max-tokens {self.max_tokens} must be at least 1")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # tokens prefilled for this turn (reused cache excluded)
    cached_tokens: int = 0  # tokens whose KV cache was reused from the previous turn
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    ttft_s: float = 0.0
    finish_reason: str = ""
    tokens: list[int] = field(default_factory=list)


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def rank_stats(stage: Stage, ring: Ring | None, weight_bytes: int) -> dict:
    start, end = stage.layer_range
    return {
        "rank": ring.rank if ring else 0,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "layer_range": [start, end],
        "weight_bytes": weight_bytes,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_mlx_bytes": mx.get_peak_memory(),
        "bytes_sent": ring.bytes_sent if ring else 0,
        "compute_s": round(stage.compute_s, 4),  # rank 0: its layers, the head and sampling
        "wait_s": round(ring.wait_s, 4) if ring else 0.0,
    }


class CacheTable:
    """A rank's KV caches by id: 0 is the conversation (REPL, one-shot); other ids are batch
    micro-batches and sequences being prefilled before they join one. Every rank applies the
    same control messages in the same (ring) order, so the tables stay alike."""

    def __init__(self, stage: Stage):
        self.stage, self.batches = stage, {}

    def get(self, mb: int) -> list | None:
        return None if mb == 0 else self.batches[mb]

    def apply(self, msg: Message) -> None:
        if msg.op == OP_OPEN:
            self.batches[msg.mb] = self.stage.make_caches()
        elif msg.op == OP_JOIN:
            parts = [self.batches.pop(i) for i in msg.payload]
            # mlx-lm's caches merge into their batch kind (KVCache -> BatchKVCache, ...)
            joined = [parts[0][i].merge([p[i] for p in parts]) for i in range(len(parts[0]))]
            if msg.mb in self.batches:
                for mine, new in zip(self.batches[msg.mb], joined):
                    mine.extend(new)
            else:
                self.batches[msg.mb] = joined
        elif msg.op == OP_FILTER:
            if msg.payload:
                keep = mx.array(msg.payload)
                for cache in self.batches[msg.mb]:
                    cache.filter(keep)
            else:
                del self.batches[msg.mb]

    def clear(self) -> None:
        self.batches.clear()


def serve(comm, stage: Stage, weight_bytes: int) -> None:
    """Ranks 1..N-1: run requests from rank 0 until told to quit."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # rank 0's Ctrl-C (see repl.INTERRUPTS)
    ring, table, steps = Ring(comm), CacheTable(stage), 0
    while True:
        request = wait_request(comm)
        op = request["op"]
        if op == "quit":
            break
        if op == "stats":
            reply_stats(comm, rank_stats(stage, ring, weight_bytes))
            continue
        if op == "run":
            stage.trim_to(request["keep"])
        while True:  # the request's messages, in ring order
            msg = ring.recv()
            if msg.op == OP_FORWARD:
                if FAULT:
                    steps += 1
                    _injected_fault(ring.rank, steps)
                start = time.perf_counter()
                msg.h = stage.forward(msg.h, table.get(msg.mb),
                                      ring.progress if ring.sending else None)
                mx.eval(msg.h)
                if ring.is_last_stage and msg.flags & (FLAG_HEAD | FLAG_LOGITS):
                    _head_share(stage, msg, ring.progress if ring.sending else None)
                busy = time.perf_counter() - start
                stage.compute_s += busy
                if ring.is_last_stage:
                    msg.aux = max(1, int(busy * 1e6))  # tells rank 0 how long this step took
                if not ring.is_last_stage or msg.flags & FLAG_RETURN:
                    ring.send(msg)
                continue
            if not ring.is_last_stage:  # control messages go down the ring, not back to 0
                ring.send(msg)
            if msg.op == OP_END:
                table.clear()
                break
            table.apply(msg)
    ring.close()


def _head_share(stage: Stage, msg: Message, between=None) -> None:
    """The last stage's share of a decode step's head: logits of vocabulary [0, msg.aux), or
    their per-row summary (max, argmax, near-tie count) when every row is greedy. `between`:
    see Stage.head_logits."""
    if stage.head_share is None:
        raise RuntimeError("asked for a share of the head but holds none")
    part = stage.head_logits(stage.final_norm(msg.h), 0, msg.aux, between=between)
    if msg.flags & FLAG_HEAD:
        msg.part = top_summary(part, stage.args.vocab_size)
    else:
        mx.eval(part)
        msg.part = part


def check_prompt(prompt: list[int], context: int | None) -> None:
    if not prompt:
        raise ValueError("empty prompt: type some text")
    if context is not None and len(prompt) >= context:
        raise ValueError(f"the prompt has {len(prompt)} tokens but the context window is "
                         f"{context}: shorten it (in the chat: /reset), or raise --max-context "
                         f"if the model allows")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Driver:
    """Rank 0's handle on the whole pipeline: one conversation's KV cache at a time."""

    def __init__(self, comm, stage: Stage, tokenizer, weight_bytes: int,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, context: int | None = None):
        self.comm, self.stage, self.tokenizer = comm, stage, tokenizer
        self.size = comm.Get_size() if comm is not None else 1
        self.ring = Ring(comm) if self.size > 1 else None
        self.weight_bytes = weight_bytes
        self.prefill_chunk = prefill_chunk
        self.context = context  # the context window (tokens); None: unchecked
        self.fed: list[int] = []  # tokens whose keys/values sit in the caches of every rank
        self.interrupted = False  # set from a signal handler to stop the current generation
        self.last_stats: GenerationStats | None = None
        self.steps = 0  # forward steps, for the PIPELINE_FAULT test hook
        self.head_share_rows = 0  # vocabulary rows the last rank holds (engine.HeadSplit)
        self.head_split = None  # the engine's HeadSplit, kept from one batch to the next

    def _forward(self, tokens: list[int], want_logits: bool) -> mx.array | None:
        if FAULT:
            self.steps += 1
            _injected_fault(0, self.steps)
        ring = self.ring
        progress = ring.progress if ring is not None and ring.sending else None
        h = self.stage.forward(self.stage.embed(mx.array([tokens])), progress=progress)
        self.fed.extend(tokens)
        if self.ring is None:
            if want_logits:
                return self.stage.logits(h)
            mx.eval([c.state for c in self.stage.caches])
            return None
        mx.eval(h)
        self.ring.send(Message(OP_FORWARD, flags=FLAG_RETURN if want_logits else 0, h=h))
        if not want_logits:
            return None
        return self.stage.logits(self.ring.recv().h)

    def _reusable_prefix(self, prompt: list[int]) -> int:
        keep = min(_common_prefix(self.fed, prompt), len(prompt) - 1)
        window = self.stage.min_window
        if keep < len(self.fed) and window is not None and len(self.fed) >= window:
            return 0  # a full sliding-window cache cannot rewind
        return keep

    def generate(self, prompt: list[int], sampling: Sampling) -> Iterator[tuple[int, str]]:
        """Yield (token, text segment) as tokens come; stats land in `self.last_stats`."""
        check_prompt(prompt, self.context)
        keep = self._reusable_prefix(prompt)
        if self.ring is not None:
            send_request(self.comm, {"op": "run", "keep": keep, "tokens": prompt,
                                     "sampling": asdict(sampling)})
        self.stage.trim_to(keep)
        self.fed = self.fed[:keep]
        stats = GenerationStats(prompt_tokens=len(prompt) - keep, cached_tokens=keep)
        self.last_stats = stats
        sampler = make_sampler(sampling.temp, sampling.top_p, sampling.min_p)
        if sampling.seed is not None:
            mx.random.seed(sampling.seed)
        eos = set() if sampling.ignore_eos else set(self.tokenizer.eos_token_ids)
        detok = self.tokenizer.detokenizer
        detok.reset()
        self.interrupted = False
        start = time.perf_counter()
        todo = prompt[keep:]
        try:
            # Like mlx-lm: prefill all but the last prompt token, which starts decoding.
            for i in range(0, len(todo) - 1, self.prefill_chunk):
                self._forward(todo[i : min(i + self.prefill_chunk, len(todo) - 1)], False)
            token, first = todo[-1], None
            stats.finish_reason = "length"
            while stats.generation_tokens < sampling.max_tokens:
                logits = self._forward([token], True)  # [1, V]
                logprobs = logits - mx.logsumexp(logits, keepdims=True)
                token = sampler(logprobs).item()
                if first is None:
                    first = time.perf_counter()
                    stats.ttft_s = first - start
                stats.generation_tokens += 1
                stats.tokens.append(token)
                if token in eos:
                    stats.finish_reason = "stop"
                    break
                detok.add_token(token)
                yield token, detok.last_segment
                if self.interrupted:
                    stats.finish_reason = "interrupted"
                    break
        finally:
            if self.ring is not None:
                self.ring.send(Message(OP_END))
        detok.finalize()
        tail = detok.last_segment  # reading it moves the offset on: read it once
        if tail:
            yield -1, tail
        end = time.perf_counter()
        stats.prompt_tps = stats.prompt_tokens / stats.ttft_s if stats.ttft_s else 0.0
        if stats.generation_tokens > 1:
            stats.generation_tps = (stats.generation_tokens - 1) / (end - first)

    def reset(self) -> None:
        """Forget the conversation; the next request clears every rank's cache (keep=0)."""
        self.fed = []

    def rank_stats(self) -> list[dict]:
        mine = rank_stats(self.stage, self.ring, self.weight_bytes)
        if self.ring is None:
            return [mine]
        send_request(self.comm, {"op": "stats"})
        return gather_stats(self.comm, mine)

    def shutdown(self) -> None:
        if self.ring is not None:
            send_request(self.comm, {"op": "quit"})
            self.ring.close()
