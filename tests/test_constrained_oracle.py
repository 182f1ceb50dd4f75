"""Constrained decoding against an oracle, in process: the engine (real workers over
tests/test_engine.py's in-process ring, 1 and 3 stages) with a grammar.Constraint on a
sequence gives, token for token, what single-process mlx-lm gives with the same grammar as a
logits processor (its own generate_step; each processor call feeds the constraint the tokens
chosen since the last one and masks the rest). A JSON schema and a forced tool call, on a
random-weight model, greedy, past the grammar's end (then only EOS is allowed)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from pipeline.exec.engine import Sequence
from pipeline.exec.sampling import SamplingParams
from pipeline.serve import grammar
from pipeline.serve.families import Family
from test_engine import LocalNet, _engine

SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                           "count": {"type": "integer"}},
          "required": ["answer", "count"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": n, "parameters": {
    "type": "object", "properties": {k: {"type": "string"}}, "required": [k]}}}
    for n, k in (("get_weather", "city"), ("get_time", "zone"))]
N = 40


def make(kind: str, tok):
    if kind == "json":
        return grammar.Constraint(grammar.json_grammar(Family("none"), False, SCHEMA, tok), tok,
                                  "response_format")
    family = Family("json_tools", None, ("<tool_call>", "</tool_call>"))
    return grammar.Constraint(grammar.tool_grammar(family, False, TOOLS, None, False, tok), tok,
                              "tool_choice")


def oracle(path, prompt: list[int], constraint) -> list[int]:
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(path))
    fed = [len(prompt)]

    def processor(tokens: mx.array, logits: mx.array) -> mx.array:
        for t in tokens.tolist()[fed[0]:]:
            constraint.accept(int(t))
        fed[0] = tokens.size
        mask = constraint.allowed(logits.shape[-1])
        return mx.where(mask[None], logits, mx.array(-mx.inf, dtype=logits.dtype))

    steps = generate_step(mx.array(prompt), model, max_tokens=N, logits_processors=[processor],
                          sampler=lambda logprobs: mx.argmax(logprobs, axis=-1))
    return [int(t) for t, _ in steps]


@pytest.mark.parametrize("kind", ["json", "call"])
@pytest.mark.parametrize("split", [[7], [2, 3, 2]])
def test_a_constrained_sequence_equals_mlx_lm_with_the_same_grammar(model_dir, kind, split):
    from mlx_lm.utils import load_tokenizer

    path = model_dir("tiny-llama")
    tok = load_tokenizer(path)
    prompt = tok.encode("Answer in JSON: is the sky blue?")
    expected = oracle(path, prompt, make(kind, tok))
    net = LocalNet(path, split)
    engine = _engine(net, concurrency=2)
    seq = Sequence(id=0, prompt=prompt, sampling=SamplingParams(temp=0.0, max_tokens=N,
                                                                ignore_eos=True),
                   constraint=make(kind, tok))
    free = Sequence(id=1, prompt=prompt, sampling=SamplingParams(temp=0.0, max_tokens=N,
                                                                 ignore_eos=True))
    engine.run([seq, free], lambda s: None)
    assert seq.tokens == expected
    text = tok.decode([t for t in expected if t not in tok.eos_token_ids])
    assert text.startswith('{"answer": ' if kind == "json" else "<tool_call>\n{"), text
    assert free.tokens != seq.tokens  # the grammar changed the answer (same batch, no mask)


def test_logprobs_under_a_grammar_are_those_of_the_masked_logits(model_dir):
    """With a grammar, logprobs are the log-softmax of the logits after its mask: a token the
    grammar forces (a key of the schema, its punctuation) has log-probability 0, and no
    refused token is among the top ones."""
    import math

    from mlx_lm.utils import load_tokenizer

    path = model_dir("tiny-llama")
    tok = load_tokenizer(path)
    net = LocalNet(path, [3, 4])
    engine = _engine(net, concurrency=1)
    seq = Sequence(id=0, prompt=tok.encode("JSON please"), logprobs=3, constraint=make("json", tok),
                   sampling=SamplingParams(temp=0.0, max_tokens=12, ignore_eos=True))
    engine.run([seq], lambda s: None)
    text = tok.decode(seq.tokens)
    assert text.startswith('{"answer": ')
    chosen = [lp for lp, _ in seq.token_logprobs]
    assert max(chosen) == 0.0  # forced steps: probability 1 among the allowed tokens
    for lp, top in seq.token_logprobs:
        assert top and all(v > -math.inf for _, v in top)  # refused tokens are not listed
        assert sum(math.exp(v) for _, v in top) <= 1 + 1e-5 and lp == top[0][1]
