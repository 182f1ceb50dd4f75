"""Rank 0's handle on the pipeline: the prefill step and the decode step every command uses,
and one conversation's generation (one-shot, REPL) on top of them.

A step embeds tokens, runs rank 0's layers and posts the result to rank 1; it comes back
from the last rank (when the step asked for it, Flag.RETURN) to be normed, projected to
logits and sampled here. Prefill is pipelined for free: rank 0 posts chunk k and goes
straight on to chunk k+1, so the stages work on different chunks at the same time. With one
rank the "ring" is a local queue. Batch generation (engine.py) drives the same steps.
One conversation may send its current token with proposed ones as one chunk and keep what
the model itself would have produced (speculative decoding: draft.py, verify.py).
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import mlx.core as mx

from pipeline.exec import worker
from pipeline.exec.draft import DraftOptions, Speculation
from pipeline.exec.sampling import Sampler, SamplingParams, logprobs_of
from pipeline.exec.worker import injected_fault, rank_stats
from pipeline.model.stage import Stage
from pipeline.wire.protocol import Flag, Message, Op, Quit, Run, Stats
from pipeline.wire.ring import Ring

DEFAULT_PREFILL_CHUNK = 512
# Test hook (tests/test_tensor.py): PIPELINE_LOGITS_OUT=FILE.npy makes one-shot save the logits
# of each plain decode step (float32 [steps, V]), to compare with mlx-lm's. Unset: no effect.
LOGITS_OUT = os.environ.get("PIPELINE_LOGITS_OUT", "")


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
    passes: int = 0  # decode passes round the ring (speculative ones carry several tokens)
    drafted: int = 0  # tokens proposed by drafting
    accepted: int = 0  # of which the model's own decoding produced


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
    """Rank 0: the steps over the ring, and one conversation's KV cache at a time."""

    def __init__(self, comm, stage: Stage, tokenizer, weight_bytes: int,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, context: int | None = None,
                 head_share_rows: int = 0, ring=None, log=None, group=None):
        self.stage, self.tokenizer = stage, tokenizer
        self.ring = ring if ring is not None else (
            Ring(comm) if comm is not None and comm.Get_size() > 1 else None)
        self.size = self.ring.stages if self.ring is not None else 1  # stages on the ring
        # Stage 0 as a tensor-parallel group: the others compute every step rank 0 computes
        # (tokens, control messages, the head's rows), told by this link before rank 0 does.
        self.group = group
        self.groups = [1] * self.size  # ranks per stage (the job sets the plan's)
        if group is not None:
            stage.mirror = lambda hn: group.tell(Message(Op.HEAD, h=hn[:, None, :]))
        self.weight_bytes = weight_bytes
        self.prefill_chunk = prefill_chunk
        self.context = context  # the context window (tokens); None: unchecked
        self.head_share_rows = head_share_rows  # vocabulary rows the last rank holds
        self.head_split = None  # the engine's HeadSplit, learnt once and kept for the job
        # prompt-cache bytes on the rank that holds the most per byte on rank 0 (its layers
        # over rank 0's; the job sets it from the plan): the budget holds on every rank
        self.cache_scale = 1.0
        self.prompt_cache_bytes = 0  # its budget per rank: the plan's (the job sets it)
        self.fed: list[int] = []  # tokens whose keys/values sit in the caches of every rank
        self.interrupted = False  # set from a signal handler to stop the current generation
        self.last_stats: GenerationStats | None = None
        self.steps = 0  # forward steps, for the PIPELINE_FAULT test hook
        self._local: deque = deque()  # one rank: steps "sent round" to ourselves
        self.drafting: DraftOptions | None = None  # speculative decoding in generate()
        # bench --speculative: a list makes generate() append each plain decode step's logits
        # row ([V], as sampled) to it, to find how close a token the drafted text differs at was
        self.keep_logits: list | None = None
        self.log = log or (lambda msg: None)  # --verbose lines

    # -- the steps every command uses ----------------------------------------------------
    def request(self, request) -> None:
        if self.ring is not None:
            self.ring.request(request)

    def send(self, msg: Message) -> None:
        """A control message (or END) down the ring."""
        if self.group is not None:
            self.group.tell(msg)
        if self.size > 1:
            self.ring.send(msg)

    def step(self, tokens: mx.array, caches: list | None, mb: int = 0,
             flags: Flag = Flag.NONE, head_rows: int = 0) -> None:
        """Embed tokens: [B, L], run rank 0's layers on `caches` (None: the conversation's)
        and post the result round the ring; with Flag.RETURN it comes back to collect()."""
        if worker.FAULT:
            self.steps += 1
            injected_fault(0, self.steps)
        ring = self.ring if self.size > 1 else None  # one stage: its result stays here
        progress = ring.progress if ring is not None and ring.sending else None
        if self.group is not None:
            self.group.tell(Message(Op.FORWARD, mb, flags, tokens=tokens))
        h = self.stage.forward(self.stage.embed(tokens), caches, progress)
        mx.eval(h)
        if ring is None:
            if flags & Flag.RETURN:
                self._local.append(Message(Op.FORWARD, mb, flags, h=h))
        else:
            ring.send(Message(Op.FORWARD, mb, flags, h=h, head_rows=head_rows))

    def prefill(self, tokens: list[int], caches: list | None, mb: int = 0) -> None:
        """Post prompt tokens in chunks of prefill_chunk; nothing comes back."""
        for i in range(0, len(tokens), self.prefill_chunk):
            self.step(mx.array([tokens[i : i + self.prefill_chunk]]), caches, mb)

    def collect(self) -> Message:
        """The next step that comes back round the ring (in the order they were sent)."""
        return self._local.popleft() if self.size == 1 else self.ring.recv()

    # -- one conversation: one-shot and the REPL -----------------------------------------
    def _reusable_prefix(self, prompt: list[int]) -> int:
        """How many cached tokens the next turn keeps: the common prefix, unless the caches
        would have to drop tokens and cannot (a recurrent state, a wrapped sliding window)."""
        keep = min(_common_prefix(self.fed, prompt), len(prompt) - 1)
        if not self.stage.can_keep(keep, len(self.fed)):
            why = ("a sliding-window cache has wrapped" if self.stage.rewindable else
                   "the model keeps a recurrent state, which cannot drop tokens")
            self.log(f"cannot reuse {keep} of {len(self.fed)} cached tokens ({why}): "
                     f"prefilling all {len(prompt)} prompt tokens again")
            return 0
        return keep

    def generate(self, prompt: list[int], sampling: SamplingParams) -> Iterator[tuple[int, str]]:
        """Yield (token, text segment) as tokens come; stats land in `self.last_stats`.
        Stops at max_tokens, at EOS, or when the context window is full ("length")."""
        check_prompt(prompt, self.context)
        keep = self._reusable_prefix(prompt)
        self.request(Run(keep))
        self.stage.trim_to(keep)
        self.fed = self.fed[:keep]
        stats = GenerationStats(prompt_tokens=len(prompt) - keep, cached_tokens=keep)
        self.last_stats = stats
        sampler = Sampler(sampling)
        eos = set() if sampling.ignore_eos else set(self.tokenizer.eos_token_ids)
        budget = sampling.max_tokens
        if self.context is not None:  # prompt + answer within the window, as serve counts
            budget = min(budget, self.context - len(prompt))
        detok = self.tokenizer.detokenizer
        detok.reset()
        self.interrupted = False
        start = time.perf_counter()
        todo = prompt[keep:]
        spec = None
        if self.drafting is not None:
            spec = Speculation(self.drafting, self.stage, prompt, self.log)
            if spec.off:
                self.log(f"drafting off for this conversation: {spec.off}")
        try:
            # Like mlx-lm: prefill all but the last prompt token, which starts decoding.
            self.prefill(todo[:-1], None)
            self.fed.extend(todo[:-1])
            token, first = todo[-1], None
            stats.finish_reason = "length"
            while stats.generation_tokens < budget:
                taken = self._decode_pass(token, spec, sampler, eos,
                                          budget - stats.generation_tokens, stats)
                token = taken[-1] if taken else token
                stopped = False
                for t in taken:
                    if first is None:
                        first = time.perf_counter()
                        stats.ttft_s = first - start
                    stats.generation_tokens += 1
                    stats.tokens.append(t)
                    if t in eos:
                        stats.finish_reason, stopped = "stop", True
                        break
                    detok.add_token(t)
                    yield t, detok.last_segment
                    if self.interrupted:
                        stats.finish_reason, stopped = "interrupted", True
                        break
                if stopped:
                    break
        finally:
            self.send(Message(Op.END))
        detok.finalize()
        tail = detok.last_segment  # reading it moves the offset on: read it once
        if tail:
            yield -1, tail
        end = time.perf_counter()
        stats.prompt_tps = stats.prompt_tokens / stats.ttft_s if stats.ttft_s else 0.0
        if stats.generation_tokens > 1:
            stats.generation_tps = (stats.generation_tokens - 1) / (end - first)

    def _decode_pass(self, token: int, spec: Speculation | None, sampler: Sampler, eos: set,
                     left: int, stats: GenerationStats) -> list[int]:
        """One trip round the ring from `token` (with proposals when drafting): the tokens it
        gives, up to the first EOS and at most `left`. Without proposals this is the plain
        decode step; with them, see draft.py."""
        chunk = [token] + (spec.propose(left) if spec is not None else [])
        self.step(mx.array([chunk]), None, flags=Flag.RETURN)
        h = self.collect().h
        stats.passes += 1
        if len(chunk) == 1:
            logits = self.stage.logits(h)
            if LOGITS_OUT:
                self._save_logits(logits)
            if self.keep_logits is not None:
                self.keep_logits.append(logits[0])
            new = [sampler(logprobs_of(logits))]  # [1, V] -> token
        else:
            verdict = spec.verify(h, chunk, sampler)
            new = verdict.tokens
            stats.drafted += len(chunk) - 1
            stats.accepted += verdict.accepted
        taken = min(left, next((i + 1 for i, t in enumerate(new) if t in eos), len(new)))
        self._keep(chunk, taken)
        if len(chunk) > 1:
            sampler.skip(taken)  # the draws of the positions taken (a plain step drew its own)
        if spec is not None:
            spec.extend(new[:taken])
        return new[:taken]

    def _save_logits(self, logits: mx.array) -> None:
        import numpy as np

        rows = getattr(self, "_logit_rows", [])
        rows.append(np.array(logits[0].astype(mx.float32)))
        self._logit_rows = rows
        np.save(LOGITS_OUT, np.stack(rows))

    def _keep(self, chunk: list[int], taken: int) -> None:
        """After a pass over chunk whose first `taken` predictions were taken: those positions
        join the conversation, the others are trimmed from every rank's caches (rank 0 here,
        the others by an Op.TRIM that reaches them before the next step)."""
        self.fed.extend(chunk[:taken])
        extra = len(chunk) - taken
        if extra:
            self.send(Message(Op.TRIM, payload=[extra]))
            self.stage.trim_to(self.stage.offset - extra)

    def reset(self) -> None:
        """Forget the conversation; the next request clears every rank's cache (keep=0)."""
        self.fed = []

    def rank_stats(self) -> list[dict]:
        mine = rank_stats(self.stage, self.ring, self.weight_bytes)
        if self.ring is None:
            return [mine]
        self.ring.request(Stats())
        return self.ring.gather_stats(mine)

    def shutdown(self) -> None:
        if self.ring is not None:
            self.ring.request(Quit())
            self.ring.close()
        if self.group is not None:
            self.group.close()
