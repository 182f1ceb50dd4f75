"""OpenAI-style request bodies -> what the engine runs (the responses: render.py).

Pure functions over plain data (no I/O, no MPI): every refusal is an ApiError that the HTTP
layer turns into a status code and an OpenAI-style body `{"error": {"message", "type",
"param", "code"}}`. The rule for fields: unknown ones are ignored; a known one that would
change the output and is not supported is a 400 naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.model.prompt import encode
from pipeline.serve.chat import ChatPrompt, chat_prompt
from pipeline.serve.errors import ApiError, bad, unsupported

MAX_STOPS = 16  # OpenAI allows 4; more costs nothing here
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat (its completions allow 5)


@dataclass
class Request:
    """One parsed generation request."""
    kind: str  # "chat" or "completion"
    prompt: list[int]
    max_tokens: int
    temp: float = 1.0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # each token's log-probability and this many alternatives
    chat: ChatPrompt | None = None  # a chat's tools, reasoning and call markers
    constraint: object | None = None  # grammar.Constraint: the tokens allowed at each step


def _number(body: dict, name: str, default, lo: float, hi: float, *, low_open: bool = False,
            integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got "
                   f"{value!r}", name)
    if value != value or value < lo or (low_open and value == lo) or value > hi:  # NaN too
        interval = f"{'(' if low_open else '['}{lo}, {hi}]"
        raise bad(f"'{name}' is {value}: it must be in {interval}", name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {value!r}", name)
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)
            or len(stops) > MAX_STOPS):
        raise bad(f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} "
                   f"non-empty strings", "stop")
    return stops


def _logprobs(body: dict, kind: str) -> int | None:
    """How many alternatives per token (None: no logprobs): chat's `logprobs` true with
    `top_logprobs`, completions' `logprobs` N."""
    if kind == "completion":
        return _number(body, "logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    top = _number(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    if not _flag(body, "logprobs"):
        if top:
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return None
    return top or 0


def _refuse_unsupported(body: dict, kind: str) -> None:
    """A 400 for each field that would change the output in a way this server cannot."""
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0, -2, 2):
            raise unsupported(name, f"a non-zero {name}")
    if _number(body, "repetition_penalty", 1, 0, 10, low_open=True) != 1:
        raise unsupported("repetition_penalty", "a repetition penalty other than 1")
    if _number(body, "top_k", 0, -1, 2**31, integer=True) > 0:
        raise unsupported("top_k", "top-k sampling (use top_p or min_p)")
    bias = body.get("logit_bias")
    if bias is not None and not isinstance(bias, dict):
        raise bad("'logit_bias' must be an object of token id -> bias", "logit_bias")
    if bias and any(v != 0 for v in bias.values()):
        raise unsupported("logit_bias", "logit_bias")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and isinstance(fmt.get("type"), str)):
        raise bad("'response_format' must be an object with a 'type'", "response_format")
    if body.get("echo"):
        raise unsupported("echo", "echoing the prompt")
    if _number(body, "best_of", 1, 1, 1 if kind == "chat" else 2**31, integer=True) != 1:
        raise unsupported("best_of", "best_of above 1")
    if body.get("suffix"):
        raise unsupported("suffix", "a suffix (insertion)")
    if body.get("modalities") not in (None, ["text"]) or body.get("audio") is not None:
        raise unsupported("modalities" if body.get("audio") is None else "audio",
                          "any output but text")


def _completion_prompt(body: dict, tokenizer, vocab: int) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad("'prompt' is empty", "prompt")
        return encode(tokenizer, [{"role": "user", "content": prompt}], False)
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < vocab for t in prompt):
            raise bad(f"'prompt' holds token ids outside [0, {vocab})", "prompt")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise bad("one prompt per request: send the others as separate requests", "prompt")
    raise bad("'prompt' must be a string or a list of token ids", "prompt")


