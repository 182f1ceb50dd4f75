"""One rank's share of the model: a contiguous slice of mlx-lm transformer blocks.

The blocks, caches, norms and heads are mlx-lm's own modules, and so is the code between
them: the model's own forward runs this rank's blocks (shell.py), building masks, sliding
windows and per-layer-type choices as mlx-lm does. This file owns what a rank holds (its
caches, the embedding, final norm and head on rank 0) and the head's products.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.models.cache import KVCache

from pipeline.model.shell import Shell


# On a CPU with OpenBLAS, `x @ W.T` for a few rows of x runs far below the machine's speed
# (measured, 1 core, W 1024x1024: 35 GFLOP/s at 16 rows), while the same product taken the
# other way round, (W @ x.T).T, runs at 76: the long dimension of W becomes the BLAS's M.
# Whether both sum each dot product in the same order depends on the BLAS's kernels, so each
# shape is checked on the machine first (host/rows_first.py) and switched only where the results
# are bitwise equal: greedy tokens still equal mlx-lm's.
# Decode steps and prefill chunks up to this many rows use it; larger ones gain nothing.
ROWS_FIRST_MAX_ROWS = 256
HEAD_PIECE_ROWS = 8192  # vocabulary rows per product when the head is computed in pieces


class RowsFirstLinear(nn.Linear):
    """nn.Linear that multiplies few rows as (W @ x.T).T (same parameters, same results)."""

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if rows > ROWS_FIRST_MAX_ROWS:
            return super().__call__(x)
        xt = x.reshape(rows, x.shape[-1]).T
        if "bias" in self:
            y = mx.addmm(self["bias"][:, None], self["weight"], xt)
        else:
            y = self["weight"] @ xt
        return y.T.reshape(*x.shape[:-1], y.shape[0])


class RowsFirstShardedToAll(nn.Module):
    """mlx's ShardedToAllLinear (a tensor-parallel group's output projection: this rank's
    input columns, then the group's sum) with the product taken as RowsFirstLinear does."""

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if rows > ROWS_FIRST_MAX_ROWS:
            y = x @ self["weight"].T
        else:
            y = (self["weight"] @ x.reshape(rows, x.shape[-1]).T).T.reshape(
                *x.shape[:-1], self["weight"].shape[0])
        y = mx.distributed.all_sum(y, group=self.group)
        return y + self["bias"] if "bias" in self else y


def cache_batch_problem(caches: list) -> str | None:
    """Why caches of these kinds cannot join a micro-batch (None: they can). mlx-lm's batch
    caches come from `merge` (KVCache -> BatchKVCache, RotatingKVCache ->
    BatchRotatingKVCache, ArraysCache and CacheList merge themselves)."""
    for cache in caches:
        if not hasattr(type(cache), "merge"):
            return (f"mlx-lm's {type(cache).__name__} has no batched form (no merge): "
                    f"batch, serve and bench need one")
        problem = cache_batch_problem(list(getattr(cache, "caches", ())))
        if problem:
            return problem
    return None


