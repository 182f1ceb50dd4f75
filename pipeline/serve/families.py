"""Which markers a model family writes around its reasoning and its tool calls, and how the
text of a call becomes {name, arguments}.

mlx-lm's tokenizer wrapper already infers the think markers (from the vocabulary) and a tool
parser with its start/end markers (from the chat template: hermes/Qwen JSON, Qwen3-Coder XML,
GLM-4.5/4.7, Kimi K2, Mistral, MiniMax, Gemma, ...); `family_of` takes those. It adds what mlx-lm
lacks: DeepSeek V3/V3.1's call markers and V3.2's DSML tags, gpt-oss's harmony channels (read by harmony.py), and the
generic JSON format that serve describes to a model whose chat template knows no tools (chat.py).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Callable

Parser = Callable[[str, "list | None"], "dict | list"]


@dataclass(frozen=True)
class Family:
    name: str
    think: tuple[str, str] | None = None  # (start, end) of a reasoning block
    call: tuple[str, str] | None = None  # (start, end) of a call block; end "": to the end
    parse: Parser | None = None  # a call block's text (markers excluded) -> call(s)


def _generic_json(text: str, tools=None) -> dict:
    call = json.loads(text.strip())
    if isinstance(call, dict) and "arguments" not in call and "parameters" in call:
        call["arguments"] = call.pop("parameters")  # Llama 3's spelling
    return call


GENERIC_CALL = ("<tool_call>", "</tool_call>")  # the generic format's markers (chat.py)
JSON_CALL_FAMILIES = ("json_tools", "generic")  # a call block holds {"name", "arguments"}

# DeepSeek V3 / V3.1 (its full-width bars and U+2581 spaces are part of the tokens):
#   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{ARGS}<｜tool▁call▁end｜>...
#   <｜tool▁calls▁end｜>; V3 writes "function<｜tool▁sep｜>NAME\n```json\n{ARGS}\n```" instead.
DEEPSEEK_CALLS = ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>")
_DEEPSEEK_CALL = re.compile("<｜tool▁call▁begin｜>(.*?)<｜tool▁sep｜>(.*?)<｜tool▁call▁end｜>",
                            re.DOTALL)
_DEEPSEEK_V3_ARGS = re.compile(r"^\s*([^\n]+)\n```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


def _deepseek(text: str, tools=None) -> list[dict]:
    calls = []
    for name, rest in _DEEPSEEK_CALL.findall(text):
        if name.strip() == "function" and (v3 := _DEEPSEEK_V3_ARGS.match(rest)):
            name, rest = v3.groups()
        calls.append({"name": name.strip(), "arguments": json.loads(rest)})
    if not calls:
        raise ValueError("no <｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜> in it")
    return calls


# DeepSeek V3.2 ("DSML" tags; `string="true"`: the value as written, "false": a JSON value):
#   <｜DSML｜function_calls>\n<｜DSML｜invoke name="NAME">\n
#   <｜DSML｜parameter name="KEY" string="true">VALUE</｜DSML｜parameter>\n</｜DSML｜invoke>\n
#   ...</｜DSML｜function_calls>
DSML = "｜DSML｜"
DSML_CALLS = (f"<{DSML}function_calls>", f"</{DSML}function_calls>")
_DSML_INVOKE = re.compile(f'<{DSML}invoke name="([^"]+)">(.*?)</{DSML}invoke>', re.DOTALL)
_DSML_PARAM = re.compile(f'<{DSML}parameter name="([^"]+)"(?: string="(true|false)")?>(.*?)'
                         f"</{DSML}parameter>", re.DOTALL)


def _dsml(text: str, tools=None) -> list[dict]:
    calls = []
    for name, body in _DSML_INVOKE.findall(text):
        args = {}
        for key, is_string, value in _DSML_PARAM.findall(body):
            args[key] = value if is_string == "true" else json.loads(value)
        if not args and body.strip():  # the arguments as one JSON object instead
            args = json.loads(body)
        calls.append({"name": name.strip(), "arguments": args})
    if not calls:
        raise ValueError(f'no <{DSML}invoke name="NAME">...</{DSML}invoke> in it')
    return calls


# gpt-oss: messages with channels, not markers around blocks (harmony.py reads them); a call is
# a commentary message to=functions.NAME, its body the JSON arguments, ended by <|call|>.
HARMONY_CALL = ("<|channel|>commentary to=functions.", "<|call|>")


def _think(tokenizer) -> tuple[str, str] | None:
    if getattr(tokenizer, "has_thinking", False):
        return tokenizer.think_start, tokenizer.think_end
    return None


def family_of(tokenizer) -> Family:
    """The family of a loaded mlx-lm tokenizer: its think markers, call markers and parser
    (Family.call None: no parser known for its chat template)."""
    think = _think(tokenizer)
    if getattr(tokenizer, "has_tool_calling", False) and tokenizer.tool_parser is not None:
        name = tokenizer.tool_parser.__module__.rsplit(".", 1)[-1]
        return Family(name, think, (tokenizer.tool_call_start, tokenizer.tool_call_end or ""),
                      tokenizer.tool_parser)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and DSML_CALLS[0] in template:
        return Family("deepseek_v32", think, DSML_CALLS, _dsml)
    if isinstance(template, str) and DEEPSEEK_CALLS[0] in template:
        return Family("deepseek_v3", think, DEEPSEEK_CALLS, _deepseek)
    if isinstance(template, str) and "<|channel|>" in template and "<|message|>" in template:
        return Family("harmony", None, HARMONY_CALL)
    return Family("none", think)


def generic(family: Family) -> Family:
    """The family with the generic JSON call format in place of its own."""
    return Family("generic", family.think, GENERIC_CALL, _generic_json)


def parse_calls(family: Family, text: str, tools: list | None) -> list[dict]:
    """The calls in one call block: [{id, name, arguments (a JSON string)}]; raises ValueError
    (with the reason) when the text is not a well-formed call of one of `tools`."""
    try:
        parsed = family.parse(text, tools)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None
    names = {t["function"]["name"] for t in tools or []}
    calls = []
    for call in parsed if isinstance(parsed, list) else [parsed]:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
            raise ValueError(f"a call needs a function name: got {call!r}")
        if tools is not None and call["name"] not in names:
            raise ValueError(f"it calls '{call['name']}', which is not one of the request's tools")
        args = call.get("arguments", {})
        if isinstance(args, str):
            json.loads(args)  # a JSONDecodeError is a ValueError
        else:
            args = json.dumps(args, ensure_ascii=False)
        cid = call.get("id") if isinstance(call.get("id"), str) else new_call_id()
        calls.append({"id": cid, "name": call["name"], "arguments": args})
    if not calls:
        raise ValueError("no call in it")
    return calls


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]
