"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`): what Claude Code
and the `anthropic` SDK speak.

A Messages body is translated into a chat body (system, content blocks, tool_use/tool_result,
tools with input_schema, tool_choice, thinking) and then parsed exactly as a chat completion
is (api.parse): the same prompt, sampler and output state machine, so the three APIs give the
same answer to the same conversation. The answer's blocks (blocks.py) come back as Anthropic's
content blocks, whole or in its event grammar (message_start, content_block_start/delta/stop,
message_delta, message_stop, ping while waiting). Errors use Anthropic's shape and types.
"""

from __future__ import annotations

import json
import uuid

from pipeline.serve import api, blocks
from pipeline.serve.chat import chat_prompt
from pipeline.serve.errors import ApiError, bad, unsupported

BILLING_HEADER = "x-anthropic-billing-header:"  # Claude Code's per-request system line
PING_S = 10.0  # a ping event this often while nothing else is sent
STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}  # else end_turn/stop_sequence
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
               413: "request_too_large", 429: "overloaded_error", 503: "overloaded_error",
               529: "overloaded_error"}
OVERLOADED = 529  # Anthropic's status for "try again later" (the queue is full, or closing)


def new_id(prefix: str = "msg_") -> str:
    return prefix + uuid.uuid4().hex[:24]


def error(e: ApiError) -> tuple[int, dict]:
    """(status, body) in Anthropic's shape: {"type": "error", "error": {"type", "message"}}."""
    status = OVERLOADED if e.status in (429, 503) else e.status
    kind = ERROR_TYPES.get(e.status, "api_error" if e.status >= 500 else "invalid_request_error")
    return status, {"type": "error", "error": {"type": kind, "message": e.message}}


# -- request -> chat body -------------------------------------------------------------------
def _system(system) -> str | None:
    if system is None:
        return None
    if isinstance(system, str):
        text = system
    elif isinstance(system, list) and all(
            isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
            for b in system):
        text = "\n\n".join(b["text"] for b in system)
    else:
        raise bad("'system' must be a string or a list of text blocks", "system")
    # Claude Code's first system line changes every request: dropped, so the prefix stays.
    lines = [line for line in text.split("\n") if not line.startswith(BILLING_HEADER)]
    return "\n".join(lines).strip("\n")


def _blocks_of(content, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise bad(f"{where} must be a string or a list of content blocks", where)
    return content


def _result_text(block: dict, where: str) -> str:
    content = block.get("content", "")
    if isinstance(content, str):
        text = content
    else:
        parts = []
        for j, part in enumerate(_blocks_of(content, f"{where}.content")):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}.content[{j}]: a tool result holds text blocks only (this "
                          f"model reads text)", f"{where}.content")
            parts.append(part["text"])
        text = "\n".join(parts)
    return ("Error: " + text) if block.get("is_error") else text


def _user(content, i: int, called: set[str]) -> list[dict]:
    """A user turn: its tool results (as tool messages, first) and its text."""
    out, text = [], []
    for j, b in enumerate(_blocks_of(content, f"messages[{i}].content")):
        where, kind = f"messages[{i}].content[{j}]", b.get("type")
        if kind == "text" and isinstance(b.get("text"), str):
            text.append(b["text"])
        elif kind == "tool_result":
            cid = b.get("tool_use_id")
            if not isinstance(cid, str) or cid not in called:
                raise bad(f"{where}: tool_result.tool_use_id {cid!r} answers no tool_use of an "
                          f"earlier assistant message", f"{where}.tool_use_id")
            out.append({"role": "tool", "tool_call_id": cid, "content": _result_text(b, where)})
        elif kind in ("image", "document"):
            raise bad(f"{where}: this model reads text only: a {kind} block cannot be given to "
                      f"it", where)
        else:
            raise bad(f"{where}: a user message holds text, tool_result, image or document "
                      f"blocks, not {kind!r}", where)
    if text:
        out.append({"role": "user", "content": "\n\n".join(text)})
    return out


