"""The shared head: the last stage computes the first rows of every batched decode step's
logits, rank 0 the rest, and the two parts combine into exactly the tokens of one head.

mlx-lm's greedy token is the argmax of logits - c, c = logsumexp(logits), computed and
rounded in the logits' dtype. Rounding can merge the maximum with a logit just below it, and
then the lower index wins; in bfloat16 about 4% of SmolLM2's rows have a logit that close
below the maximum's index. So for greedy rows each part of the head sends a summary per row
(part_summary): its largest logits within merge_tolerance of its maximum (at most TOP_K,
values and indices, exact in float64) and, for 16-bit logits, the float32 logsumexp of its
share. combine_tops merges the two summaries and decides such a row by rounding x - c for
those few logits and every value c can take given the logsumexp of the two shares
(error_bound). A row that cannot be decided that way takes the exact path (the whole head on
rank 0): its close logits overflowed TOP_K, or the values c may take pick different tokens,
or the logits are float32 (no logsumexp is sent: close there means within about 2e-6).
HeadSplit moves the cut between the two parts as the job runs, so that both stages are busy
for as long.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from pipeline.model.stage import Stage
from pipeline.wire.protocol import Flag, Message

TOP_K = 8  # candidates per row and part: SmolLM2 in bfloat16 has at most 5 within tolerance
MAX_C = 4  # values of c tried for a row; more: the exact path
LSE_DTYPES = (mx.bfloat16, mx.float16)  # logits whose part summaries carry a logsumexp
# The relative error allowed for each exp in MLX's float32 logsumexp kernels (CPU: a
# polynomial, a few ulps; Metal: fast::exp, and the rescaling of running sums): ample.
EXP_ERROR = 2.0**-12
_U = 2.0**-24  # float32's unit roundoff

# Columns of a part summary (float64 [B, SUMMARY_COLS]; -inf values and -1 indices pad)
LSE, FLOOR, VALUES = 0, 1, 2  # FLOOR: every logit not sent is below it
INDICES = VALUES + TOP_K
SUMMARY_COLS = INDICES + TOP_K


def merge_tolerance(dtype, vocab: int, top):
    """How far below a row's maximum `top` (a number or an array) a logit must lie for its
    log-probability never to round to the maximum's.

    Both are x - c rounded in the logits' dtype, c the rounded logsumexp: c - top is at most
    log V plus c's own rounding (eps |c|), and two values that round together lie within one
    ulp of each other, at most eps |x - c|. This is twice the bound that follows."""
    eps = float(mx.finfo(dtype).eps)
    return 2 * eps * (math.log(vocab) + 2 + eps * np.abs(top))


def error_bound(vocab: int, lse: float) -> float:
    """How far the logsumexp assembled from two parts' float32 logsumexps, and the float32
    one mlx computes over the whole row before rounding it to the logits' dtype, may each be
    from the exact value, summed. Each is a float32 sum of at most `vocab` positive terms, in
    whatever order: off by (vocab - 1) u of the sum at most, by EXP_ERROR for the exps, and by
    a few ulps for log and the final addition."""
    one = 1.01 * ((vocab - 1) * _U + EXP_ERROR) + 4 * _U * (abs(lse) + math.log(vocab))
    return 2 * one


def _tops(logits: mx.array, vocab: int):
    """Per row of logits: [B, C]: its maximum, the index of the first maximum, the threshold
    (float32, rounded down from max - merge_tolerance) and how many logits reach it."""
    top = mx.max(logits, axis=-1)
    index = mx.argmax(logits, axis=-1)
    mx.eval(top, index)
    top = np.array(top.astype(mx.float32), np.float64)
    floor = top - merge_tolerance(logits.dtype, vocab, top)
    floor32 = floor.astype(np.float32)
    floor32 = np.where(floor32 > floor, np.nextafter(floor32, -np.inf), floor32)
    close = mx.sum(logits >= mx.array(floor32)[:, None], axis=-1)
    return top, np.array(index, np.int64), floor32, np.array(close)


def greedy_rows(logits: mx.array) -> tuple[list[int], list[bool]]:
    """argmax of each row of logits: [B, V], without the logsumexp (0.4 ms a row on one CPU
    core for 32k tokens), and whether a row needs the exact path instead: another logit lies
    within merge_tolerance of its maximum (the exact path there is cheap: the logits are
    at hand)."""
    _, index, _, close = _tops(logits, logits.shape[-1])
    return index.tolist(), [c > 1 for c in close.tolist()]


def part_lse(logits: mx.array) -> np.ndarray:
    """logsumexp of each row of logits: [B, C], accumulated and returned in float32."""
    return np.array(mx.logsumexp(logits.astype(mx.float32), axis=-1), np.float64)


def part_summary(logits: mx.array, vocab: int, lse: bool) -> np.ndarray:
    """Per row of logits: [B, C] (a part of a vocabulary of `vocab`): the logits within
    merge_tolerance of the row's maximum, largest first (ties: lower index first), at most
    TOP_K of them, the floor below which every logit not sent lies, and with `lse` the
    logsumexp of the row in float32; float64 [B, SUMMARY_COLS]."""
    top, index, floor32, close = _tops(logits, vocab)
    out = np.full((len(top), SUMMARY_COLS), -np.inf)
    out[:, INDICES:] = -1
    out[:, LSE] = np.nan
    out[:, FLOOR] = floor32
    out[:, VALUES], out[:, INDICES] = top, index
    if lse:
        out[:, LSE] = part_lse(logits)
    rows = np.flatnonzero(close > 1)
    if len(rows):  # a few rows: their candidates, in numpy
        sub = np.array(logits[mx.array(rows)].astype(mx.float32), np.float64)
        for row, values in zip(rows, sub):
            idx = np.flatnonzero(values >= floor32[row])
            order = np.lexsort((idx, -values[idx]))[:TOP_K]
            k = len(order)
            out[row, VALUES : VALUES + k] = values[idx[order]]
            out[row, INDICES : INDICES + k] = idx[order]
            if len(idx) > TOP_K:  # the ones left out are at most the last one sent
                out[row, FLOOR] = np.nextafter(values[idx[order[-1]]], np.inf)
    return out


def _order(bits: int) -> int:
    """A 16-bit float's bits -> an integer in the floats' order (adjacent floats: +1)."""
    return bits if bits < 0x8000 else 0x8000 - bits


def _values_between(lo: float, hi: float, dtype) -> mx.array | None:
    """Every value of the 16-bit `dtype` that a float32 number in [lo, hi] rounds to, or None
    when there are more than MAX_C."""
    ends = mx.array(np.array([lo, hi], np.float32)).astype(dtype).view(mx.uint16).tolist()
    a, b = (_order(int(u)) for u in ends)
    if b - a + 1 > MAX_C:
        return None
    bits = [k if k >= 0 else 0x8000 - k for k in range(a, b + 1)]
    return mx.array(bits, mx.uint16).view(dtype)


def rounded_argmax(values: np.ndarray, index: np.ndarray, lse: float, dtype, vocab: int
                   ) -> int | None:
    """mlx-lm's greedy token for a row whose logits within merge_tolerance of the maximum are
    `values` at `index`, and whose logsumexp (before rounding to `dtype`) is `lse` up to
    error_bound: the first index whose logit - c, rounded in `dtype`, is the largest, the
    same for every value c may take; else None."""
    if not math.isfinite(lse):
        return None
    delta = error_bound(vocab, lse)
    cs = _values_between(lse - delta, lse + delta, dtype)
    if cs is None:
        return None
    x = mx.array(values.astype(np.float32)).astype(dtype)
    logprobs = np.array((x[None, :] - cs[:, None]).astype(mx.float32))  # [C, n], as mlx-lm
    picks = {int(index[lp == lp.max()].min()) for lp in logprobs}
    return picks.pop() if len(picks) == 1 else None


def combine_tops(first: np.ndarray, rest: np.ndarray, cut: int, dtype, vocab: int,
                 rest_lse: Callable[[list[int]], np.ndarray] | None = None
                 ) -> tuple[list[int], list[bool]]:
    """mlx-lm's greedy tokens for logits split in two, and whether a row needs the exact path
    instead: `first` summarizes vocabulary [0, cut), `rest` [cut, V) (part_summary rows of
    logits of `dtype`). rest_lse(rows): the logsumexp of those rows of `rest`, asked for only
    when a row needs it (rank 0 summarizes its own part without)."""
    tokens, exact, undecided = [], [], []
    for row in range(len(first)):
        index = np.concatenate([first[row, INDICES:], rest[row, INDICES:]])
        sent = index >= 0
        values = np.concatenate([first[row, VALUES:INDICES], rest[row, VALUES:INDICES]])[sent]
        index = (index + np.repeat([0, cut], TOP_K))[sent].astype(np.int64)
        top = values.max()
        best = int(index[values == top].min())  # the first maximum, as argmax
        floor = top - merge_tolerance(dtype, vocab, top)
        tokens.append(best)
        # a part's logits not sent lie below its FLOOR: all of them out of reach, or unknown
        exact.append(bool(max(first[row, FLOOR], rest[row, FLOOR]) > floor))
        near = values >= floor
        if not exact[-1] and np.any(near & (index < best)):  # rounding may pick a lower index
            if dtype in LSE_DTYPES:
                undecided.append((row, values[near], index[near]))
            else:  # no logsumexp sent (float32, where close means within about 2e-6)
                exact[-1] = True
    if undecided:
        rows = [row for row, _, _ in undecided]
        lse = rest[rows, LSE] if rest_lse is None else rest_lse(rows)
        for (row, values, index), lse_rest in zip(undecided, lse):
            token = rounded_argmax(values, index, float(np.logaddexp(first[row, LSE], lse_rest)),
                                   dtype, vocab)
            if token is None:
                exact[row] = True
            else:
                tokens[row] = token
    return tokens, exact


@dataclass
class SummaryCounts:
    """Greedy decode steps whose head came in two summarized parts (steps, rows), and how
    many took the exact path (rank 0 then computes the whole head of the step)."""

    steps: int = 0
    rows: int = 0
    exact_steps: int = 0
    exact_rows: int = 0

    def add(self, exact: list[bool]) -> None:
        self.steps += 1
        self.rows += len(exact)
        self.exact_steps += any(exact)
        self.exact_rows += sum(exact)


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
    or their part_summary when every row is greedy. `between`: see Stage.head_logits."""
    if stage.head_share is None:
        raise RuntimeError("asked for a share of the head but holds none")
    part = stage.head_logits(stage.final_norm(msg.h), 0, msg.head_rows, between=between)
    if msg.flags & Flag.HEAD:
        msg.part = part_summary(part, stage.args.vocab_size, lse=part.dtype in LSE_DTYPES)
    else:
        mx.eval(part)
        msg.part = part
