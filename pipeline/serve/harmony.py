"""gpt-oss's harmony output -> events, with the interface of output.Output.

The answer is a run of messages, each a header and a body (after the prompt's
`<|start|>assistant`):

    <|channel|>analysis<|message|>REASONING<|end|>
    <|start|>assistant<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{ARGS}<|call|>
    <|start|>assistant<|channel|>final<|message|>ANSWER<|return|>

(the recipient may also come before the channel: `assistant to=functions.NAME<|channel|>...`).
The analysis channel is reasoning; a message to `functions.NAME` is a call whose body is its JSON
arguments; any other (final, a commentary preamble) is content. `<|call|>` and `<|return|>` are
gpt-oss's EOS tokens, so the engine stops there and the last body ends with the answer. Headers
never reach the client; a body is sent as it comes, less any tail that could begin a marker.
"""

from __future__ import annotations

import json
import re

from pipeline.serve.families import Family, parse_calls
from pipeline.serve.output import Event, held_prefix, merged_events

MESSAGE = "<|message|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>", "<|start|>")
_CHANNEL = re.compile(r"<\|channel\|>\s*([\w-]+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")


def _arguments(text: str, tools=None) -> dict:
    return json.loads(text)


class HarmonyOutput:
    def __init__(self, family: Family, tools: list | None = None, *, calls: bool = False,
                 reasoning: bool = False):
        self.family, self.tools, self.parse_tools = family, tools, calls
        self.head: str | None = ""  # the header being read; None: inside a body
        self.kind, self.name = "content", ""  # the body's: content, reasoning or call (name)
        self.header = ""  # the current body's header
        self.held = ""  # the end of a body that may begin a marker
        self.body = ""  # a call's arguments so far
        self.calls = 0

    def feed(self, text: str) -> list[Event]:
        out: list[Event] = []
        buf = self.held + text
        self.held = ""
        while buf:
            if self.head is not None:  # a header: wait for its <|message|>
                self.head += buf
                i = self.head.find(MESSAGE)
                if i < 0:
                    return merged_events(out)
                self._open(self.head[:i])
                buf, self.head = self.head[i + len(MESSAGE):], None
                continue
            hits = [(buf.find(m), m) for m in ENDS if m in buf]
            if hits:
                i, marker = min(hits)
                self._body(buf[:i], out)
                self._close(out)
                buf = buf[i + len(marker):]
                self.head = ""
                continue
            keep = held_prefix(buf, list(ENDS))
            self._body(buf[: len(buf) - keep], out)
            self.held = buf[len(buf) - keep:]
            break
        return merged_events(out)

    def finish(self, why: str = "") -> list[Event]:
        out: list[Event] = []
        if self.head is None:
            self._body(self.held, out)
            self._close(out, why)
        elif self.head.strip():  # not harmony after all: say what it wrote
            out.append(Event("content", self.head))
        self.held, self.head = "", ""
        return merged_events(out)

    def _open(self, header: str) -> None:
        """A body starts: what kind, from its header."""
        channel = _CHANNEL.search(header)
        recipient = _RECIPIENT.search(header)
        self.kind, self.name = "content", ""
        if channel and channel.group(1) == "analysis":
            self.kind = "reasoning"
        if recipient and recipient.group(1).startswith("functions.") and self.parse_tools:
            self.kind, self.name = "call", recipient.group(1).removeprefix("functions.")
        self.header = header

    def _body(self, text: str, out: list[Event]) -> None:
        if not text:
            return
        if self.kind == "call":
            self.body += text
        else:
            out.append(Event(self.kind, text))

    def _close(self, out: list[Event], why: str = "") -> None:
        if self.kind != "call":
            return
        body, self.body = self.body, ""
        name = self.name
        family = Family("harmony", parse=lambda text, tools: {"name": name,
                                                               "arguments": _arguments(text)})
        try:
            calls = parse_calls(family, body, self.tools)
        except ValueError as e:
            cut = " (cut off by max_tokens)" if why == "length" else ""
            out.append(Event("bad_call", f"{self.header}{MESSAGE}{body}",
                             error=f"the model wrote a harmony tool call that does not parse: "
                                   f"{e}{cut}"))
        else:
            self.calls += len(calls)
            out.append(Event("call", calls=calls))
        self.kind = "content"