def _constraint(body: dict, chat: ChatPrompt | None, tokenizer):
    """What shapes the answer token by token: the grammar a forced tool call or a JSON
    response_format puts on it, and a reasoning budget (`thinking_budget`, an extension that
    Anthropic's thinking.budget_tokens becomes)."""
    from pipeline.serve import grammar
    from pipeline.serve.families import Family

    family, reasoning = (chat.family, chat.reasoning) if chat else (Family("none"), False)
    budget = _number(body, "thinking_budget", None, 1, 10**9, integer=True)
    shape = None
    if chat is not None and chat.force:
        if body.get("response_format") and body["response_format"].get("type") != "text":
            raise bad("'response_format' and a forced 'tool_choice' cannot both shape the "
                      "answer", "response_format")
        shape = grammar.Constraint(grammar.tool_grammar(
            family, reasoning, chat.tools, chat.force_name, chat.parallel, tokenizer),
            tokenizer, "tool_choice")
    elif (schema := grammar.response_schema(body)) is not None:
        shape = grammar.Constraint(grammar.json_grammar(family, reasoning, schema, tokenizer),
                                   tokenizer, "response_format")
    if budget is not None and family.think:  # (a model that does not reason: no budget)
        return grammar.ThinkBudget(budget, family, reasoning, tokenizer, shape)
    return shape


def parse(body, kind: str, tokenizer, context: int, default_max_tokens: int,
          vocab: int, clamp: bool = False) -> Request:
    """Check a request body and tokenize its prompt; raises ApiError (400) on anything wrong.
    `clamp`: a max_tokens beyond the context window is cut to what fits instead (agent clients
    ask for 32000 whatever the model)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise bad("'model' must be a string", "model")
    if _number(body, "n", 1, 1, 1, integer=True) != 1:
        raise bad("'n' must be 1", "n")
    _refuse_unsupported(body, kind)
    req = Request(
        kind=kind, prompt=[], max_tokens=0,
        temp=float(_number(body, "temperature", 1.0, 0, 2)),
        top_p=float(_number(body, "top_p", 1.0, 0, 1, low_open=True)),
        min_p=float(_number(body, "min_p", 0.0, 0, 1)),
        seed=_number(body, "seed", None, -2**63, 2**64 - 1, integer=True),
        ignore_eos=_flag(body, "ignore_eos"),  # an extension (as vLLM's): for benchmarks
        stop=_stops(body), stream=_flag(body, "stream"), logprobs=_logprobs(body, kind),
    )
    if req.min_p == 1:
        raise bad("'min_p' is 1: it must be in [0, 1)", "min_p")
    if req.seed is not None:
        req.seed %= 2**64  # mlx's random keys are unsigned
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    req.include_usage = bool(options and options.get("include_usage"))
    name = "max_tokens" if body.get("max_completion_tokens") is None else "max_completion_tokens"
    max_tokens = _number(body, name, None, 1, 10**9, integer=True)

    if kind == "chat":
        param, req.chat = "messages", chat_prompt(body, tokenizer)
        req.prompt = req.chat.ids
    else:
        param, req.prompt = "prompt", _completion_prompt(body, tokenizer, vocab)
    if not req.prompt:
        raise bad("the prompt is empty after tokenization", param)
    req.constraint = _constraint(body, req.chat, tokenizer)
    if len(req.prompt) >= context:
        raise ApiError(400, f"this model's context window is {context} tokens and the prompt "
                       f"has {len(req.prompt)}: shorten it", param, "context_length_exceeded")
    room = context - len(req.prompt)
    if clamp and max_tokens is not None:
        max_tokens = min(max_tokens, room)
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f"this model's context window is {context} tokens: the prompt has "
                       f"{len(req.prompt)} and {max_tokens} more were asked for ({name}); ask "
                       f"for at most {room}", name, "context_length_exceeded")
    req.max_tokens = max_tokens if max_tokens is not None else min(default_max_tokens, room)
    return req


class StopText:
    """Cuts streamed text at the first stop string, holding back a tail that could still
    become one, so no part of a stop string is ever sent."""

    def __init__(self, stops: list[str]):
        self.stops, self.held = stops, ""
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [(i, s) for i, s in ((buf.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            at, self.matched = min(hits, key=lambda h: h[0])
            return buf[:at], True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self.held = buf[len(buf) - keep:]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held
