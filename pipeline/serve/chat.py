"""A chat request's messages and tools -> the prompt's token ids and how to read the answer.

Messages arrive in OpenAI's form and go to the tokenizer's chat template in the form templates
expect: content as a string (text parts joined, null as ""), an assistant's `tool_calls` with
their `arguments` as an object (they arrive as a JSON string), a `tool` message with its
`tool_call_id` and the called function's `name`. `tools` go to the template; one whose output
does not change with them (it knows no tools), or whose call format has no parser, gets the
generic form instead: a system message describing the tools and a JSON call format between
<tool_call> markers (what llama.cpp's server does for such templates), with earlier calls and
results written the same way. Pure functions: every refusal is an ApiError (400).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pipeline.model.prompt import encode, render, wants_chat
from pipeline.serve.errors import bad
from pipeline.serve.families import GENERIC_CALL, JSON_CALL_FAMILIES, Family, family_of, generic

ROLES = {"system", "user", "assistant", "developer", "tool"}
GENERIC_SYSTEM = """\
You can call these tools, each given as a JSON schema:
{tools}

To call a tool, answer with one block per call (nothing after the blocks):
{start}
{{"name": "<tool name>", "arguments": {{<the arguments as a JSON object>}}}}
{end}
The result of each call comes back in a <tool_response> block."""


@dataclass
class ChatPrompt:
    ids: list[int]
    family: Family  # the markers of the answer's reasoning and calls
    tools: list | None  # calls are parsed (against these tools) only when set
    reasoning: bool  # the prompt opened a reasoning block: the answer starts inside it
    parallel: bool = True  # parallel_tool_calls: false: the answer ends after its first call
    note: str | None = None  # said once in the server's log (the generic form, and why)
    force: bool = False  # tool_choice "required" or a named function: the answer is calls
    force_name: str | None = None  # the named function


def _text(content, where: str, null_ok: bool) -> str:
    if isinstance(content, str):
        return content
    if content is None and null_ok:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise bad(f"{where}: only text parts are supported", where)
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"{where} must be a string or a list of text parts", where)


def _tool_calls(calls, i: int) -> list[dict]:
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise bad(f"{where} must be a list", where)
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad(f"{where}[{j}] needs function.name", f"{where}[{j}].function")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError as e:
                raise bad(f"{where}[{j}].function.arguments is not valid JSON: {e}",
                          f"{where}[{j}].function.arguments") from None
        out.append({"id": call.get("id") or f"call_{i}_{j}", "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})
    return out


def chat_messages(body: dict) -> list[dict]:
    """The request's messages in the form chat templates expect."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    out, names = [], {}  # names: tool_call_id -> function name
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"messages[{i}] needs a role among {', '.join(sorted(ROLES))}",
                      f"messages[{i}].role")
        role = "system" if m["role"] == "developer" else m["role"]
        calls = m.get("tool_calls") if role == "assistant" else None
        msg = {"role": role, "content": _text(m.get("content"), f"messages[{i}].content",
                                              null_ok=role == "assistant")}
        if calls:
            msg["tool_calls"] = _tool_calls(calls, i)
            names.update((c["id"], c["function"]["name"]) for c in msg["tool_calls"])
        if role == "assistant" and isinstance(m.get("reasoning_content"), str):
            msg["reasoning_content"] = m["reasoning_content"]
        if role == "tool":
            cid = m.get("tool_call_id")
            if not isinstance(cid, str) or not cid:
                raise bad(f"messages[{i}]: a tool message needs the tool_call_id it answers",
                          f"messages[{i}].tool_call_id")
            msg["tool_call_id"] = cid
            msg["name"] = m.get("name") if isinstance(m.get("name"), str) else names.get(cid, "")
        out.append(msg)
    return out


