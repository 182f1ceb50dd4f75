"""One sequence's output text -> events: content, reasoning, tool calls.

A state machine per sequence, normal / reasoning / call, driven by the family's markers
(families.py). Text is read as it is detokenized; a tail that could still become a marker is
held back, so no part of a marker ever reaches the client, however the tokens cut it. A call
block is read whole and parsed at its end marker (or at the end of the answer for a family
whose calls run to the end); one that does not parse comes out as content, marker included,
with the reason (Event "bad_call"): never dropped. Whitespace that only separates blocks (after
`</think>`, around calls) is dropped; a plain answer's text is kept exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.serve.families import Family, parse_calls

NORMAL, REASONING, CALL = "content", "reasoning", "call"


@dataclass
class Event:
    kind: str  # "content", "reasoning", "call" (calls), "bad_call" (text and error)
    text: str = ""
    calls: list[dict] = field(default_factory=list)
    error: str = ""


def held_prefix(buf: str, markers: list[str]) -> int:
    """Length of the longest end of `buf` that is the start of a marker (not a whole one)."""
    keep = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(buf)), keep, -1):
            if buf.endswith(m[:n]):
                keep = n
                break
    return keep


class Output:
    def __init__(self, family: Family, tools: list | None = None, *, calls: bool = False,
                 reasoning: bool = False):
        """calls: parse tool calls (the request gave tools); reasoning: the prompt opened a
        reasoning block (the answer starts inside it)."""
        self.family, self.tools = family, tools
        edges: dict[str, list[tuple[str, str]]] = {NORMAL: [], REASONING: []}
        if family.think:
            edges[NORMAL].append((family.think[0], REASONING))
            edges[REASONING].append((family.think[1], NORMAL))
        self.call_end = None
        if calls and family.call:
            start, end = family.call
            edges[NORMAL].append((start, CALL))
            edges[REASONING].append((start, CALL))
            edges[CALL] = [(end, NORMAL)] if end else []
            self.call_start, self.call_end = start, end
        self.edges = edges
        self.state = REASONING if reasoning and family.think else NORMAL
        self.held = ""  # text that may begin a marker
        self.body = ""  # the call block being read
        self.call_ws = ""  # the whitespace before it
        self.ws = ""  # trailing whitespace of the current block, sent only if text follows
        self.block_text = False  # the current block has sent text
        self.marked = self.state != NORMAL  # a marker was seen (or the prompt opened one)
        self.calls = 0  # calls parsed so far

    def feed(self, text: str) -> list[Event]:
        out: list[Event] = []
        buf = self.held + text
        while True:
            edges = self.edges.get(self.state, [])
            hits = [(buf.find(m), -len(m), m, to) for m, to in edges if m and m in buf]
            if not hits:
                break
            i, _, marker, to = min(hits)
            self._text(buf[:i], out)
            buf = buf[i + len(marker):]
            self._switch(to, marker, out)
        keep = held_prefix(buf, [m for m, _ in self.edges.get(self.state, []) if m])
        self.held = buf[len(buf) - keep:]
        self._text(buf[: len(buf) - keep], out)
        return merged_events(out)

    def finish(self, why: str = "") -> list[Event]:
        """The rest, at the end of the answer; `why` names a cut-off ("length")."""
        out: list[Event] = []
        held, self.held = self.held, ""
        self._text(held, out)
        if self.state == CALL:
            self._end_call(out, closed=False, why=why)
        elif self.ws and not self.marked:  # a plain answer keeps its text exactly
            out.append(Event(self.state, self.ws))
        self.ws = ""
        return merged_events(out)

    # -- inside ---------------------------------------------------------------------------
    def _text(self, text: str, out: list[Event]) -> None:
        if not text:
            return
        if self.state == CALL:
            self.body += text
            return
        if self.marked and not self.block_text:
            text = text.lstrip()  # whitespace after a marker only separates blocks
            if not text:
                return
        buf = self.ws + text
        body = buf.rstrip()
        self.ws = buf[len(body):]
        if body:
            out.append(Event(self.state, body))
            self.block_text = True

    def _switch(self, to: str, marker: str, out: list[Event]) -> None:
        if to == CALL:
            self.call_ws = self.ws  # back in front of the call's text if it does not parse
        self.marked, self.ws, self.block_text = True, "", False
        if self.state == CALL:
            self._end_call(out, closed=True)
        self.state = to

    def _end_call(self, out: list[Event], closed: bool, why: str = "") -> None:
        body, self.body = self.body, ""
        raw = self.call_ws + self.call_start + body + (self.call_end if closed else "")
        try:
            calls = parse_calls(self.family, body, self.tools)
        except ValueError as e:
            cut = " (cut off by max_tokens)" if why == "length" else ""
            where = "" if closed or not self.call_end else f"; no {self.call_end} came{cut}"
            out.append(Event("bad_call", raw, error=f"the model wrote a {self.family.name} tool "
                             f"call that does not parse: {e}{where}"))
        else:
            self.calls += len(calls)
            out.append(Event(CALL, calls=calls))
        self.state = NORMAL


def merged_events(events: list[Event]) -> list[Event]:
    out: list[Event] = []
    for e in events:
        if out and e.kind in (NORMAL, REASONING) and out[-1].kind == e.kind:
            out[-1].text += e.text
        else:
            out.append(e)
    return out
