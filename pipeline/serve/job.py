"""One request in flight on the HTTP side: the engine's tokens in, the answer's pieces out.

Each token is detokenized, cut at a stop string, then (a chat) read by the output state machine
(output.py) into content, reasoning and tool calls; its log-probabilities, when asked for, ride
with the next piece sent. The engine's reasons become OpenAI's: an answer that ends with calls
finishes with "tool_calls", and with parallel_tool_calls false it ends after its first call.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field

from pipeline.exec.engine import Sequence
from pipeline.exec.sampling import SamplingParams
from pipeline.serve import api, render
from pipeline.serve.harmony import HarmonyOutput
from pipeline.serve.output import Output

FINISH = {"stop": "stop", "length": "length"}  # engine reasons -> OpenAI's; others: "stop"


@dataclass
class Piece:
    """What the answer adds at one step."""
    content: str = ""
    reasoning: str = ""
    calls: list[dict] = field(default_factory=list)  # {id, name, arguments}
    errors: list[str] = field(default_factory=list)  # calls that did not parse (in content)
    logprobs: list[dict] = field(default_factory=list)  # chat-form entries (logprobs.py)

    def shown(self) -> bool:
        return bool(self.content or self.reasoning or self.calls or self.errors)


class Job:
    """One request in flight: the queue its tokens arrive on, and what came of it."""

    def __init__(self, state, req: api.Request):
        self.state, self.req = state, req
        sampling = SamplingParams(temp=req.temp, top_p=req.top_p, min_p=req.min_p,
                                  seed=req.seed, max_tokens=req.max_tokens,
                                  ignore_eos=req.ignore_eos)
        self.seq = Sequence(id=id(self), prompt=req.prompt, sampling=sampling,
                            extra={"job": self}, logprobs=req.logprobs,
                            constraint=req.constraint)
        self.events: asyncio.Queue = asyncio.Queue()
        self.detok = state.tokenizer.detokenizer  # a fresh copy per access
        self.stops = api.StopText(req.stop)
        chat = req.chat
        reader = HarmonyOutput if chat is not None and chat.family.name == "harmony" else Output
        self.output = None if chat is None else reader(
            chat.family, chat.tools, calls=chat.tools is not None, reasoning=chat.reasoning)
        self.arrived = time.perf_counter()
        self.tokens = 0
        self.calls = 0  # tool calls sent
        self.finish_reason: str | None = None
        self.released = False

    # called on the event loop, scheduled by the main thread
    def token(self, token: int, logprobs=None) -> None:
        self.events.put_nowait((token, logprobs))

    def done(self) -> None:
        self.events.put_nowait(None)

    def _read(self, piece: Piece, text: str, end: str | None) -> None:
        """Text into the piece (through the output state machine for a chat); `end`: the
        answer ends here, for this reason."""
        if self.output is None:
            piece.content += text
            return
        events = self.output.feed(text) + (self.output.finish(end) if end else [])
        for e in events:
            if e.kind == "content":
                piece.content += e.text
            elif e.kind == "reasoning":
                piece.reasoning += e.text
            elif e.kind == "call":
                piece.calls.extend(e.calls)
            else:  # bad_call: its text as content, and why
                piece.content += e.text
                piece.errors.append(e.error)
                print(f"pipeline: {e.error}", file=sys.stderr, flush=True)
        self.calls += len(piece.calls)

    async def pieces(self):
        """The answer as it is generated; sets finish_reason at the end."""
        while self.finish_reason is None:
            item, piece = await self.events.get(), Piece()
            if item is None:
                self.detok.finalize()
                text, hit = self.stops.feed(self.detok.last_segment)
                text += "" if hit else self.stops.flush()
                reason = "stop" if hit else FINISH.get(self.seq.finish_reason, "stop")
                self._read(piece, text, reason)
                self._finish("tool_calls" if reason == "stop" and self.calls else reason)
            else:
                token, logprobs = item
                self.tokens += 1
                if logprobs is not None:
                    piece.logprobs.append(self.state.token_text.entry(token, *logprobs))
                self.detok.add_token(token)
                text, hit = self.stops.feed(self.detok.last_segment)
                self._read(piece, text, "stop" if hit else None)
                if hit:
                    self._finish("tool_calls" if self.calls else "stop")
                elif self.calls and not self.req.chat.parallel:
                    self._read(piece, "", "stop")  # the first call ends the answer
                    self._finish("tool_calls")
            if piece.shown() or piece.logprobs:
                yield piece

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        if self.seq.finish_reason == "stop":
            self.tokens += 1  # the EOS token counts as generated, as in batch results
        self.state.record(self)
        self.release()

    def usage(self) -> dict:
        return render.usage(len(self.req.prompt), self.tokens, self.cached_tokens())

    def cached_tokens(self) -> int:
        """Prompt tokens whose keys and values came from the prefix cache (0 without one)."""
        return self.seq.cached_tokens

    def release(self) -> None:
        """Free the slot (idempotent); unless finished, the engine drops the sequence."""
        if self.released:
            return
        self.released = True
        self.seq.cancelled = True  # no effect on a sequence the engine has finished
        self.state.active -= 1
