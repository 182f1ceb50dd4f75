"""Constrained decoding with llguidance: a forced tool call (`tool_choice` "required" or a named
function) and JSON output (`response_format` json_schema / json_object).

A request's constraint is a lark grammar that llguidance compiles against the model's
tokenizer; at each step the engine asks the Constraint which tokens may come next, samples
among those only, and tells it the token chosen (exec/engine.py). A reasoning block may come
first, free (the grammar begins after it), so a thinking model still thinks. Forced calls are
written in a JSON call format: the model family's own where it is one (`<tool_call>` JSON, the
hermes/Qwen form mlx-lm calls json_tools), else the generic form that chat.py then describes to
the model. An EOS is allowed once the grammar is complete, and only then.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np

from pipeline.serve.errors import ApiError, bad
from pipeline.serve.families import GENERIC_CALL, JSON_CALL_FAMILIES, Family
_TOKENIZERS: dict[int, object] = {}  # id(mlx-lm tokenizer) -> llguidance's (about 1 s to build)


def ll_tokenizer(tokenizer):
    """llguidance's view of an mlx-lm tokenizer (its EOS ids included), built once."""
    import llguidance.hf

    key = id(tokenizer)
    if key not in _TOKENIZERS:
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        _TOKENIZERS[key] = llguidance.hf.from_tokenizer(
            hf, eos_token=sorted(tokenizer.eos_token_ids))
    return _TOKENIZERS[key]


def _token(text: str, tokenizer) -> int | None:
    """The id of `text` when it is one token that llguidance holds special (such a token is
    matched by id, `<[id]>`, never by its text)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) == 1 and ll_tokenizer(tokenizer).is_special_token(ids[0]):
        return ids[0]
    return None


def _literal(text: str, tokenizer) -> str:
    """A marker in a lark rule: its text, or its special token where it has one (a model
    may write either: the token, or the text inside a longer token)."""
    token = _token(text, tokenizer)
    return json.dumps(text) if token is None else f"(<[{token}]> | {json.dumps(text)})"


def _think(family: Family, reasoning: bool, tokenizer) -> str:
    """Lark rules for the free reasoning block before the constrained part (`think`): up to
    the end marker, as its token or as text (a model may write it in pieces)."""
    if not family.think:
        return ""
    start, end = family.think
    rules = [f"think: {'' if reasoning else _literal(start, tokenizer) + ' '}think_body",
             f"think_text[lazy]: /(.|\\n)*{_regex(end)}/"]
    token = _token(end, tokenizer)
    if token is None:
        rules.append("think_body: think_text")
    else:
        rules += ["think_body: think_text | think_token",
                  f"think_token: /(.|\\n)*/ <[{token}]>"]
    return "\n".join(rules) + "\n"


def _regex(text: str) -> str:
    """`text` matched literally inside a lark /regex/."""
    return "".join("\\n" if c == "\n" else "\\" + c if c in "\\.+*?()|[]{}^$/-&~#" else c
                   for c in text)


# JSON as json.dumps and chat templates write it (", " and ": ", no other whitespace): a
# flexible-whitespace grammar lets a small model pad forever. Lenient: keywords llguidance does
# not implement are ignored; used for tools' parameters only (see _json).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
                "lenient": True}


def _json(schema: dict, lenient: bool = True) -> str:
    """A %json argument. A tool's parameters are lenient: they are written for the model to
    read, often with keywords no engine enforces, and refusing them would refuse an agent's
    every forced call. A response_format schema is strict: what llguidance cannot enforce
    (`not`, `if`/`then`, `uniqueItems`, an unknown `format`, ...) is a 400 naming it."""
    return json.dumps({**schema, "x-guidance": {**JSON_OPTIONS, "lenient": lenient}})


def call_schema(tools: list[dict], name: str | None) -> dict:
    """The JSON of one call: {"name": one of the tools (or `name`), "arguments": its schema}."""
    options = []
    for t in tools:
        fn = t["function"]
        if name is not None and fn["name"] != name:
            continue
        params = fn.get("parameters") or {"type": "object"}
        options.append({"type": "object", "properties": {
            "name": {"const": fn["name"]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def _head(think: str, reasoning: bool) -> str:
    """The start rule's reasoning part: required when the prompt opened the block (the
    answer is inside it), else optional."""
    if not think:
        return ""
    return "think WS " if reasoning else "think? WS "


def tool_grammar(family: Family, reasoning: bool, tools: list[dict], name: str | None,
                 parallel: bool, tokenizer) -> str:
    """A lark grammar for an answer of one or more calls (one when not `parallel`)."""
    start, end = family.call if family.name in JSON_CALL_FAMILIES else GENERIC_CALL
    start, end = _literal(start, tokenizer), _literal(end, tokenizer)
    think = _think(family, reasoning, tokenizer)
    more = ' ("\\n" call)*' if parallel else ""
    return (f"start: {_head(think, reasoning)}call{more}\n"
            f"{think}WS: /[ \\n]{{0,2}}/\n"
            f'call: {start} "\\n" call_json "\\n" {end}\n'
            f"call_json: %json {_json(call_schema(tools, name))}\n")


def json_grammar(family: Family, reasoning: bool, schema: dict, tokenizer) -> str:
    think = _think(family, reasoning, tokenizer)
    return (f"start: {_head(think, reasoning)}answer\n{think}WS: /[ \\n]{{0,2}}/\n"
            f"answer: %json {_json(schema, lenient=False)}\n")


def response_schema(body: dict) -> dict | None:
    """The JSON schema `response_format` asks for (None: free text); raises ApiError 400."""
    fmt = body.get("response_format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "object"}
    if fmt["type"] != "json_schema":
        raise bad(f"'response_format.type' must be text, json_object or json_schema, not "
                  f"{fmt['type']!r}", "response_format")
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise bad("'response_format.json_schema.schema' must be a JSON schema object",
                  "response_format")
    return schema


class Masking:
    """What the engine calls (exec/engine.py): apply(logprobs) before a sample, accept(token)
    after; a subclass says which tokens are allowed(width)."""

    def allowed(self, width: int) -> mx.array:
        raise NotImplementedError

    def apply(self, logprobs: mx.array) -> mx.array:
        """logprobs: [1, V] with every token refused at -inf."""
        mask = self.allowed(logprobs.shape[-1])
        return mx.where(mask[None], logprobs, mx.array(-mx.inf, dtype=logprobs.dtype))


class Constraint(Masking):
    """One sequence's grammar state: which tokens may come next, and the tokens chosen."""

    def __init__(self, grammar: str, tokenizer, param: str):
        import llguidance

        self.matcher = llguidance.LLMatcher(ll_tokenizer(tokenizer),
                                            llguidance.LLMatcher.grammar_from_lark(grammar),
                                            log_level=0)
        if self.matcher.is_error():
            raise ApiError(400, f"'{param}' cannot be followed: "
                           f"{self.matcher.get_error().splitlines()[0]}", param)
        self.eos = sorted(tokenizer.eos_token_ids)

    def allowed(self, width: int) -> mx.array:
        """[width] bool: the tokens that keep the answer in the grammar (past the tokenizer's
        vocabulary: never); only EOS once the grammar has nothing more to take."""
        if self.matcher.is_stopped() or self.matcher.is_error():
            mask = np.zeros(width, dtype=bool)
            mask[[t for t in self.eos if t < width]] = True
            return mx.array(mask)
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint32)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little").astype(bool)
        mask = np.zeros(width, dtype=bool)
        n = min(width, bits.size)
        mask[:n] = bits[:n]
        return mx.array(mask)

    def accept(self, token: int) -> None:
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token)


