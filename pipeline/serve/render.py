"""The JSON objects sent back: OpenAI chat completions and (legacy) completions, whole or as
stream chunks, with reasoning, tool calls and logprobs. Pure functions over plain data."""

from __future__ import annotations

import time
import uuid

from pipeline.serve.logprobs import chat_logprobs, completion_logprobs


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage; cached_tokens: prompt tokens the prompt cache gave (not prefilled)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def models(model: str, created: int, context: int) -> dict:
    """The model list in OpenAI's shape and Anthropic's at once (their fields do not clash)."""
    entry = {"id": model, "object": "model", "created": created, "owned_by": "pipeline",
             "context_length": context, "type": "model", "display_name": model,
             "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))}
    return {"object": "list", "data": [entry], "has_more": False, "first_id": model,
            "last_id": model}


def _envelope(kind: str, rid: str, created: int, model: str, chunk: bool) -> dict:
    obj = "chat.completion" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj + (".chunk" if chunk and kind == "chat" else ""),
            "created": created, "model": model}


def tool_call(call: dict, index: int | None = None) -> dict:
    """A call {id, name, arguments} as OpenAI's tool_calls item (streamed: with its index)."""
    out = {"id": call["id"], "type": "function",
           "function": {"name": call["name"], "arguments": call["arguments"]}}
    return out if index is None else {"index": index, **out}


def call_deltas(call: dict, index: int) -> list[dict]:
    """A streamed call in two deltas: index, id, type and name first (some clients need them
    together, before any argument), then the arguments."""
    return [{"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                             "function": {"name": call["name"], "arguments": ""}}]},
            {"tool_calls": [{"index": index, "function": {"arguments": call["arguments"]}}]}]


def _logprobs(kind: str, entries: list[dict] | None, offset: int) -> dict | None:
    if entries is None:
        return None
    return chat_logprobs(entries) if kind == "chat" else completion_logprobs(entries, offset)


def chunk(kind: str, rid: str, created: int, model: str, delta: dict | None = None,
          finish_reason: str | None = None, logprobs: list[dict] | None = None,
          offset: int = 0, errors: list[str] | None = None) -> dict:
    """One streamed event. Chat: `delta` as OpenAI's (role, content, reasoning_content,
    tool_calls); completions: delta {"content": text}. `offset`: a completion's text so far
    (for text_offset); `errors`: tool calls that did not parse (their text is in the delta)."""
    out = _envelope(kind, rid, created, model, True)
    delta = delta or {}
    choice = {"index": 0}
    if kind == "chat":
        choice["delta"] = delta
    else:
        choice["text"] = delta.get("content", "")
    choice.update(logprobs=_logprobs(kind, logprobs, offset), finish_reason=finish_reason)
    if errors:
        choice["tool_call_errors"] = errors
    out["choices"] = [choice]
    return out


def usage_chunk(kind: str, rid: str, created: int, model: str, usage_: dict) -> dict:
    """The final usage event of a stream with include_usage (no choices)."""
    return {**_envelope(kind, rid, created, model, True), "choices": [], "usage": usage_}


def response(kind: str, rid: str, created: int, model: str, text: str, finish_reason: str,
             usage_: dict, reasoning: str = "", calls: list[dict] | None = None,
             logprobs: list[dict] | None = None, errors: list[str] | None = None) -> dict:
    """A whole answer; a chat's content is null when the answer is only calls."""
    out = _envelope(kind, rid, created, model, False)
    choice = {"index": 0}
    if kind == "chat":
        message = {"role": "assistant", "content": text if text or not calls else None}
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = [tool_call(c) for c in calls]
        choice["message"] = message
    else:
        choice["text"] = text
    choice.update(logprobs=_logprobs(kind, logprobs, 0), finish_reason=finish_reason)
    if errors:
        choice["tool_call_errors"] = errors
    out.update(choices=[choice], usage=usage_)
    return out
