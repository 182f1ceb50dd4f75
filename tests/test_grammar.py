"""Constrained decoding's grammars (serve/grammar.py, through llguidance), in process on the
scripted model's tokenizer: which token sequences a forced call or a JSON schema lets through,
the free reasoning block before them, EOS only once the grammar is complete, and a schema that
cannot be compiled refused with a 400."""

from __future__ import annotations

import mlx.core as mx
import pytest

from pipeline.serve import grammar
from pipeline.serve.errors import ApiError
from pipeline.serve.families import Family, family_of
from scripted import TOOLS, scripted_model  # noqa: F401 (a fixture)

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tok(scripted_model, plain):
    from mlx_lm.utils import load_tokenizer

    PLAIN[:] = [plain]
    return load_tokenizer(scripted_model)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The scripted model's base tokenizer, without its added pieces (same ids below 512)."""
    from mlx_lm.utils import load_tokenizer

    from pipeline.model.make_model import make_model

    return load_tokenizer(make_model("tiny-mistral", tmp_path_factory.mktemp("plain"),
                                     num_layers=1))


def ids_of(tok, text: str) -> list[int]:
    """Text in the base tokenizer's canonical tokens: llguidance lets only those through where
    the grammar forces the bytes, and the scripted pieces span a marker and the JSON after it
    (a token may not cross into %json, a subgrammar of its own)."""
    return PLAIN[0].encode(text, add_special_tokens=False)


PLAIN: list = []


def walk(constraint, tok, text: str | list) -> bool:
    """Feed the tokens (text: one per character; a list: text pieces and token ids) one by
    one, each checked against the mask first."""
    width = len(tok.get_vocab())
    parts = [text] if isinstance(text, str) else text
    for t in [t for p in parts for t in (ids_of(tok, p) if isinstance(p, str) else [p])]:
        if not 0 <= t < width:
            return False
        if not bool(constraint.allowed(width)[t]):
            return False
        constraint.accept(t)
    return True


def eos_only(constraint, tok) -> bool:
    allowed = constraint.allowed(len(tok.get_vocab()))
    ids = {i for i, ok in enumerate(allowed.tolist()) if ok}
    return ids <= set(tok.eos_token_ids) and sorted(tok.eos_token_ids)[0] in ids


def forced(tok, *, name=None, parallel=True, reasoning=False, family=None):
    family = family or Family("json_tools", None, ("<tool_call>", "</tool_call>"))
    return grammar.Constraint(grammar.tool_grammar(family, reasoning, TOOLS, name, parallel, tok),
                              tok, "tool_choice")


def test_a_forced_call_lets_only_calls_through(tok):
    assert walk(forced(tok), tok, CALL + "\n" + CALL.replace("Paris", "Rome"))
    assert not walk(forced(tok), tok, "I will check." + CALL)  # no text first
    assert not walk(forced(tok), tok, CALL.replace("get_weather", "get_date"))  # not a tool
    assert not walk(forced(tok), tok, CALL.replace('"city": "Paris"', '"city": 3'))  # schema
    named = forced(tok, name="get_time")
    assert not walk(named, tok, CALL)
    assert walk(forced(tok, name="get_time"), tok,
                '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')


def test_eos_comes_only_once_the_grammar_is_complete(tok):
    one, ids = forced(tok, parallel=False), ids_of(tok, CALL)
    assert walk(one, tok, ids[:-1])
    assert not bool(one.allowed(len(tok.get_vocab()))[sorted(tok.eos_token_ids)[0]])
    assert walk(one, tok, ids[-1:]) and eos_only(one, tok)  # one call, then nothing but EOS
    more = forced(tok)
    assert walk(more, tok, CALL)
    allowed = more.allowed(len(tok.get_vocab()))
    assert bool(allowed[sorted(tok.eos_token_ids)[0]])  # EOS, or a second call
    assert bool(allowed[tok.encode("\n", add_special_tokens=False)[0]])


def test_reasoning_stays_free_before_the_constrained_part(tok):
    family = family_of(tok)  # the scripted template: <think> markers, json_tools calls
    assert family.think and family.name == "json_tools"
    start, end = (tok.encode(m, add_special_tokens=False) for m in family.think)
    assert len(start) == len(end) == 1  # each one token, which llguidance holds special
    thought = [start[0], "Let me see: Paris, or { maybe } not.\n", end[0], "\n\n" + CALL]
    assert walk(forced(tok, family=family), tok, thought)
    assert walk(forced(tok, family=family), tok, CALL)  # or no reasoning at all
    inside = forced(tok, family=family, reasoning=True)  # the prompt opened the block
    assert walk(inside, tok, "still thinking</think>\n" + CALL)  # the end marker as text
    unended = forced(tok, family=family, reasoning=True)
    assert walk(unended, tok, CALL)  # a call inside the reasoning is only reasoning text:
    assert not eos_only(unended, tok)  # no end yet, and no EOS before the call
    assert not bool(unended.allowed(len(tok.get_vocab()))[sorted(tok.eos_token_ids)[0]])