class ThinkBudget(Masking):
    """At most `budget` tokens of reasoning (Anthropic's thinking.budget_tokens): once the
    reasoning block has that many, its end marker is forced, token by token, and the answer
    goes on from there. `inner`: a grammar Constraint that also shapes the answer (its free
    reasoning block accepts the forced marker), or None."""

    WINDOW = 8  # tokens decoded again to find a marker written over several tokens

    def __init__(self, budget: int, family: Family, reasoning: bool, tokenizer,
                 inner: Constraint | None = None):
        self.budget, self.tokenizer, self.inner = budget, tokenizer, inner
        self.start, self.end = family.think
        self.end_ids = tokenizer.encode(self.end, add_special_tokens=False)
        self.state = "inside" if reasoning else "before"  # then "forcing", "after"
        self.count = 0  # reasoning tokens so far
        self.forced = 0  # end-marker tokens forced so far
        self.recent: list[int] = []  # the latest tokens (the whole answer while "before")

    def allowed(self, width: int) -> mx.array:
        if self.state == "forcing":
            mask = np.zeros(width, dtype=bool)
            mask[self.end_ids[self.forced]] = True
            return mx.array(mask)
        if self.inner is not None:
            return self.inner.allowed(width)
        return mx.array(np.ones(width, dtype=bool))

    def accept(self, token: int) -> None:
        if self.inner is not None:
            self.inner.accept(token)
        if self.state == "after":
            return
        self.recent.append(token)
        if self.state != "before":  # (while "before" the answer is a few tokens long)
            self.recent = self.recent[-self.WINDOW:]
        text = self.tokenizer.decode(self.recent)
        if self.state == "before":
            head = text.lstrip()
            if head.startswith(self.start):
                self.state, self.recent = "inside", []
            elif not self.start.startswith(head):  # the answer does not start with reasoning
                self.state = "after"
        elif self.state == "inside":
            self.count += 1
            if self.end in text:
                self.state = "after"
            elif self.count >= self.budget:
                self.state = "forcing"
        elif self.state == "forcing":
            self.forced += 1
            if self.forced == len(self.end_ids):
                self.state = "after"
