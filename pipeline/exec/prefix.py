"""Rank 0's index of cached prompt prefixes: which token sequences have their KV caches kept
on every rank (as entries of CacheTable.store), how big they are, and which to drop.

Plain data and pure decisions: the index never touches a cache. The engine turns its answers
into ring messages (Op.OPEN with [entry, keep, length], Op.SAVE, Op.DROP), which every rank
applies in the same order, so each rank's store holds exactly the entries listed here.

A prompt reuses the entry that gives it the most tokens: the common prefix of the two, cut
back to `keep` tokens where the caches allow it (Stage.can_keep: not a recurrent state, not a
sliding window that has wrapped); where they do not, only an entry that is a whole prefix of
the prompt (an exact snapshot) is used. At least the prompt's last token is always computed,
since its logits start the answer.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np

DEFAULT_PROMPT_CACHE_BYTES = 2 * 2**30  # per rank; serve and batch (--prompt-cache-bytes)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens two int arrays share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


@dataclass
class Entry:
    id: int
    tokens: np.ndarray  # int64 token ids whose keys/values the entry holds, in order
    nbytes: int = 0
    pins: int = 0  # sequences being opened from it (OPEN sent, JOIN not yet): not evicted

    def __len__(self) -> int:
        return len(self.tokens)


class PrefixIndex:
    """Entries in least-recently-used order under a byte budget.

    `can_keep(keep, length)`: whether caches holding `length` tokens may be cut back to their
    first `keep` (the model's rule, Stage.can_keep)."""

    def __init__(self, budget_bytes: int, can_keep: Callable[[int, int], bool]):
        self.budget, self.can_keep = budget_bytes, can_keep
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # oldest use first
        self._ids = itertools.count(1)
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self.cached_tokens = 0  # prompt tokens not prefilled thanks to a hit, in all

    def _usable(self, entry: Entry, keep: int) -> int:
        """`keep` if the entry can give that many tokens, else 0."""
        return keep if keep == len(entry) or self.can_keep(keep, len(entry)) else 0

    def lookup(self, prompt: list[int]) -> tuple[Entry | None, int]:
        """(entry, keep): the entry whose first `keep` tokens start the prompt, the most such
        tokens, at most len(prompt) - 1; (None, 0) when none gives any. Counts a hit or miss
        and makes the entry the most recently used."""
        ids = np.asarray(prompt, dtype=np.int64)
        best, best_keep = None, 0
        for entry in self.entries.values():
            keep = self._usable(entry, min(common_prefix(entry.tokens, ids), len(ids) - 1))
            if keep > best_keep:
                best, best_keep = entry, keep
        if best is None:
            self.misses += 1
            return None, 0
        self.hits += 1
        self.cached_tokens += best_keep
        self.entries.move_to_end(best.id)
        return best, best_keep

    def pin(self, entry_id: int) -> None:
        self.entries[entry_id].pins += 1

    def unpin(self, entry_id: int) -> None:
        if entry_id in self.entries:
            self.entries[entry_id].pins -= 1

    def covered(self, tokens: list[int]) -> bool:
        """Whether an entry already gives every one of these tokens (so saving them again
        would only take memory); that entry counts as used."""
        ids = np.asarray(tokens, dtype=np.int64)
        for entry in self.entries.values():
            if len(entry) >= len(ids) and common_prefix(entry.tokens, ids) == len(ids) and (
                    self._usable(entry, len(ids))):
                self.entries.move_to_end(entry.id)
                return True
        return False

    def new_id(self) -> int:
        return next(self._ids)

    def add(self, entry_id: int, tokens: list[int], nbytes: int) -> list[int]:
        """Record entry `entry_id` (already saved on every rank); returns the ids to drop:
        entries it makes useless (whole prefixes of it that it can stand in for), then the
        least recently used until the rest fits the budget; the new entry itself when it
        alone does not fit."""
        new = Entry(entry_id, np.asarray(tokens, dtype=np.int64), nbytes)
        if nbytes > self.budget:
            return [entry_id]
        drop = [e.id for e in self.entries.values()
                if not e.pins and len(e) <= len(new) and self.can_keep(len(e), len(new))
                and common_prefix(e.tokens, new.tokens) == len(e)]
        for old in drop:
            self._remove(old)
        self.entries[entry_id] = new
        self.bytes += nbytes
        for entry in list(self.entries.values()):
            if self.bytes <= self.budget:
                break
            if entry.pins or entry.id == new.id:
                continue
            self._remove(entry.id)
            self.evictions += 1
            drop.append(entry.id)
        return drop

    def _remove(self, entry_id: int) -> None:
        self.bytes -= self.entries.pop(entry_id).nbytes

    def stats(self) -> dict:
        """Figures for /stats (plain counters: safe to read from another thread)."""
        return {"budget_bytes": self.budget, "bytes": self.bytes, "entries": len(self.entries),
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "cached_tokens": self.cached_tokens}
