"""The shared head: the last stage computes the first rows of every batched decode step's
logits, rank 0 the rest, and the two parts combine into exactly the tokens of one head.

For greedy rows the last stage sends only each row's maximum, its index and a near-tie count
(top_summary); rank 0 combines them with its own part (combine_tops); rows whose best two
logits lie within rounding of each other take the exact path on rank 0. HeadSplit moves the
cut between the two parts as the job runs, so that both stages are busy for as long.
"""

from __future__ import annotations

import math
import statistics

import mlx.core as mx
import numpy as np

from pipeline.model.stage import Stage
from pipeline.wire.protocol import Flag, Message


def near_tie_tolerance(dtype, vocab: int) -> float:
    """How close to a row's maximum another logit must come for the argmax of the logits to
    possibly differ from mlx-lm's argmax of the log-probabilities (see greedy_rows)."""
    return 8 * float(mx.finfo(dtype).eps) * (2 * math.log(vocab) + 1)


def top_summary(logits: mx.array, vocab: int) -> np.ndarray:
    """Per row of logits: [B, C] (part of a vocabulary of `vocab`): its maximum, the index of
    the first maximum and how many logits lie within the near-tie tolerance of it, as float64
    [B, 3] (exact for every float dtype)."""
    top = mx.max(logits, axis=-1, keepdims=True)
    close = mx.sum(logits >= top - near_tie_tolerance(logits.dtype, vocab), axis=-1)
    index = mx.argmax(logits, axis=-1)
    mx.eval(top, close, index)
    return np.stack([np.array(top[:, 0].astype(mx.float32), np.float64),
                     np.array(index, np.float64), np.array(close, np.float64)], axis=1)


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


def head_share_part(stage: Stage, msg: Message, between=None) -> None:
    """The last stage's share of a decode step's head: logits of vocabulary [0, head_rows),
    or their per-row summary (max, argmax, near-tie count) when every row is greedy. `between`:
    see Stage.head_logits."""
    if stage.head_share is None:
        raise RuntimeError("asked for a share of the head but holds none")
    part = stage.head_logits(stage.final_norm(msg.h), 0, msg.head_rows, between=between)
    if msg.flags & Flag.HEAD:
        msg.part = top_summary(part, stage.args.vocab_size)
    else:
        mx.eval(part)
        msg.part = part
