"""The engine's per-token log-probabilities (Sequence.logprobs): the log-softmax of the logits
each token was drawn from, equal to single-process mlx-lm's for the same prompt and tokens, in
process over 1 and 2 stages (with the shared head, whose greedy steps come summarized), for
greedy and sampled sequences batched together; and the token texts serve reports with them."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from pipeline.exec.engine import Sequence
from pipeline.exec.sampling import SamplingParams, top_logprobs
from test_engine import PROMPTS, LocalNet, _engine

TOP = 5


def mlx_lm_logprobs(path, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """Single-process mlx-lm's log-softmax at each answer position, given the answer's tokens
    (float32 [len(tokens), V]), decoding them one at a time as generate_step does."""
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = load(str(path))
    cache = make_prompt_cache(model)
    logits = model(mx.array(prompt)[None], cache=cache)[:, -1]
    rows = []
    for t in tokens:
        rows.append(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        logits = model(mx.array([[t]]), cache=cache)[:, -1]
    return np.array(mx.concatenate(rows).astype(mx.float32))


@pytest.mark.parametrize("split, share", [([7], 0), ([3, 4], 0), ([3, 4], 256)])
def test_engine_logprobs_equal_mlx_lm(model_dir, split, share):
    path = model_dir("tiny-llama")
    engine = _engine(LocalNet(path, split, head_share_rows=share), concurrency=4,
                     head_share_rows=share)
    seqs = [Sequence(id=i, prompt=p, logprobs=TOP if i != 2 else 0,
                     sampling=SamplingParams(max_tokens=6, ignore_eos=True,
                                             temp=0.0 if i % 2 == 0 else 0.8, seed=i))
            for i, p in enumerate(PROMPTS)]
    seqs.append(Sequence(id=9, prompt=PROMPTS[0], sampling=SamplingParams(max_tokens=6)))
    done = {}
    engine.run(seqs, lambda s: done.__setitem__(s.id, s))
    assert done[9].token_logprobs == []  # nobody asked
    if share:  # some all-greedy steps came as summaries: their rows took the whole head
        assert engine.summaries.steps > 0
    for seq in seqs[:-1]:
        want = mlx_lm_logprobs(path, seq.prompt, seq.tokens)
        assert len(seq.token_logprobs) == len(seq.tokens) == 6
        for pos, (token, (lp, top)) in enumerate(zip(seq.tokens, seq.token_logprobs)):
            row = want[pos]
            assert lp == pytest.approx(float(row[token]), abs=1e-4), (seq.id, pos)
            k = seq.logprobs
            assert [t for t, _ in top] == list(np.argsort(-row, kind="stable")[:k]), (seq.id, pos)
            assert [v for _, v in top] == pytest.approx(list(np.sort(row)[::-1][:k]), abs=1e-4)
            if seq.sampling.greedy:
                assert token == int(np.argmax(row))


def test_top_logprobs_order_and_ties():
    lp = mx.log(mx.array([[0.1, 0.4, 0.1, 0.4]]))
    chosen, top = top_logprobs(lp, 2, 3)
    assert chosen == pytest.approx(np.log(0.1))
    assert [t for t, _ in top] == [1, 3, 0]  # largest first; ties: the lower id first
    assert top_logprobs(lp, 1, 0) == (pytest.approx(np.log(0.4)), [])


def test_token_texts_and_bytes(model_dir):
    """Each token's text and exact UTF-8 bytes (a byte-level BPE token may hold part of a
    character); the legacy completions form keeps, per text, the largest logprob."""
    from mlx_lm.utils import load_tokenizer

    from pipeline.serve.logprobs import TokenText, completion_logprobs

    tok = load_tokenizer(model_dir("tiny-llama"))
    text = TokenText(tok)
    assert text.kind == "bpe"
    sentence = "The river wound slowly, é and 中"
    ids = tok.encode(sentence)
    assert b"".join(bytes(text(t)[1]) for t in ids).decode() == sentence
    assert all(text(t)[0] == tok.decode([t]) for t in ids if "\ufffd" not in tok.decode([t]))
    entries = [text.entry(t, -1.0, [(t, -1.0), (ids[0], -2.0)]) for t in ids[:3]]
    legacy = completion_logprobs(entries, 4)
    assert legacy["tokens"] == [text(t)[0] for t in ids[:3]]
    assert legacy["text_offset"] == [4, 4 + len(legacy["tokens"][0]),
                                     4 + len(legacy["tokens"][0]) + len(legacy["tokens"][1])]
    assert legacy["top_logprobs"][0] == {text(ids[0])[0]: -1.0}  # same text: the largest kept