def _assistant(content, i: int, called: set[str]) -> dict:
    text, reasoning, calls = [], [], []
    for j, b in enumerate(_blocks_of(content, f"messages[{i}].content")):
        where, kind = f"messages[{i}].content[{j}]", b.get("type")
        if kind == "text" and isinstance(b.get("text"), str):
            text.append(b["text"])
        elif kind == "thinking" and isinstance(b.get("thinking"), str):
            reasoning.append(b["thinking"])
        elif kind == "redacted_thinking":
            continue  # nothing readable in it
        elif kind == "tool_use":
            if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str) or (
                    not isinstance(b.get("input"), dict)):
                raise bad(f"{where}: a tool_use block needs an id, a name and an input object",
                          where)
            calls.append({"id": b["id"], "type": "function",
                          "function": {"name": b["name"], "arguments": b["input"]}})
            called.add(b["id"])
        else:
            raise bad(f"{where}: an assistant message holds text, thinking or tool_use "
                      f"blocks, not {kind!r}", where)
    msg = {"role": "assistant", "content": "".join(text)}
    if reasoning:
        msg["reasoning_content"] = "\n".join(reasoning)
    if calls:
        msg["tool_calls"] = calls
    return msg


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    out, called = [], set()
    system = _system(body.get("system"))
    if system:
        out.append({"role": "system", "content": system})
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise bad(f"messages[{i}].role must be \"user\" or \"assistant\"",
                      f"messages[{i}].role")
        if m["role"] == "user":
            out += _user(m.get("content"), i, called)
        else:
            out.append(_assistant(m.get("content"), i, called))
    if messages[-1]["role"] == "assistant":
        raise unsupported("messages", "a final assistant message (prefilling the answer)")
    return out


def _tools(body: dict, notes: list[str]) -> tuple[list | None, object, bool | None]:
    """(OpenAI tools, tool_choice, parallel_tool_calls). Anthropic's server tools (web_search,
    code_execution, ...: a `type` other than custom) are left out of the prompt, and `notes`
    says so: this server cannot run them."""
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise bad("'tools' must be a list of {name, description, input_schema}", "tools")
    out, left = [], []
    for i, t in enumerate(tools or []):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise bad(f"tools[{i}] must be {{name, description, input_schema}}", f"tools[{i}]")
        if t.get("type") not in (None, "custom"):
            left.append(f"{t['type']} {t['name']!r}")
            continue
        if not isinstance(t.get("input_schema"), dict):
            raise bad(f"tools[{i}].input_schema must be a JSON schema object",
                      f"tools[{i}].input_schema")
        fn = {"name": t["name"], "parameters": t["input_schema"]}
        if isinstance(t.get("description"), str):
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    if left:
        notes.append(f"Messages API: left out of the prompt the server tools this server "
                     f"cannot run: {', '.join(left)}")
    choice = body.get("tool_choice")
    if choice is None:
        return out or None, None, None
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise bad("'tool_choice' must be {type: auto | any | tool | none}", "tool_choice")
    parallel = None if choice.get("disable_parallel_tool_use") is None else not choice[
        "disable_parallel_tool_use"]
    if choice["type"] == "tool":
        if not isinstance(choice.get("name"), str):
            raise bad("'tool_choice' {type: tool} needs the tool's name", "tool_choice")
        return out or None, {"type": "function", "function": {"name": choice["name"]}}, parallel
    return out or None, {"any": "required"}.get(choice["type"], choice["type"]), parallel


def _thinking(body: dict) -> dict:
    thinking = body.get("thinking")
    if thinking is None:
        return {}
    if not isinstance(thinking, dict) or thinking.get("type") not in (
            "enabled", "disabled", "adaptive"):
        raise bad("'thinking' must be {type: enabled, budget_tokens} or {type: disabled}",
                  "thinking")
    return {"enable_thinking": thinking["type"] != "disabled"}


def _budget(body: dict) -> int | None:
    """thinking.budget_tokens: the most reasoning tokens (enforced: see grammar.ThinkBudget)."""
    thinking = body.get("thinking")
    if not isinstance(thinking, dict) or thinking.get("type") != "enabled":
        return None
    budget = thinking.get("budget_tokens")
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise bad("'thinking.budget_tokens' must be a positive integer", "thinking")
    return budget