def chat_tools(body: dict) -> tuple[list[dict] | None, bool, str | None]:
    """The request's tools, checked, in OpenAI's form (which templates take; None: none, or
    tool_choice "none"), whether tool_choice forces a call ("required" or a named function),
    and the named function."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None and not isinstance(tools, list):
        raise bad("'tools' must be a list of {type: function, function: {...}}", "tools")
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(
                fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"tools[{i}] must be {{type: function, function: {{name, description, "
                      f"parameters}}}}", f"tools[{i}]")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise bad(f"tools[{i}].function.parameters must be a JSON schema object",
                      f"tools[{i}].function.parameters")
    name = None
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if choice.get("type") == "function" and isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise bad("'tool_choice' as an object must be {type: function, function: {name}}",
                      "tool_choice")
        if name not in {t["function"]["name"] for t in tools or []}:
            raise bad(f"'tool_choice' names {name!r}, which is not one of the tools",
                      "tool_choice")
    elif choice not in (None, "auto", "none", "required"):
        raise bad("'tool_choice' must be \"auto\", \"none\", \"required\" or "
                  "{type: function, function: {name}}", "tool_choice")
    force = choice == "required" or name is not None
    if force and not tools:
        raise bad("'tool_choice' forces a call but 'tools' is empty", "tool_choice")
    if body.get("parallel_tool_calls") not in (None, True, False):
        raise bad("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
    out = [{"type": "function", "function": t["function"]} for t in tools] if (
        tools and choice != "none") else None
    return out, force, name


def template_kwargs(body: dict) -> dict:
    """chat_template_kwargs, plus reasoning_effort (gpt-oss's template reads it)."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict) or any(k in ("messages", "tools", "tokenize") for k in kwargs):
        raise bad("'chat_template_kwargs' must be an object of template variables",
                  "chat_template_kwargs")
    effort = body.get("reasoning_effort")
    if effort is not None:
        if not isinstance(effort, str):
            raise bad("'reasoning_effort' must be a string", "reasoning_effort")
        kwargs = {"reasoning_effort": effort, **kwargs}
    return dict(kwargs)


def generic_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """The conversation for a template that knows no tools: the tools described in the
    system message, earlier calls and results written in the generic format."""
    start, end = GENERIC_CALL
    described = GENERIC_SYSTEM.format(
        tools="\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools),
        start=start, end=end)
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            blocks = [f"{start}\n" + json.dumps({"name": c["function"]["name"],
                                                 "arguments": c["function"]["arguments"]},
                                                ensure_ascii=False) + f"\n{end}"
                      for c in m["tool_calls"]]
            m = {"role": "assistant", "content": "\n".join(filter(None, [m["content"], *blocks]))}
        elif m["role"] == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
        out.append(m)
    if out[0]["role"] == "system":
        out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + described}
    else:
        out.insert(0, {"role": "system", "content": described})
    return out


def chat_prompt(body: dict, tokenizer) -> ChatPrompt:
    """Tokenize a chat request (messages, tools, template variables) through the template."""
    from jinja2 import TemplateError

    messages, (tools, force, name) = chat_messages(body), chat_tools(body)
    kwargs = template_kwargs(body)
    family, note = family_of(tokenizer), None
    if not wants_chat(tokenizer, None):  # the raw text of the turns, as one-shot --no-chat
        if tools:
            raise bad("this model has no chat template to give the tools to", "tools")
        return ChatPrompt(encode(tokenizer, messages, False), family, None, False)
    try:
        text = render(tokenizer, messages, tools, **kwargs)
        if tools:
            why = None
            if family.call is None:
                why = "no tool-call parser is known for its chat template"
            elif text == render(tokenizer, messages, None, **kwargs):
                why = "its chat template ignores tools"
            elif force and family.name not in JSON_CALL_FAMILIES:
                why = (f"tool_choice forces a call, and the grammar that does so writes JSON "
                       f"calls ({family.name} calls are not JSON)")
            if why:
                family = generic(family)
                note = (f"tools are described in a system message with the generic JSON call "
                        f"format: {why}")
                text = render(tokenizer, generic_messages(messages, tools), None, **kwargs)
    except (TemplateError, ValueError, TypeError) as e:  # e.g. a template without a system role
        raise bad(f"the model's chat template refused these messages: {e}", "messages")
    ids = tokenizer.encode(text, add_special_tokens=False)
    reasoning = bool(family.think) and text.rfind(family.think[0]) > text.rfind(family.think[1])
    return ChatPrompt(ids, family, tools, reasoning, body.get("parallel_tool_calls") is not False,
                      note, force, name)
