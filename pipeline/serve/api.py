"""OpenAI-style request bodies -> what the engine runs, and the JSON objects sent back.

Pure functions over plain data (no I/O, no MPI): every refusal is an ApiError that the HTTP
layer turns into a status code and an OpenAI-style body `{"error": {"message", "type",
"param", "code"}}`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from pipeline.model.prompt import encode, wants_chat

MAX_STOPS = 16  # OpenAI allows 4; more costs nothing here
ROLES = {"system", "user", "assistant", "developer"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


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


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


def _number(body: dict, name: str, default, lo: float, hi: float, *, low_open: bool = False,
            integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise _bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got "
                   f"{value!r}", name)
    if value < lo or (low_open and value == lo) or value > hi:
        interval = f"{'(' if low_open else '['}{lo}, {hi}]"
        raise _bad(f"'{name}' is {value}: it must be in {interval}", name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"'{name}' must be true or false, got {value!r}", name)
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)
            or len(stops) > MAX_STOPS):
        raise _bad(f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} "
                   f"non-empty strings", "stop")
    return stops


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text is understood
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise _bad(f"messages[{i}].content: only text parts are supported",
                           f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    if content is None and message.get("role") == "assistant":
        return ""
    raise _bad(f"messages[{i}].content must be a string or a list of text parts",
               f"messages[{i}].content")


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _bad(f"messages[{i}] needs a role among {', '.join(sorted(ROLES))}",
                       f"messages[{i}].role")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _content(m, i)})
    return out


def _completion_prompt(body: dict, tokenizer, vocab: int) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("'prompt' is empty", "prompt")
        return encode(tokenizer, [{"role": "user", "content": prompt}], False)
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < vocab for t in prompt):
            raise _bad(f"'prompt' holds token ids outside [0, {vocab})", "prompt")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise _bad("one prompt per request: send the others as separate requests", "prompt")
    raise _bad("'prompt' must be a string or a list of token ids", "prompt")


def parse(body, kind: str, tokenizer, context: int, default_max_tokens: int,
          vocab: int) -> Request:
    """Check a request body and tokenize its prompt; raises ApiError (400) on anything wrong."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise _bad("'model' must be a string", "model")
    if _number(body, "n", 1, 1, 1, integer=True) != 1:
        raise _bad("'n' must be 1", "n")
    if body.get("logprobs") not in (None, False, 0) or body.get("echo"):
        raise _bad("logprobs and echo are not supported", "logprobs")
    req = Request(
        kind=kind, prompt=[], max_tokens=0,
        temp=float(_number(body, "temperature", 1.0, 0, 2)),
        top_p=float(_number(body, "top_p", 1.0, 0, 1, low_open=True)),
        min_p=float(_number(body, "min_p", 0.0, 0, 1)),
        seed=_number(body, "seed", None, -2**63, 2**64 - 1, integer=True),
        ignore_eos=_flag(body, "ignore_eos"),  # an extension (as vLLM's): for benchmarks
        stop=_stops(body), stream=_flag(body, "stream"),
    )
    if req.min_p == 1:
        raise _bad("'min_p' is 1: it must be in [0, 1)", "min_p")
    if req.seed is not None:
        req.seed %= 2**64  # mlx's random keys are unsigned
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    req.include_usage = bool(options and options.get("include_usage"))
    name = "max_tokens" if body.get("max_completion_tokens") is None else "max_completion_tokens"
    max_tokens = _number(body, name, None, 1, 10**9, integer=True)

    if kind == "chat":
        from jinja2 import TemplateError

        param, messages = "messages", chat_messages(body)
        try:
            req.prompt = encode(tokenizer, messages, wants_chat(tokenizer, None))
        except (TemplateError, ValueError) as e:  # e.g. a template without a system role
            raise _bad(f"the model's chat template refused these messages: {e}", "messages")
    else:
        param, req.prompt = "prompt", _completion_prompt(body, tokenizer, vocab)
    if not req.prompt:
        raise _bad("the prompt is empty after tokenization", param)
    if len(req.prompt) >= context:
        raise ApiError(400, f"this model's context window is {context} tokens and the prompt "
                       f"has {len(req.prompt)}: shorten it", param, "context_length_exceeded")
    room = context - len(req.prompt)
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f"this model's context window is {context} tokens: the prompt has "
                       f"{len(req.prompt)} and {max_tokens} more were asked for ({name}); ask "
                       f"for at most {room}", name, "context_length_exceeded")
    req.max_tokens = max_tokens if max_tokens is not None else min(default_max_tokens, room)
    return req


# -- responses ---------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _choice(kind: str, text: str | None, finish_reason: str | None, delta: bool,
            first: bool = False) -> dict:
    if kind == "completion":
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    if delta:
        d = {"role": "assistant", "content": ""} if first else (
            {"content": text} if text else {})
        return {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish_reason}
    return {"index": 0, "message": {"role": "assistant", "content": text},
            "logprobs": None, "finish_reason": finish_reason}


def _envelope(kind: str, rid: str, created: int, model: str, chunk: bool) -> dict:
    obj = "chat.completion" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj + (".chunk" if chunk and kind == "chat" else ""),
            "created": created, "model": model}


def chunk(kind: str, rid: str, created: int, model: str, text: str | None = None,
          finish_reason: str | None = None, first: bool = False,
          usage_: dict | None = None) -> dict:
    """One streamed event; `usage_` alone makes the final usage event (no choices)."""
    out = _envelope(kind, rid, created, model, True)
    if usage_ is not None:
        out.update(choices=[], usage=usage_)
    else:
        out["choices"] = [_choice(kind, text, finish_reason, True, first)]
    return out


def response(kind: str, rid: str, created: int, model: str, text: str, finish_reason: str,
             usage_: dict) -> dict:
    out = _envelope(kind, rid, created, model, False)
    out.update(choices=[_choice(kind, text, finish_reason, False)], usage=usage_)
    return out


def models(model: str, created: int, context: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                        "owned_by": "pipeline", "context_length": context}]}


def now() -> int:
    return int(time.time())


class StopText:
    """Cuts streamed text at the first stop string, holding back a tail that could still
    become one, so no part of a stop string is ever sent."""

    def __init__(self, stops: list[str]):
        self.stops, self.held = stops, ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
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
