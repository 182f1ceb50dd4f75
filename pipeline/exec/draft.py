"""Drafting for speculative decoding, on rank 0: proposals, how many to make, and when not to.

One conversation (one-shot, the REPL) decodes one token per trip round the ring. With
proposals, the current token and k proposed tokens go round as one chunk of k+1 positions;
rank 0 computes the logits of every position, keeps the proposals the model itself picks
there (verify.py; --draft-exact: only those it would pick under any rounding of the pass) plus
the token after them, and every rank trims the rest from its caches. A trip costs about the
same for k+1 positions as for one while decoding reads weights (or waits on links) more than
it computes, so each accepted proposal is a token for free.

Proposals come from prompt lookup (the tokens that followed the latest earlier occurrence of
the last n tokens in the prompt and the text so far, n = MAX_NGRAM down to 1), or from a
small draft model with the same tokenizer (--draft-model). DraftControl adapts k to what is
accepted and pauses drafting while it does not pay.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import mlx.core as mx

from pipeline.exec.verify import Verdict, verify
from pipeline.model.stage import Stage

DEFAULT_NUM_DRAFT_TOKENS = 8  # the most proposals per pass (--num-draft-tokens)
MAX_NGRAM = 3  # prompt lookup matches the last 3, 2, then 1 tokens
START_DRAFT = 4  # proposals per pass at first
WINDOW = 8  # passes with proposals over which the acceptance rate is judged
MIN_ACCEPTANCE = 0.2  # below this rate over a window, drafting pauses
PAUSE_MIN, PAUSE_MAX = 16, 256  # plain steps of a pause; it doubles while probes fail
PREFILL_CHUNK = 512  # tokens per forward pass when a draft model catches up with the history


@dataclass
class DraftOptions:
    """What one conversation drafts with (set by the chat command; None: no drafting)."""
    prompt_lookup: bool = True
    num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS
    draft_model: "DraftModel | None" = None  # proposals from a small model instead of lookup
    exact: bool = False  # --draft-exact: the margin test (verify.py), plain decoding's tokens


class PromptLookup:
    """Proposals copied from earlier in the token history.

    For each n, `index[n]` maps an n-gram to the position after its latest occurrence that
    has a token after it, kept up to date as tokens arrive (O(MAX_NGRAM) per token)."""

    def __init__(self, tokens: list[int], max_ngram: int = MAX_NGRAM):
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self.index: list[dict] = [{} for _ in range(max_ngram + 1)]
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            end = len(self.tokens)  # the n-grams ending here now have a token after them
            for n in range(1, min(self.max_ngram, end) + 1):
                self.index[n][tuple(self.tokens[end - n : end])] = end
            self.tokens.append(t)

    def propose(self, k: int) -> list[int]:
        """Up to k tokens: what followed the latest earlier occurrence of the longest suffix
        (of at most MAX_NGRAM tokens) seen before. A copy that runs into the present goes on
        copying itself, so a repeating pattern is proposed k tokens ahead."""
        tokens = self.tokens
        for n in range(min(self.max_ngram, len(tokens)), 0, -1):
            start = self.index[n].get(tuple(tokens[-n:]))
            if start is None:
                continue
            out: list[int] = []
            for pos in range(start, start + k):
                out.append(tokens[pos] if pos < len(tokens) else out[pos - len(tokens)])
            return out
        return []


class DraftModel:
    """A small model with the main model's tokenizer, whole on rank 0, drafting greedily.
    Its own caches follow the history: what it drafted and was rejected is trimmed away at
    the next proposal (or, for a cache that cannot rewind, the history is fed again)."""

    def __init__(self, stage: Stage, name: str = ""):
        self.stage, self.name = stage, name
        self.fed: list[int] = []  # tokens whose keys/values sit in the draft's caches
        self.tokens: list[int] = []  # the history it proposes after

    def reset(self, tokens: list[int]) -> None:
        self.tokens = list(tokens)

    def extend(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def propose(self, k: int) -> list[int]:
        keep = 0
        for a, b in zip(self.fed, self.tokens[:-1]):
            if a != b:
                break
            keep += 1
        try:
            self.stage.trim_to(keep)
        except ValueError:  # a full sliding window cannot rewind: the caches were cleared
            keep = 0
        self.fed = self.fed[:keep]
        todo = self.tokens[keep:]
        prefill = todo[:-1]
        for i in range(0, len(prefill), PREFILL_CHUNK):
            h = self.stage.forward(self.stage.embed(mx.array([prefill[i : i + PREFILL_CHUNK]])))
            mx.eval(h)
        self.fed.extend(prefill)
        token, out = todo[-1], []
        for _ in range(k):
            logits = self.stage.logits(self.stage.forward(self.stage.embed(mx.array([[token]]))))
            self.fed.append(token)
            token = int(mx.argmax(logits, axis=-1).item())
            out.append(token)
        return out


class DraftControl:
    """How many proposals to make: k grows by 2 after a pass that accepted all it proposed and
    shrinks by 1 after one that did not (within [1, cap]). When fewer than MIN_ACCEPTANCE of
    the proposals of the last WINDOW passes were accepted, drafting pauses for a number of
    plain steps (PAUSE_MIN, doubling after each failed probe up to PAUSE_MAX), then probes
    again: a pause costs nothing, a rejected proposal a position of compute."""

    def __init__(self, cap: int):
        self.cap = cap
        self.k = max(1, min(cap, START_DRAFT))
        self.window: deque = deque(maxlen=WINDOW)
        self.paused_for = 0  # plain steps left in the current pause
        self.pause = PAUSE_MIN
        self.pauses = 0

    def wanted(self) -> int:
        """Proposals to make for the next pass (0: a plain step); counts down a pause."""
        if self.paused_for > 0:
            self.paused_for -= 1
            return 0
        return self.k

    def record(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        self.k = min(self.cap, self.k + 2) if accepted == proposed else max(1, self.k - 1)
        self.window.append((proposed, accepted))
        if len(self.window) < WINDOW:
            return
        rate = sum(a for _, a in self.window) / sum(p for p, _ in self.window)
        if rate < MIN_ACCEPTANCE:
            self.paused_for, self.pauses = self.pause, self.pauses + 1
            self.pause = min(PAUSE_MAX, 2 * self.pause)
            self.window.clear()
        else:
            self.pause = PAUSE_MIN


def cache_limit(stage: Stage) -> tuple[int | None, str | None]:
    """How far a conversation's caches may grow while proposals can still be trimmed away:
    (tokens, None), (None, None) without a limit, or (0, why not at all). Rank 0 builds the
    whole model's (empty) caches to see every rank's kinds."""
    caches = stage.cache_factory() if stage.cache_factory is not None else []
    limit = stage.min_window
    for c in caches:
        max_size = getattr(c, "max_size", None)
        if max_size is not None:  # a rotating (sliding-window) cache rewinds until it is full
            limit = max_size if limit is None else min(limit, max_size)
        elif not c.is_trimmable():
            return 0, f"its {type(c).__name__} cannot be rolled back"
    return limit, None


class Speculation:
    """One generation's drafting: proposals before each pass, the verdict after it."""

    def __init__(self, options: DraftOptions, stage: Stage, history: list[int], log=None):
        self.stage, self.log = stage, log or (lambda msg: None)
        self.source = options.draft_model
        if self.source is None:
            self.source = PromptLookup(history)
        else:
            self.source.reset(history)
        self.control = DraftControl(options.num_draft_tokens)
        self.exact = options.exact
        self.limit, why = cache_limit(stage)
        self.off = why  # drafting is off for the rest of this generation, and why
        self.plain_next = False  # exact mode stopped at a near tie: decode it alone

    def propose(self, remaining: int) -> list[int]:
        """Proposals for the next pass: at most remaining - 1 (the pass adds one token of its
        own), none while the cache could not take them back."""
        if self.off is not None or self.plain_next:
            self.plain_next = False
            return []
        k = min(self.control.wanted(), remaining - 1)
        if self.limit is not None:  # the caches must stay below the window after the chunk
            room = self.limit - self.stage.offset - 2  # k + 1 positions: offset + k + 1 < limit
            if room < 1 and k > 0:
                self.off = f"the sliding window ({self.limit} tokens) is full"
                self.log(f"drafting off for this conversation: {self.off}")
                return []
            k = min(k, room)
        return self.source.propose(k) if k > 0 else []

    def verify(self, h: mx.array, chunk: list[int], sampler) -> Verdict:
        """The verdict on a pass over chunk = [token, *proposals] that came back as h:
        [1, L, D]: final norm and head on every position, then the acceptance rule."""
        logits = self.stage.head_logits(self.stage.norm(h)[0])  # [L, V]
        verdict = verify(logits, chunk[1:], sampler, exact=self.exact)
        self.plain_next = verdict.near_tie
        pauses = self.control.pauses
        self.control.record(len(chunk) - 1, verdict.accepted)
        if self.control.pauses > pauses:
            self.log(f"drafting paused for {self.control.paused_for} steps: under "
                     f"{MIN_ACCEPTANCE:.0%} of the proposals of the last {WINDOW} passes "
                     f"were accepted")
        return verdict

    def extend(self, tokens: list[int]) -> None:
        self.source.extend(tokens)


def load_draft_model(spec: str, tokenizer, dtype: str | None, dequantize: bool | None
                     ) -> DraftModel:
    """--draft-model on rank 0: the whole model (every layer, embedding and head), refused
    unless its tokenizer's vocabulary is the main model's token for token."""
    from mlx_lm.utils import load_tokenizer

    from pipeline.host import blas
    from pipeline.model.load import load_stage, read_config
    from pipeline.model.spec import ModelError, resolve_model
    from pipeline.host.rows_first import use_rows_first

    path = resolve_model(spec)
    config = read_config(path)
    if load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
        raise ModelError(f"--draft-model {spec} has another tokenizer than the model: its "
                         f"proposals would be other token ids (use a model of the same family)")
    if dequantize is None:  # small and read every proposal: dense is faster on a CPU
        dequantize = blas.describe()[0] == "cpu"
    stage = load_stage(path, config, (0, config["num_hidden_layers"]), with_head=True,
                       dtype=dtype, dequantize=dequantize)
    if blas.rows_first_pays():
        use_rows_first(stage)
    return DraftModel(stage, spec)
