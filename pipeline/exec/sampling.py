"""One sampling-parameters type and one sampler, for one-shot, REPL, batch and serve.

Each sequence draws from its own random stream: key(seed), split once per token exactly as
MLX's global generator does after `mx.random.seed(seed)`. So a sequence with seed S gives the
tokens of single-process mlx-lm run with seed S (mlx_lm's make_sampler: top-p, then min-p, then
a categorical draw at the temperature), whatever else shares its micro-batch.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_p

DEFAULT_MAX_TOKENS = 256
_unseeded = itertools.count()  # distinct streams for sequences without a seed


@dataclass
class SamplingParams:
    temp: float = 0.0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    ignore_eos: bool = False

    def check(self) -> None:
        if not math.isfinite(self.temp) or self.temp < 0:
            raise ValueError(f"--temp {self.temp} is negative: use 0 for greedy or a positive value")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p} is outside (0, 1]")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"--min-p {self.min_p} is outside [0, 1)")
        if self.max_tokens <= 0:
            raise ValueError(f"--max-tokens {self.max_tokens} must be at least 1")

    @property
    def greedy(self) -> bool:
        return self.temp == 0


def logprobs_of(logits: mx.array) -> mx.array:
    """Log-probabilities as mlx-lm's generate_step computes them: logits [..., V]."""
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def top_logprobs(logprobs: mx.array, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """`token`'s log-probability in logprobs: [1, V], and the k largest (largest first; ties:
    lower id first), as Python numbers."""
    row = logprobs[0].astype(mx.float32)
    if k == 0:
        return float(row[token].item()), []
    top = mx.argpartition(-row, k - 1)[:k]
    mx.eval(row, top)
    values = row[top].tolist()
    ranked = sorted(zip(values, top.tolist()), key=lambda vt: (-vt[0], vt[1]))
    return float(row[token].item()), [(int(t), float(v)) for v, t in ranked]


class Sampler:
    """The next token of one sequence from its log-probabilities, with its own stream."""

    def __init__(self, params: SamplingParams):
        self.params = params
        seed = params.seed
        if seed is None:
            seed = (time.time_ns() + next(_unseeded)) % 2**63
        self._key = mx.random.key(seed)

    def __call__(self, logprobs: mx.array) -> int:
        """logprobs: [1, V] (one row, as mlx-lm samples it)."""
        if self.params.greedy:
            return int(mx.argmax(logprobs, axis=-1).item())
        self._key, sub = mx.random.split(self._key)
        return self.draw(logprobs, sub)

    def scores(self, logprobs: mx.array) -> mx.array:
        """What the categorical draw sees: top-p, then min-p, then 1/temperature."""
        p = self.params
        if 0 < p.top_p < 1:
            logprobs = apply_top_p(logprobs, p.top_p)
        if p.min_p != 0:
            logprobs = apply_min_p(logprobs, p.min_p)
        return logprobs * (1.0 / p.temp)

    def draw(self, logprobs: mx.array, key: mx.array) -> int:
        """The token drawn from logprobs: [1, V] with the sub-key `key` (see next_keys)."""
        return int(mx.random.categorical(self.scores(logprobs), key=key).item())

    def next_keys(self, n: int) -> list[mx.array]:
        """The sub-keys of the next n draws, without using them up (speculative decoding
        verifies several positions at once, then skip()s the draws it took)."""
        keys, key = [], self._key
        for _ in range(n):
            key, sub = mx.random.split(key)
            keys.append(sub)
        return keys

    def skip(self, n: int) -> None:
        """Use up n draws, as n calls would."""
        if not self.params.greedy:
            for _ in range(n):
                self._key, _ = mx.random.split(self._key)