@dataclass
class Stage:
    """Layers [start, end) of a model, plus embedding/norm/head on the first (= last) stage.

    Rank 0 is both the first stage (embedding + its layers) and the last (final norm + head):
    hidden states go round the ring 0 -> 1 -> ... -> N-1 -> 0.
    """

    args: object
    model_type: str
    layer_range: tuple[int, int]
    layers: list
    embed_tokens: nn.Module | None = None
    norm: nn.Module | None = None
    lm_head: nn.Module | None = None  # None with an embedding: tied head
    cache_factory: object = None  # () -> list of caches for the whole model, or None
    caches: list = field(default_factory=list)
    loaded_names: list = field(default_factory=list)  # parameter names materialized here
    min_window: int | None = None  # smallest sliding window in the whole model, if any
    rewindable: bool = True  # every cache kind of the model can drop its last tokens
    compute_s: float = 0.0  # time spent running this stage (for per-stage figures)
    rows_first: bool = False  # tied head as (E @ h.T).T too (see RowsFirstLinear)
    # The last rank of a ring of 2 or more may hold the first rows of the head (the
    # vocabulary's first `head_share.weight.shape[0]` entries) and the final norm, to compute
    # that part of each decode step's logits (see engine.py: the shared head).
    head_share: nn.Module | None = None
    head_share_name: str = ""  # its checkpoint prefix: "lm_head" or "model.embed_tokens"
    shell: Shell | None = None  # the model's own forward over these layers (shell.py)
    modules: dict = field(default_factory=dict)  # checkpoint prefix -> module held here
    length: int = 0  # tokens in the conversation's caches
    # A tensor-parallel stage 0: the embedding and head split by vocabulary rows across the
    # group (model/tensor.py), and on its leader the call that tells the others to compute
    # their part of the head alongside (exec/driver.py).
    vocab: object = None
    mirror: object = None
    tp: int = 1  # ranks in this stage's tensor-parallel group

    @property
    def has_head(self) -> bool:
        return self.embed_tokens is not None

    def make_caches(self) -> list:
        start, end = self.layer_range
        if self.cache_factory is not None:
            return self.cache_factory()[start:end]
        return [KVCache() for _ in range(end - start)]

    @property
    def batch_problem(self) -> str | None:
        """Why this model's caches cannot be batched (None: they can)."""
        if self.cache_factory is None:
            return None
        return cache_batch_problem(self.cache_factory())

    def reset(self) -> None:
        self.caches = self.make_caches()
        self.length = 0

    @property
    def offset(self) -> int:
        return self.length

    def can_keep(self, keep: int, length: int) -> bool:
        """Whether caches holding `length` tokens can drop all but the first `keep`: not a
        recurrent state (ArraysCache), nor a sliding window that has already wrapped."""
        if keep >= length:
            return True
        if not self.rewindable:
            return False
        return self.min_window is None or length < self.min_window

    def trim_to(self, keep: int) -> None:
        """Keep the first `keep` cached tokens (0 clears the caches)."""
        if not self.caches or keep == 0:
            self.reset()
            return
        excess = self.length - keep
        if excess < 0:
            raise ValueError(f"cannot keep {keep} tokens, cache holds {self.length}")
        if excess and all(c.is_trimmable() for c in self.caches):
            for c in self.caches:
                c.trim(excess)
            self.length = keep
        elif excess:
            self.reset()  # a recurrent or full rotating cache cannot rewind
            raise ValueError("cache cannot be trimmed")

    def embed(self, tokens: mx.array) -> mx.array:
        """tokens: [B, L] -> h: [B, L, D], as the model feeds its first block (any scaling
        the model applies to its embeddings included)."""
        return self.shell.embed(tokens)

    def forward(self, h: mx.array, caches: list | None = None, progress=None) -> mx.array:
        """Run this stage's layers on h: [B, L, D], updating `caches` (default: the
        conversation's own caches). `progress`, if given, is called after each layer (its
        output evaluated): the ring uses it to keep earlier sends moving (see Ring.progress)."""
        if caches is None:
            if not self.caches:
                self.reset()
            caches = self.caches
            self.length += h.shape[1]
        return self.shell.forward(h, caches, progress)

    def final_norm(self, h: mx.array) -> mx.array:
        """Final norm of the last position: h: [B, L, D] -> [B, D]."""
        h = h[:, -1:, :]
        return (h if self.norm is None else self.norm(h))[:, 0, :]

    @property
    def head(self) -> nn.Module:
        """The module whose rows are the vocabulary (the embedding when the head is tied)."""
        if self.head_share is not None:
            return self.head_share
        return self.lm_head if self.lm_head is not None else self.embed_tokens

    def logits(self, h: mx.array, between=None) -> mx.array:
        """Final norm and head on the last position: h: [B, L, D] -> [B, V]."""
        return self.head_logits(self.final_norm(h), between=between)

    def head_logits(self, hn: mx.array, lo: int = 0, hi: int | None = None,
                    between=None) -> mx.array:
        """Logits of vocabulary entries [lo, hi) for normed rows hn: [B, D] -> [B, hi - lo].

        A row slice of the head's parameters goes through the same product as the whole
        head, so each logit is summed in the same order (bitwise equal on the CPU, checked in
        tests/test_shared_head.py). With `between`, the rows are computed HEAD_PIECE_ROWS at a
        time, each evaluated and followed by a call to between() (the ring's progress: the
        head is as long as several layers, too long to leave a send unattended)."""
        if self.vocab is not None:  # split across the group: every rank takes part, now
            if self.mirror is not None:
                self.mirror(hn)
            logits = self.vocab.logits(hn)
            logits = logits if lo == 0 and hi is None else logits[:, lo:hi]
            mx.eval(logits)  # the group's collectives run in the same order on every rank
            return logits
        hi = self.head.weight.shape[0] if hi is None else hi
        if between is None or hi - lo <= HEAD_PIECE_ROWS:
            return self._head_slice(hn, lo, hi)
        pieces = []
        for start in range(lo, hi, HEAD_PIECE_ROWS):
            pieces.append(self._head_slice(hn, start, min(hi, start + HEAD_PIECE_ROWS)))
            mx.eval(pieces[-1])
            between()
        return mx.concatenate(pieces, axis=-1)

    def _head_slice(self, hn: mx.array, lo: int, hi: int) -> mx.array:
        module = self.head
        rows = module.weight.shape[0]
        if lo != 0 or (hi is not None and hi != rows):
            module = copy.copy(module)  # same class and settings, sliced parameters
            module.update(tree_map(lambda a: a[lo:hi], module.parameters()))
        if not isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
            return module(hn)  # a separate head: (Quantized|RowsFirst)Linear
        if (self.rows_first and type(module) is nn.Embedding
                and hn.shape[0] <= ROWS_FIRST_MAX_ROWS):
            return (module.weight @ hn.T).T
        return module.as_linear(hn)
