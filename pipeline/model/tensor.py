"""A stage's layers split across a tensor-parallel group of ranks.

The blocks are split by mlx-lm's own `shard()` for the architecture (Megatron-style: the
query/key/value and gate/up projections by output columns, the output and down projections
by input columns, so that each block all-reduces twice; a mixture of experts splits every
expert's matrices the same way). Its all-reduces are MLX ops (mx.distributed.all_sum on the
stage's group), inside the graph: on a Mac GPU a layer does not stop for a host round trip.

Stage 0's embedding and head are split by vocabulary rows (VocabShard): a rank holds
ceil(V / n) rows; a token's embedding is the one rank's row that holds it, summed with the
others' zeros (exact); the logits are each rank's rows' products, gathered (each logit is the
same dot product as with the whole head, so bitwise the same).

Sums over a split dimension run in another order than in one process, so hidden states (and
the logits computed from them) can differ in the last bits; tests/test_tensor.py bounds it.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from pipeline.model.shell import Layout, module_at


def rows_copy(module: nn.Module, lo: int, hi: int) -> nn.Module:
    """The module with rows [lo, hi) of every parameter, in buffers of their own (a slice
    would keep the whole loaded tensor alive behind it)."""
    module.update(tree_map(lambda a: a[lo:hi] * mx.array(1, a.dtype), module.parameters()))
    return module


def shard_blocks(model: nn.Module, layout: Layout, layer_range: tuple[int, int],
                 group) -> None:
    """Split blocks [start, end) across `group` with the model's own shard(), in place (the
    parameters stay lazy: only this rank's parts are ever read)."""
    inner = module_at(model, layout.inner)
    blocks = inner["layers"]
    inner["layers"] = blocks[layer_range[0]:layer_range[1]]  # shard() walks `layers`
    try:
        model.shard(group)
    finally:
        inner["layers"] = blocks


class VocabShard:
    """Stage 0's embedding (and head, when not tied) split by vocabulary rows over `group`."""

    def __init__(self, embedding: nn.Module, head: nn.Module | None, vocab: int, group):
        n, r = group.size(), group.rank()
        self.group, self.vocab = group, vocab
        self.rows = -(-vocab // n)  # each rank's share, padded: all_gather wants equal parts
        self.lo = min(vocab, r * self.rows)
        self.held = min(vocab, self.lo + self.rows) - self.lo
        self.embedding = rows_copy(embedding, self.lo, self.lo + self.held)
        self.head = None if head is None else rows_copy(head, self.lo, self.lo + self.held)
        self.rows_first = False

    def __call__(self, tokens: mx.array) -> mx.array:
        """The embedding of tokens: [B, L] -> [B, L, D], the same on every rank."""
        local = tokens - self.lo
        inside = (local >= 0) & (local < self.held)
        rows = self.embedding(mx.where(inside, local, 0))
        rows = mx.where(inside[..., None], rows, mx.zeros((), rows.dtype))
        return mx.distributed.all_sum(rows, group=self.group)

    def __getattr__(self, attr):  # a shell may read its embedding's settings
        return getattr(self.__dict__["embedding"], attr)

    def logits(self, hn: mx.array) -> mx.array:
        """Normed rows hn: [B, D] -> logits [B, V], gathered from every rank's rows."""
        if self.head is not None:
            part = self.head(hn)
        elif self.rows_first and type(self.embedding) is nn.Embedding:
            part = (self.embedding.weight @ hn.T).T  # see stage.RowsFirstLinear
        else:
            part = self.embedding.as_linear(hn)
        if self.held < self.rows:
            part = mx.pad(part, [(0, 0), (0, self.rows - self.held)])
        full = mx.distributed.all_gather(part.T, group=self.group)  # [n * rows, B]
        return full.T[:, : self.vocab]
