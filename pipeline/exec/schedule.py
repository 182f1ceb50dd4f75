"""The micro-batch decode schedule, as data: what each stage does, in order.

With D stages in a ring and M micro-batches, rank 0 starts every micro-batch (embed, its
layers, send), then, each time a micro-batch comes back round the ring, samples its next
tokens and sends it round again. Ranks 1..D-1 receive, run their layers and send, in arrival
order. With M >= D every stage has work at every step once the pipe is full; with one
micro-batch only one stage works at a time (why a naive pipeline is no faster than one node).

Pairing rule (why it cannot deadlock): every Send is posted non-blocking (Isend) and
completed before its buffer is reused, and every stage receives only from its predecessor in
the order that predecessor sent. A stage therefore never waits on a message that another
stage is waiting to send, and no two neighbours block each other in Send past the eager limit.

`pipeline.commands.batch.Engine` issues rank 0's instructions in exactly this order (it decides the
micro-batch contents as it goes); the workers' loop is `generate.serve`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Instr:
    kind: str  # "embed", "forward", "send", "recv", "sample"
    mb: int


def stage_program(rank: int, size: int, microbatches: int, steps: int) -> Iterator[Instr]:
    """Instructions of one stage for `steps` decode steps of every micro-batch."""
    mbs = range(microbatches)
    if rank == 0:
        start = ("embed", "forward") + (("send",) if size > 1 else ())
        for mb in mbs:
            yield from (Instr(k, mb) for k in start)
        for step in range(steps):
            for mb in mbs:
                if size > 1:
                    yield Instr("recv", mb)
                yield Instr("sample", mb)
                if step + 1 < steps:
                    yield from (Instr(k, mb) for k in start)
        return
    for _ in range(steps):
        for mb in mbs:
            yield from (Instr("recv", mb), Instr("forward", mb), Instr("send", mb))


@dataclass
class Timeline:
    end_time: float
    busy: list[list[tuple[float, float]]]  # per stage: (start, end) of each forward

    def utilisation(self, rank: int, start: float, end: float) -> float:
        """Fraction of [start, end) that `rank` spent computing."""
        inside = sum(max(0.0, min(e, end) - max(s, start)) for s, e in self.busy[rank])
        return inside / (end - start)


def simulate(size: int, microbatches: int, steps: int, forward_cost: float = 1.0) -> Timeline:
    """Run every stage's program against a FIFO model of the ring.

    Sends never block (Isend); a receive blocks until the predecessor's message is there and
    must match the micro-batch the program expects. Raises RuntimeError on a deadlock or an
    out-of-order message.
    """
    programs = [list(stage_program(r, size, microbatches, steps)) for r in range(size)]
    pc = [0] * size
    clock = [0.0] * size
    links = [deque() for _ in range(size)]  # links[r]: messages for rank r: (mb, time sent)
    busy: list[list[tuple[float, float]]] = [[] for _ in range(size)]
    while any(pc[r] < len(programs[r]) for r in range(size)):
        progressed = False
        for r in range(size):
            while pc[r] < len(programs[r]):
                ins = programs[r][pc[r]]
                if ins.kind == "recv":
                    if not links[r]:
                        break
                    mb, sent_at = links[r].popleft()
                    if mb != ins.mb:
                        raise RuntimeError(f"rank {r} expected micro-batch {ins.mb}, got {mb}")
                    clock[r] = max(clock[r], sent_at)
                elif ins.kind == "send":
                    links[(r + 1) % size].append((ins.mb, clock[r]))
                elif ins.kind == "forward":
                    busy[r].append((clock[r], clock[r] + forward_cost))
                    clock[r] += forward_cost
                pc[r] += 1
                progressed = True
        if not progressed:
            stuck = {r: programs[r][pc[r]] for r in range(size) if pc[r] < len(programs[r])}
            raise RuntimeError(f"deadlock: {stuck}")
    return Timeline(max(clock), busy)
