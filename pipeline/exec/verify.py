"""Speculative decoding's acceptance rule: from one pass over k+1 positions (the current
token and k proposals), which tokens to take. Two modes.

Standard (the default, as mlx-lm, vLLM and llama.cpp do). Greedy: a proposal is kept when it
is the verifier's argmax at its position; the first that is not is replaced by that argmax,
and after k kept proposals the argmax of the last row is a bonus token. Temperature > 0:
position i draws a token from the plain path's processed distribution p (top-p, then min-p,
then the temperature, as Sampler.scores applies them) with the key the plain path would use
for its i-th token from here (Sampler.next_keys). The proposal x is kept when the draw gives
x, which happens with probability p(x); otherwise the token drawn is taken, and given that it
is not x it is distributed as p with x removed and renormalized. That is standard
speculative sampling for a deterministic (one-hot) draft, so the output is distributed as
plain sampling's; with the plain path's random stream it is moreover the same tokens for a
--seed, up to rounding. Rounding: a pass over k+1 positions sums its products in another
order than k+1 passes of one, so the logits may differ in the last bits (measured on a CPU
with OpenBLAS, float32: up to 34 eps x the row's largest |logit|; bitwise equal with MLX's own
kernels, bfloat16 included); where two logits lie that close, the token taken may differ from
plain decoding's, as batching's may.

Exact (--draft-exact): a position is taken only when its token would be the same under any
change of every logit by up to `tolerance` (TOLERANCE_EPS, 7.5x the largest difference
measured): for a greedy row the best log-probability must beat every other by more than twice
that; for a sampled row the same holds for the scores the categorical draw compares
(log-probabilities / temperature + the Gumbel noise of the draw's key), and no top-p or min-p
cut may lie within it of a contender. At the first position that fails, acceptance stops and
nothing is taken from it (the next pass decodes it alone, as the plain path does): the tokens
equal plain decoding's token for token. The margin scales with the dtype's epsilon, so in
16-bit few positions clear it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from pipeline.exec.sampling import Sampler, logprobs_of


def near_tie_tolerance(dtype, vocab: int) -> float:
    """How far rounding in the log-softmax (logits - logsumexp, in the logits' dtype) can move a
    log-probability relative to another: a few ulps of |x - c| <= |x - max| + log V."""
    return 8 * float(mx.finfo(dtype).eps) * (2 * math.log(vocab) + 1)


# How far a verified logit may lie from the plain path's, in units of the logits' dtype's
# epsilon times the row's largest |logit|.
TOLERANCE_EPS = 256
GUMBEL_MAX = 32.0  # |Gumbel noise| stays below this but with probability ~1e-14 per logit


@dataclass
class Verdict:
    tokens: list[int]  # the tokens the plain path would produce from here, in order
    accepted: int  # how many of them are proposals
    near_tie: bool  # stopped at a position whose token might differ from the plain path's


def tolerance(logits: mx.array) -> mx.array:
    """Per row of logits: [L, V], how far each logit may lie from the plain path's: [L]."""
    eps = float(mx.finfo(logits.dtype).eps)
    return TOLERANCE_EPS * eps * mx.max(mx.abs(logits.astype(mx.float32)), axis=-1)


def verify(logits: mx.array, proposals: list[int], sampler: Sampler,
           exact: bool = False) -> Verdict:
    """logits: [k+1, V] of a pass over [current token, *proposals]; row i predicts the token
    after position i. The tokens taken: proposals accepted, then the token drawn at the first
    position that disagrees (exact: unless it is a near tie). Uses no draws: the caller
    skip()s them."""
    if not exact:
        return _standard(logits, proposals, sampler)
    rows, vocab = logits.shape
    lp = logprobs_of(logits)  # [L, V], as the plain path computes each row
    slack = near_tie_tolerance(logits.dtype, vocab)  # rounding in the log-softmax
    margin = 2 * tolerance(logits) + slack  # [L]: a log-probability difference that may flip
    if sampler.params.greedy:
        picks, robust = _greedy(lp, margin)
    else:
        keys = sampler.next_keys(rows)
        picks, robust = [], []
        for i in range(rows):
            pick = sampler.draw(lp[i : i + 1], keys[i])
            picks.append(pick)
            robust.append(_robust_draw(lp[i : i + 1], pick, keys[i], float(margin[i]),
                                       sampler))
            if not robust[-1] or i == len(proposals) or pick != proposals[i]:
                break
    tokens, accepted = [], 0
    for i, (pick, sure) in enumerate(zip(picks, robust)):
        if not sure:
            return Verdict(tokens, accepted, True)
        tokens.append(pick)
        if i < len(proposals) and pick == proposals[i]:
            accepted += 1
            continue
        break  # the correction, or the bonus token after every proposal was accepted
    return Verdict(tokens, accepted, False)


def _standard(logits: mx.array, proposals: list[int], sampler: Sampler) -> Verdict:
    """Standard acceptance (see the module's docstring): each row's token as the plain path
    picks or draws it, taken up to and including the first that is not the proposal."""
    lp = logprobs_of(logits)  # [L, V], as the plain path computes each row
    if sampler.params.greedy:
        picks = mx.argmax(lp, axis=-1).tolist()  # in lp's dtype, as the plain path picks
    else:
        keys = sampler.next_keys(lp.shape[0])
        picks = []
        for i, key in enumerate(keys):  # drawn one by one: stop at the first rejection
            picks.append(sampler.draw(lp[i : i + 1], key))
            if i == len(proposals) or picks[-1] != proposals[i]:
                break
    accepted = next((i for i, (t, x) in enumerate(zip(picks, proposals)) if t != x),
                    min(len(picks), len(proposals)))
    return Verdict(picks[: accepted + 1], accepted, False)


def _greedy(lp: mx.array, margin: mx.array) -> tuple[list[int], list[bool]]:
    """Each row's argmax, and whether it stays the argmax with the row's best lowered by its
    margin (every other log-probability then lies more than the margin below it)."""
    picks = mx.argmax(lp, axis=-1)  # in lp's dtype, as the plain path picks
    lp32 = lp.astype(mx.float32)
    best = mx.arange(lp.shape[-1])[None, :] == picks[:, None]
    lowered = mx.where(best, lp32 - margin[:, None], lp32)
    robust = mx.argmax(lowered, axis=-1) == picks
    mx.eval(picks, robust)
    return picks.tolist(), robust.tolist()


def _robust_draw(lp: mx.array, pick: int, key: mx.array, margin: float, sampler: Sampler) -> bool:
    """Whether the draw from lp: [1, V] with `key` gives `pick` for every lp within margin of
    these: pick stays inside the top-p/min-p cut, and wins the draw against every token that
    might be inside it even with its score lowered by the margin (scaled to the scores)."""
    p = sampler.params
    lp32 = lp.astype(mx.float32)
    possible, sure = _cut_bounds(lp32, margin, p.top_p, p.min_p, pick)
    if not sure:
        return False
    scores = mx.where(possible, lp32, -math.inf) * (1.0 / p.temp)
    top = mx.max(mx.abs(mx.where(possible, scores, 0.0))).item()
    # rounding of the scores in lp's dtype and of score + noise in float32
    rounding = 4 * float(mx.finfo(lp.dtype).eps) * (top + GUMBEL_MAX)
    lowered = scores - (margin / p.temp + rounding) * (mx.arange(lp.shape[-1]) == pick)
    return int(mx.random.categorical(lowered, key=key).item()) == pick


def _cut_bounds(lp: mx.array, margin: float, top_p: float, min_p: float, pick: int
                ) -> tuple[mx.array, bool]:
    """For any lp within margin of these (lp: [1, V] float32; a margin bounds the change of a
    difference of two entries): the tokens mlx-lm's top-p then min-p might keep, and whether
    they surely keep `pick`."""
    possible = mx.ones(lp.shape, dtype=mx.bool_)
    sure = True
    band = margin + 4 * float(mx.finfo(mx.float32).eps) * mx.max(mx.abs(lp)).item()
    mine = lp[0, pick].item()
    if 0 < top_p < 1:
        # apply_top_p drops the first n tokens in ascending order, n = how many of them have
        # a mass above them of at least top_p of the total, and keeps every lp >= the n-th
        # one's. The sum of the i smallest probabilities moves by a relative exp(margin) - 1
        # at most, whatever the order, plus the cumulative sum's rounding (V eps at most), so
        # n lies in [low, high]; a token with `high` others surely below it is kept.
        vocab = lp.shape[-1]
        ascending = mx.sort(lp, axis=-1)[0]
        probs = mx.exp(ascending)
        above = mx.cumsum(probs, reverse=True, inclusive=False)
        total = (above[0] + probs[0]).item()
        delta = (math.expm1(margin) + vocab * float(mx.finfo(mx.float32).eps)) * total
        low = int(mx.sum(above >= top_p * total + delta).item())
        high = int(mx.sum(above >= top_p * total - delta).item())
        possible = possible & (lp >= ascending[min(low, vocab - 1)] - band)
        sure = int(mx.sum(lp < mine - band).item()) >= high
    if min_p > 0:
        cut = mx.max(lp).item() + math.log(min_p)
        possible = possible & (lp >= cut - band)
        sure = sure and mine >= cut + band
    return possible, sure
