"""An answer's pieces (job.py) as a sequence of blocks: what the Anthropic Messages and OpenAI
Responses formats both send, each in its own words (anthropic.py, responses.py).

A block is reasoning, text or one tool call. Text blocks open at their first text and close
when another kind arrives; a call is a block of its own, whole. Within one piece the order is
reasoning, text, calls (the order in which the output state machine can produce them).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

REASONING, TEXT, CALL = "reasoning", "text", "call"


@dataclass
class Step:
    """One step of the block sequence: "start" (kind, call for a call block), "delta" (text)
    or "stop" (kind)."""
    what: str
    kind: str
    index: int  # the block's place in the answer (0, 1, ...)
    text: str = ""
    call: dict | None = None


@dataclass
class Block:
    kind: str
    text: str = ""
    call: dict | None = None  # {id, name, arguments (a JSON string)}


@dataclass
class Blocks:
    """Turns pieces into Steps, keeping which block is open."""
    open: str | None = None
    count: int = 0  # blocks started so far (the next one's index)
    done: list[Block] = field(default_factory=list)

    def feed(self, piece) -> list[Step]:
        steps: list[Step] = []
        for kind, text in ((REASONING, piece.reasoning), (TEXT, piece.content)):
            if text:
                if self.open != kind:
                    steps += self._close()
                    steps.append(Step("start", kind, self.count))
                    self.open, self.count = kind, self.count + 1
                    self.done.append(Block(kind))
                steps.append(Step("delta", kind, self.count - 1, text))
                self.done[-1].text += text
        for call in piece.calls:
            steps += self._close()
            i = self.count
            steps += [Step("start", CALL, i, call=call), Step("delta", CALL, i, call["arguments"]),
                      Step("stop", CALL, i)]
            self.count += 1
            self.done.append(Block(CALL, call["arguments"], call))
        return steps

    def finish(self) -> list[Step]:
        return self._close()

    def _close(self) -> list[Step]:
        if self.open is None:
            return []
        kind, self.open = self.open, None
        return [Step("stop", kind, self.count - 1)]


def collect(pieces: list) -> list[Block]:
    blocks = Blocks()
    for piece in pieces:
        blocks.feed(piece)
    return blocks.done


def arguments(call: dict) -> dict:
    """A call's arguments as an object (they are a JSON string, checked by the parser)."""
    args = json.loads(call["arguments"] or "{}")
    return args if isinstance(args, dict) else {"value": args}


async def with_pings(pieces, every: float):
    """The async iterator `pieces`, with None yielded each `every` seconds nothing comes (a long
    prompt prefilling): a stream can send a keep-alive. The pending read is never cancelled
    by the wait, so no piece is lost."""
    it = pieces.__aiter__()
    pending = asyncio.ensure_future(it.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield None
                continue
            try:
                piece = pending.result()
            except StopAsyncIteration:
                return
            yield piece
            pending = asyncio.ensure_future(it.__anext__())
    finally:
        if not pending.done():
            pending.cancel()