def test_json_schema_output(tok):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}

    def new():
        return grammar.Constraint(grammar.json_grammar(Family("none"), False, schema, tok), tok,
                                  "response_format")

    answer = new()
    assert walk(answer, tok, '{"answer": "no"}') and eos_only(answer, tok)
    assert not walk(new(), tok, '{"answer": "maybe"}')
    assert not walk(new(), tok, '{"answer":  "no"}')  # JSON as json.dumps writes it
    assert not walk(new(), tok, 'Sure: {"answer": "no"}')
    assert grammar.response_schema({"response_format": {"type": "json_object"}}) == {
        "type": "object"}
    assert grammar.response_schema({"response_format": {"type": "text"}}) is None


def test_the_mask_covers_padded_logits_and_masks_logprobs(tok):
    c = forced(tok)
    width = len(tok.get_vocab()) + 64  # a head padded past the vocabulary
    mask = c.allowed(width)
    assert mask.shape == (width,) and not bool(mask[-64:].any())
    logprobs = mx.zeros((1, width))
    masked = c.apply(logprobs)
    assert bool(mx.all(mx.isinf(masked[0]) == ~mask))


def test_a_schema_that_cannot_compile_is_a_400(tok):
    with pytest.raises(ApiError) as e:
        grammar.Constraint(grammar.json_grammar(Family("none"), False, {
            "type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}, tok), tok,
            "response_format")
    assert e.value.status == 400 and e.value.param == "response_format"


def only(constraint, tok) -> list[int]:
    """The tokens the constraint allows next, where it allows a few (else [])."""
    allowed = constraint.allowed(len(tok.get_vocab())).tolist()
    ids = [i for i, ok in enumerate(allowed) if ok]
    return ids if len(ids) < 4 else []


def test_a_reasoning_budget_forces_the_end_marker(tok):
    """thinking budget_tokens: after that many reasoning tokens the end marker is forced; a
    block that ends in time, or an answer that does not reason, is left alone."""
    family = family_of(tok)
    start, end = (tok.encode(m, add_special_tokens=False) for m in family.think)
    words = ids_of(tok, "one two three four five six")
    budget = grammar.ThinkBudget(3, family, False, tok)
    for t in [start[0], *words[:3]]:
        assert not only(budget, tok)  # free until the budget is spent
        budget.accept(t)
    assert only(budget, tok) == end  # then the end marker, only
    budget.accept(end[0])
    assert not only(budget, tok) and budget.state == "after" and budget.count == 3

    in_time = grammar.ThinkBudget(5, family, False, tok)  # ended by the model itself
    for t in [start[0], *words[:2], end[0], *words[2:5]]:
        assert not only(in_time, tok)
        in_time.accept(t)
    assert in_time.state == "after" and in_time.count == 3

    opened = grammar.ThinkBudget(2, family, True, tok)  # the prompt opened the block
    for t in words[:2]:
        opened.accept(t)
    assert only(opened, tok) == end

    plain = grammar.ThinkBudget(1, family, False, tok)  # no reasoning: never forced
    for t in words[:4]:
        assert not only(plain, tok)
        plain.accept(t)
    assert plain.state == "after"


def test_a_reasoning_budget_composes_with_a_forced_call(tok):
    family = family_of(tok)
    start, end = (tok.encode(m, add_special_tokens=False) for m in family.think)
    both = grammar.ThinkBudget(2, family, False, tok, forced(tok, family=family))
    assert len(ids_of(tok, "Let")) == 2 and walk(both, tok, [start[0], "Let"])
    assert only(both, tok) == end  # the budget's end marker, which the grammar accepts
    assert walk(both, tok, [end[0], "\n"])
    assert not walk(both, tok, "I will check.")  # then the call the grammar forces
    both = grammar.ThinkBudget(2, family, False, tok, forced(tok, family=family, parallel=False))
    assert walk(both, tok, [start[0], "Let", end[0], "\n" + CALL]) and eos_only(both, tok)


def test_a_response_format_keyword_that_cannot_be_enforced_is_a_400(tok):
    """response_format schemas are strict: a keyword llguidance does not implement is named in
    the 400; the same keyword in a tool's parameters is ignored (a forced call still compiles),
    and annotations (title, description, $schema, a known format) are fine."""
    for schema, word in (({"not": {"type": "string"}}, "not"),
                         ({"type": "array", "uniqueItems": True}, "uniqueItems"),
                         ({"type": "string", "format": "shoe-size"}, "shoe-size")):
        with pytest.raises(ApiError) as e:
            grammar.Constraint(grammar.json_grammar(Family("none"), False, schema, tok), tok,
                               "response_format")
        assert e.value.status == 400 and word in str(e.value), str(e.value)
    fine = {"$schema": "http://json-schema.org/draft-07/schema#", "title": "t",
            "description": "d", "type": "string", "format": "email"}
    grammar.Constraint(grammar.json_grammar(Family("none"), False, fine, tok), tok,
                       "response_format")
    loose = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}}}]
    family = Family("json_tools", None, ("<tool_call>", "</tool_call>"))
    grammar.Constraint(grammar.tool_grammar(family, False, loose, None, True, tok), tok,
                       "tool_choice")
