"""Ranks 1..N-1: the worker loop. Wait for rank 0's request, then run the ring messages that
belong to it (layers for FORWARD, cache bookkeeping for control ops) until END.

A worker receives only from the previous rank and sends only to the next, in arrival order;
control ops travel down the ring ahead of the activations that depend on them, so every rank
sees the same sequence and its cache table stays like rank 0's.
"""

from __future__ import annotations

import copy
import os
import resource
import signal
import socket
import sys
import time

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from pipeline.exec.head import head_share_part
from pipeline.model.stage import Stage
from pipeline.wire.protocol import Batch, Flag, Message, Op, Quit, Run, Stats

# Test hook (tests/test_faults.py): PIPELINE_FAULT=rank1:step5 makes rank 1 raise at its 5th
# forward step, to check that an exception on any rank ends the whole job. Unset: no effect.
FAULT = os.environ.get("PIPELINE_FAULT", "")


def injected_fault(rank: int, step: int) -> None:
    if FAULT == f"rank{rank}:step{step}":
        raise RuntimeError(f"fault injected by PIPELINE_FAULT={FAULT}")


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def rank_stats(stage: Stage, ring, weight_bytes: int) -> dict:
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


def _own_buffers(cache) -> None:
    """Give a cache extracted from a batch its own arrays: a view (ArraysCache.extract slices
    rows) would keep the whole batch's buffers alive in the prompt cache."""
    if hasattr(cache, "caches"):  # CacheList: its parts (its state setter rebuilds them)
        for part in cache.caches:
            _own_buffers(part)
        return
    cache.state = tree_map(lambda a: mx.contiguous(a) if isinstance(a, mx.array) else a,
                           cache.state)


def used_bytes(cache) -> int:
    """A cache's bytes without the unused tail of its allocation (a KVCache grows 256 tokens
    at a time): about what an entry saved from it takes."""
    if hasattr(cache, "caches"):  # CacheList
        return sum(used_bytes(part) for part in cache.caches)
    keys, offset = getattr(cache, "keys", None), getattr(cache, "offset", None)
    if isinstance(keys, mx.array) and isinstance(offset, int) and keys.shape[2]:
        return cache.nbytes * min(offset, keys.shape[2]) // keys.shape[2]
    return cache.nbytes


class CacheTable:
    """A rank's KV caches by id: 0 is the conversation (REPL, one-shot); other ids are batch
    micro-batches and sequences being prefilled before they join one. Every rank applies the
    same control messages in the same (ring) order, so the tables stay alike.

    `store` holds the prefix cache's entries (exec/prefix.py): this rank's share of the caches
    of a finished sequence, by entry id. It outlives a request (END clears only `batches`);
    rank 0's PrefixIndex says which entries exist."""

    def __init__(self, stage: Stage):
        self.stage, self.batches = stage, {}
        self.store: dict[int, list] = {}

    def get(self, mb: int) -> list | None:
        return None if mb == 0 else self.batches[mb]

    def apply(self, msg: Message) -> None:
        if msg.op == Op.OPEN:
            self.batches[msg.mb] = (self._copy(*msg.payload) if msg.payload
                                    else self.stage.make_caches())
        elif msg.op == Op.JOIN:
            parts = [self.batches.pop(i) for i in msg.payload]
            # mlx-lm's caches merge into their batch kind (KVCache -> BatchKVCache, ...)
            joined = [parts[0][i].merge([p[i] for p in parts]) for i in range(len(parts[0]))]
            if msg.mb in self.batches:
                for mine, new in zip(self.batches[msg.mb], joined):
                    mine.extend(new)
            else:
                self.batches[msg.mb] = joined
        elif msg.op == Op.FILTER:
            if msg.payload:
                keep = mx.array(msg.payload)
                for cache in self.batches[msg.mb]:
                    cache.filter(keep)
            else:
                del self.batches[msg.mb]
        elif msg.op == Op.TRIM:  # the conversation's rejected proposals (exec/draft.py)
            self.stage.trim_to(self.stage.offset - msg.payload[0])
        elif msg.op == Op.SAVE:
            entry, row = msg.payload[0], msg.payload[1:]
            caches = self.batches[msg.mb]
            if not row:  # a sequence being prefilled: through a batch of one, exact in size
                caches, row = [c.merge([c]) for c in caches], [0]
            # one sequence's caches out of the batch's (BatchKVCache -> KVCache, ...)
            saved = [cache.extract(row[0]) for cache in caches]
            for cache in saved:
                _own_buffers(cache)
            mx.eval([c.state for c in saved])
            self.store[entry] = saved
        elif msg.op == Op.DROP:
            for entry in msg.payload or list(self.store):
                del self.store[entry]

    def _copy(self, entry: int, keep: int, length: int) -> list:
        """Caches for a new sequence: entry `entry` (`length` tokens), cut to `keep` tokens."""
        caches = copy.deepcopy(self.store[entry])  # the entry stays as it is for the next one
        if keep < length:
            if not can_trim_prompt_cache(caches):  # rank 0 asked for what cannot be: say so
                raise RuntimeError(f"prefix-cache entry {entry} cannot be cut from {length} "
                                   f"to {keep} tokens on layers {self.stage.layer_range}")
            trim_prompt_cache(caches, length - keep)
        return caches

    def entry_bytes(self, entry: int) -> int:
        return sum(c.nbytes for c in self.store[entry])

    def clear(self) -> None:
        self.batches.clear()


