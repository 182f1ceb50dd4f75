"""OpenAI's Responses API (`POST /v1/responses`): what Codex CLI and the newer `openai` SDK
features speak. Stateless: nothing is stored, so `previous_response_id` is refused.

As with the Messages API (anthropic.py), a Responses body is translated into a chat body
(instructions, input items: messages, function_call, function_call_output, reasoning; function
tools; tool_choice; text.format; reasoning.effort) and parsed as a chat completion is. The
answer's blocks come back as output items (reasoning, message, function_call), whole or as the
API's events, each with its sequence_number.
"""

from __future__ import annotations

import json
import uuid

from pipeline.serve import api, blocks
from pipeline.serve.errors import ApiError, bad, unsupported

TEXT_PARTS = ("input_text", "output_text", "text")
ROLES = ("user", "assistant", "system", "developer")


def new_id(prefix: str = "resp_") -> str:
    return prefix + uuid.uuid4().hex[:24]


# -- request -> chat body -------------------------------------------------------------------
def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(f"{where} must be a string or a list of text parts", where)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_image", "input_file", "input_audio"):
            raise bad(f"{where}[{j}]: this model reads text only: an {kind} part cannot be "
                      f"given to it", f"{where}[{j}]")
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise bad(f"{where}[{j}] must be an input_text or output_text part", f"{where}[{j}]")
        parts.append(part["text"])
    return "".join(parts)


def _items(body: dict) -> list[dict]:
    """The conversation as chat messages: instructions, then the input items in order."""
    out, called, reasoning = [], set(), None
    if body.get("instructions") is not None:
        if not isinstance(body["instructions"], str):
            raise bad("'instructions' must be a string", "instructions")
        out.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise bad("'input' must be a string or a non-empty list of items", "input")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            if item.get("role") not in ROLES:
                raise bad(f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role")
            msg = {"role": item["role"], "content": _text(item.get("content"),
                                                          f"{where}.content")}
            if msg["role"] == "assistant" and reasoning is not None:
                msg["reasoning_content"], reasoning = reasoning, None
            out.append(msg)
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise bad(f"{where}: a function_call needs call_id, name and arguments "
                          f"(a JSON string)", where)
            last = out[-1] if out else None  # an assistant's text and calls: one message
            if not (last and last["role"] == "assistant"):
                last = {"role": "assistant", "content": ""}
                if reasoning is not None:
                    last["reasoning_content"], reasoning = reasoning, None
                out.append(last)
            last.setdefault("tool_calls", []).append({"id": item["call_id"], "type": "function", "function": {
                "name": item["name"], "arguments": item["arguments"]}})
            called.add(item["call_id"])
        elif kind == "function_call_output":
            cid = item.get("call_id")
            if not isinstance(cid, str) or cid not in called:
                raise bad(f"{where}: function_call_output.call_id {cid!r} answers no earlier "
                          f"function_call", f"{where}.call_id")
            out.append({"role": "tool", "tool_call_id": cid,
                        "content": _text(item.get("output", ""), f"{where}.output")})
        elif kind == "reasoning":
            texts = [p.get("text", "") for p in (item.get("content") or item.get("summary") or [])
                     if isinstance(p, dict)]
            reasoning = "\n".join(t for t in texts if isinstance(t, str))
        elif kind == "item_reference":
            raise unsupported(where, "an item_reference (nothing is stored: send the item)")
        else:
            raise bad(f"{where}: an input item is a message, function_call, "
                      f"function_call_output or reasoning, not {kind!r}", where)
    return out


def _tools(body: dict, notes: list[str]) -> list | None:
    """The function tools, in chat's form. Tools of other types (hosted ones such as
    web_search, Codex's namespace groups) are left out of the prompt, and `notes` says so:
    agent clients send them with every request, and a 400 would refuse every request."""
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad("'tools' must be a list of {type: function, name, parameters}", "tools")
    out, left = [], []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("type"), str):
            raise bad(f"tools[{i}] must be an object with a type", f"tools[{i}]")
        if t["type"] != "function":
            left.append(f"{t['type']} {t['name']!r}" if isinstance(t.get("name"), str)
                        else t["type"])
            continue
        if not isinstance(t.get("name"), str) or not t["name"]:
            raise bad(f"tools[{i}] needs a name", f"tools[{i}].name")
        fn = {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}
        out.append({"type": "function", "function": fn})
    if left:
        notes.append(f"Responses API: left out of the prompt the tools this server cannot "
                     f"offer (only function tools can be): {', '.join(left)}")
    return out