def to_chat(body, *, counting: bool = False, notes: list[str] | None = None) -> dict:
    """The chat completions body a Messages body means (raises ApiError 400); `notes` gets
    what the server's log should say once (tools left out)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    if not counting and body.get("max_tokens") is None:
        raise bad("'max_tokens' is required", "max_tokens")
    tools, choice, parallel = _tools(body, [] if notes is None else notes)
    chat = {"model": body.get("model"), "messages": _messages(body),
            "chat_template_kwargs": _thinking(body)}
    for ours, theirs in (("tools", tools), ("tool_choice", choice),
                         ("parallel_tool_calls", parallel), ("stop", body.get("stop_sequences")),
                         ("thinking_budget", _budget(body))):
        if theirs is not None:
            chat[ours] = theirs
    for name in ("max_tokens", "temperature", "top_p", "top_k", "stream"):
        if body.get(name) is not None:
            chat[name] = body[name]
    return chat


def parse(body, state) -> api.Request:
    notes: list[str] = []
    chat = to_chat(body, notes=notes)
    for line in notes:
        state.note(line)
    return api.parse(chat, "chat", state.tokenizer, state.context, state.max_tokens,
                     state.vocab, clamp=True)


def count_tokens(body, state) -> dict:
    chat = to_chat(body, counting=True)
    return {"input_tokens": len(chat_prompt(chat, state.tokenizer).ids)}


# -- answer -> response ---------------------------------------------------------------------
def _stop(job) -> tuple[str, str | None]:
    matched = job.stops.matched
    if matched is not None:
        return "stop_sequence", matched
    return STOP_REASONS.get(job.finish_reason, "end_turn"), None


def _usage(job) -> dict:
    cached = job.cached_tokens()
    return {"input_tokens": len(job.req.prompt) - cached, "output_tokens": job.tokens,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def _block(b: blocks.Block) -> dict:
    if b.kind == blocks.REASONING:
        return {"type": "thinking", "thinking": b.text, "signature": ""}
    if b.kind == blocks.TEXT:
        return {"type": "text", "text": b.text}
    return {"type": "tool_use", "id": _tool_id(b.call), "name": b.call["name"],
            "input": blocks.arguments(b.call)}


def _tool_id(call: dict) -> str:
    return "toolu_" + call["id"].removeprefix("call_")


def _message(rid: str, model: str, content: list, stop: tuple, usage: dict) -> dict:
    return {"id": rid, "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop[0], "stop_sequence": stop[1], "usage": usage}


def whole(job, pieces: list, rid: str, created: int, model: str) -> dict:
    content = [_block(b) for b in blocks.collect(pieces)]
    return _message(rid, model, content, _stop(job), _usage(job))


def _event(kind: str, **data) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


def _start(step: blocks.Step) -> dict:
    if step.kind == blocks.REASONING:
        return {"type": "thinking", "thinking": "", "signature": ""}
    if step.kind == blocks.TEXT:
        return {"type": "text", "text": ""}
    return {"type": "tool_use", "id": _tool_id(step.call), "name": step.call["name"],
            "input": {}}


DELTAS = {blocks.REASONING: ("thinking_delta", "thinking"), blocks.TEXT: ("text_delta", "text"),
          blocks.CALL: ("input_json_delta", "partial_json")}


async def events(job, rid: str, created: int, model: str):
    """The answer in Anthropic's event grammar."""
    start = _message(rid, model, [], (None, None), {**_usage(job), "output_tokens": 0})
    yield _event("message_start", message=start)
    state = blocks.Blocks()
    async for piece in blocks.with_pings(job.pieces(), PING_S):
        if piece is None:
            yield _event("ping")
            continue
        for step in state.feed(piece):
            yield _step(step)
    for step in state.finish():
        yield _step(step)
    if job.seq.finish_reason == "interrupted":
        _, body = error(ApiError(503, "the server is shutting down"))
        yield _event("error", error=body["error"])
        return
    reason, sequence = _stop(job)
    yield _event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                 usage={"output_tokens": job.tokens})
    yield _event("message_stop")


def _step(step: blocks.Step) -> str:
    if step.what == "start":
        return _event("content_block_start", index=step.index, content_block=_start(step))
    if step.what == "stop":
        return _event("content_block_stop", index=step.index)
    kind, field = DELTAS[step.kind]
    return _event("content_block_delta", index=step.index,
                  delta={"type": kind, field: step.text})