class Worker:
    """One rank of 1..N-1 over its ring (an MPI Ring, or the in-process ring of the tests)."""

    def __init__(self, ring, stage: Stage, weight_bytes: int = 0, group=None):
        self.ring, self.stage, self.weight_bytes = ring, stage, weight_bytes
        self.group = group  # a tensor-parallel stage's leader: its GroupLink to the others
        self.table = CacheTable(stage)
        self.steps = 0  # forward steps, for the PIPELINE_FAULT test hook

    def run(self) -> None:
        """Serve rank 0's requests until it says Quit."""
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # rank 0's Ctrl-C (see job.INTERRUPTS)
        while True:
            request = self.ring.wait_request()
            if isinstance(request, Quit):
                break
            if isinstance(request, Stats):
                self.ring.reply_stats(rank_stats(self.stage, self.ring, self.weight_bytes))
                continue
            self.begin(request)
            while self.handle(self.ring.recv()):
                pass
        self.ring.close()
        if self.group is not None:
            self.group.close()

    def begin(self, request: Run | Batch) -> None:
        if isinstance(request, Run):
            self.stage.trim_to(request.keep)

    def handle(self, msg: Message) -> bool:
        """Apply one ring message; False once the request is over (END)."""
        ring, last = self.ring, self.ring.is_last_stage
        if self.group is not None:
            self.group.tell(msg)  # the rest of the group computes the same step alongside
        if msg.op == Op.FORWARD:
            if FAULT:
                self.steps += 1
                injected_fault(ring.rank, self.steps)
            start = time.perf_counter()
            h = msg.h if msg.tokens is None else self.stage.embed(msg.tokens)  # stage 0's group
            msg.tokens = None
            msg.h = self.stage.forward(h, self.table.get(msg.mb),
                                       ring.progress if ring.sending else None)
            mx.eval(msg.h)
            if last and msg.flags & (Flag.HEAD | Flag.LOGITS):
                head_share_part(self.stage, msg, ring.progress if ring.sending else None)
            busy = time.perf_counter() - start
            self.stage.compute_s += busy
            if last:
                msg.busy_us = max(1, int(busy * 1e6))  # tells rank 0 how long this step took
            if not last or msg.flags & Flag.RETURN:
                ring.send(msg)
            return True
        if msg.op == Op.HEAD:  # stage 0's group: this rank's part of the head (Stage.head_logits)
            mx.eval(self.stage.head_logits(msg.h[:, 0, :]))
            return True
        if not last:  # control messages go down the ring, not back to 0
            ring.send(msg)
        if msg.op == Op.END:
            self.table.clear()
            return False
        self.table.apply(msg)
        return True