def _tool_choice(choice):
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _format(fmt):
    """text.format as chat's response_format (Responses puts the schema at the top level)."""
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and "json_schema" not in fmt:
        return {"type": "json_schema", "json_schema": {
            k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
    return fmt


def to_chat(body, notes: list[str] | None = None) -> dict:
    """The chat completions body a Responses body means (raises ApiError 400); `notes` gets
    what the server's log should say once (tools left out)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    for name, why in (("previous_response_id", "this server stores no responses: send the "
                       "whole conversation in 'input'"),
                      ("conversation", "this server stores no conversations: send the whole "
                       "conversation in 'input'")):
        if body.get(name) is not None:
            raise ApiError(400, f"'{name}': {why}", name, "unsupported_parameter")
    if body.get("background"):
        raise unsupported("background", "a background response")
    chat = {"model": body.get("model"), "messages": _items(body)}
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if fmt is not None:
        chat["response_format"] = _format(fmt)
    effort = (body.get("reasoning") or {}).get("effort") if isinstance(
        body.get("reasoning"), dict) else None
    if effort is not None:
        chat["reasoning_effort"] = effort
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    tools = _tools(body, [] if notes is None else notes)
    if tools:
        chat["tools"] = tools
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    for name in ("temperature", "top_p", "parallel_tool_calls", "stream"):
        if body.get(name) is not None:
            chat[name] = body[name]
    return chat


def parse(body, state) -> api.Request:
    notes: list[str] = []
    chat = to_chat(body, notes)
    for line in notes:
        state.note(line)
    return api.parse(chat, "chat", state.tokenizer, state.context, state.max_tokens,
                     state.vocab, clamp=True)


# -- answer -> response ---------------------------------------------------------------------
class Items:
    """The output items of one response, their ids fixed as they are first named."""

    def __init__(self):
        self.ids: dict[int, str] = {}

    def id(self, index: int, kind: str) -> str:
        prefix = {blocks.REASONING: "rs_", blocks.TEXT: "msg_", blocks.CALL: "fc_"}[kind]
        return self.ids.setdefault(index, new_id(prefix))

    def item(self, index: int, b: blocks.Block, done: bool = True) -> dict:
        status = "completed" if done else "in_progress"
        rid = self.id(index, b.kind)
        text = b.text if done else ""
        if b.kind == blocks.REASONING:
            return {"type": "reasoning", "id": rid, "summary": [], "status": status,
                    "content": [{"type": "reasoning_text", "text": text}] if done else []}
        if b.kind == blocks.TEXT:
            return {"type": "message", "id": rid, "role": "assistant", "status": status,
                    "content": [_part(text)] if done else []}
        return {"type": "function_call", "id": rid, "call_id": b.call["id"],
                "name": b.call["name"], "arguments": text, "status": status}


def _part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(job) -> dict:
    prompt = len(job.req.prompt)
    return {"input_tokens": prompt, "output_tokens": job.tokens,
            "total_tokens": prompt + job.tokens,
            "input_tokens_details": {"cached_tokens": job.cached_tokens()},
            "output_tokens_details": {"reasoning_tokens": 0}}


def _response(job, rid: str, created: int, model: str, status: str, output: list,
              usage: dict | None) -> dict:
    req = job.req
    incomplete = {"reason": "max_output_tokens"} if job.finish_reason == "length" else None
    return {"id": rid, "object": "response", "created_at": created, "status": status,
            "model": model, "output": output, "usage": usage, "error": None,
            "incomplete_details": incomplete if status != "in_progress" else None,
            "parallel_tool_calls": req.chat.parallel if req.chat else True,
            "temperature": req.temp, "top_p": req.top_p, "max_output_tokens": req.max_tokens,
            "tool_choice": "auto", "tools": [], "text": {"format": {"type": "text"}},
            "metadata": {}, "store": False, "truncation": "disabled"}


def _status(job) -> str:
    return "incomplete" if job.finish_reason == "length" else "completed"


def whole(job, pieces: list, rid: str, created: int, model: str) -> dict:
    items = Items()
    output = [items.item(i, b) for i, b in enumerate(blocks.collect(pieces))]
    return _response(job, rid, created, model, _status(job), output, _usage(job))


class Stream:
    """Events with their sequence numbers."""

    def __init__(self):
        self.n = 0

    def event(self, kind: str, **data) -> str:
        out = {"type": kind, "sequence_number": self.n, **data}
        self.n += 1
        return f"event: {kind}\ndata: {json.dumps(out, ensure_ascii=False)}\n\n"


DELTA = {blocks.REASONING: "response.reasoning_text.delta",
         blocks.TEXT: "response.output_text.delta",
         blocks.CALL: "response.function_call_arguments.delta"}


async def events(job, rid: str, created: int, model: str):
    """The answer as the Responses API's events, response.created to response.completed."""
    out, items, state = Stream(), Items(), blocks.Blocks()
    snapshot = _response(job, rid, created, model, "in_progress", [], None)
    yield out.event("response.created", response=snapshot)
    yield out.event("response.in_progress", response=snapshot)
    async for piece in job.pieces():
        for step in state.feed(piece):
            for e in _step(out, items, state, step):
                yield e
    for step in state.finish():
        for e in _step(out, items, state, step):
            yield e
    if job.seq.finish_reason == "interrupted":
        failed = _response(job, rid, created, model, "failed", [], _usage(job))
        failed["error"] = {"code": "server_error", "message": "the server is shutting down"}
        yield out.event("response.failed", response=failed)
        return
    output = [items.item(i, b) for i, b in enumerate(state.done)]
    yield out.event("response.completed", response=_response(
        job, rid, created, model, _status(job), output, _usage(job)))


def _step(out: Stream, items: Items, state: blocks.Blocks, step: blocks.Step) -> list[str]:
    i = step.index
    iid = items.id(i, step.kind)
    at = {"item_id": iid, "output_index": i}
    if step.what == "start":
        b = blocks.Block(step.kind, call=step.call)
        events = [out.event("response.output_item.added", output_index=i,
                            item=items.item(i, b, done=False))]
        if step.kind != blocks.CALL:
            part = _part("") if step.kind == blocks.TEXT else {"type": "reasoning_text",
                                                                "text": ""}
            events.append(out.event("response.content_part.added", **at, content_index=0,
                                    part=part))
        return events
    if step.what == "delta":
        extra = {} if step.kind == blocks.CALL else {"content_index": 0}
        if step.kind == blocks.TEXT:
            extra["logprobs"] = []
        return [out.event(DELTA[step.kind], **at, **extra, delta=step.text)]
    b = state.done[i]
    done = items.item(i, b)
    if step.kind == blocks.CALL:
        events = [out.event("response.function_call_arguments.done", **at, name=b.call["name"],
                            arguments=b.text)]
    elif step.kind == blocks.TEXT:
        events = [out.event("response.output_text.done", **at, content_index=0, text=b.text,
                            logprobs=[]),
                  out.event("response.content_part.done", **at, content_index=0,
                            part=_part(b.text))]
    else:
        events = [out.event("response.reasoning_text.done", **at, content_index=0, text=b.text),
                  out.event("response.content_part.done", **at, content_index=0,
                            part={"type": "reasoning_text", "text": b.text})]
    return events + [out.event("response.output_item.done", output_index=i, item=done)]
