"""The ring protocol, defined once: what ranks say to each other and how it is encoded.

Two kinds of traffic, on separate MPI tags:
- ring messages (TAG_RING), always to the next rank and from the previous one: a `Header` of
  int64 values, then the activation buffer [B, L, D] (FORWARD), the token ids (FORWARD within
  stage 0's group) or an int64 payload (control ops), then the last stage's share of the head
  (`part`) when it has one. `encode` gives a message's buffers, `decode` rebuilds it from
  them; ring.py only moves the buffers;
- requests (TAG_REQ), small Python objects from rank 0 to every other rank, which say what
  the ring messages that follow belong to (a chat turn, a batch), and stats replies (TAG_STATS);
- within a tensor-parallel stage (ring.py GroupLink), its leader passes every ring message it
  handles on to the group's other ranks (TAG_GROUP), encoded the same way; stage 0's leader
  sends the tokens it embeds (`Message.tokens`) and the rows its head projects (Op.HEAD).

Every rank applies the control ops (OPEN, JOIN, FILTER, TRIM, SAVE, DROP, END) in the order
they travel the ring, so the cache tables of all ranks (prompt-cache entries included) stay
alike without any other synchronization.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import IntEnum, IntFlag

import mlx.core as mx
import numpy as np

TAG_RING, TAG_REQ, TAG_STATS, TAG_GROUP = 11, 12, 13, 14


class Op(IntEnum):
    FORWARD = 1  # activation of micro-batch `mb`: run the stage's layers on it
    END = 2  # the current request is over: every rank drops its batch caches
    OPEN = 3  # new caches for id `mb` (a sequence about to be prefilled): empty, or with a
    #           payload [entry, keep, length] a copy of prefix-cache entry `entry` (which
    #           holds `length` tokens) cut back to its first `keep`
    JOIN = 4  # merge the caches of the ids in the payload into micro-batch `mb`
    FILTER = 5  # keep only the rows in the payload of micro-batch `mb` (empty: drop it)
    TRIM = 6  # drop the last payload[0] positions of the conversation's caches (mb 0): the
    #           proposals a speculative pass rejected
    HEAD = 7  # within stage 0's tensor-parallel group only (TAG_GROUP): compute your part of
    #           the vocabulary-parallel head for the normed rows h: [B, 1, D]
    SAVE = 8  # keep row payload[1] of micro-batch `mb`'s caches as prefix-cache entry
    #           payload[0] (a finished sequence: prompt and answer); without payload[1], the
    #           caches of sequence `mb` being prefilled (its prompt)
    DROP = 9  # forget the prefix-cache entries in the payload (empty payload: every entry)


class Flag(IntFlag):
    NONE = 0
    RETURN = 1  # the last stage sends this activation back to rank 0
    HEAD = 2  # the last stage adds a summary of its share of the head (exec/head.py)
    LOGITS = 4  # ... or its share's logits themselves (rows that are sampled need them all)


# Requests from rank 0 (TAG_REQ). Ring messages follow Run and Batch until an END.
@dataclass(frozen=True)
class Run:
    """One generation on the conversation's caches (chat turn, one-shot): keep the first
    `keep` cached tokens, drop the rest."""
    keep: int


@dataclass(frozen=True)
class Batch:
    """Micro-batched generation on batch caches (batch, serve, bench); the conversation's
    caches are not used and not kept."""


@dataclass(frozen=True)
class Stats:
    """Reply with this rank's figures (TAG_STATS)."""


@dataclass(frozen=True)
class Quit:
    """Leave the worker loop."""


Request = Run | Batch | Stats | Quit


@dataclass
class Message:
    """One ring message. A field has one meaning, whichever way the message travels."""

    op: Op
    mb: int = 0  # micro-batch (or prefilling sequence) id; 0 is the conversation
    flags: Flag = Flag.NONE
    h: mx.array | None = None  # FORWARD: activations [B, L, D]; HEAD: normed rows [B, 1, D]
    payload: list[int] = field(default_factory=list)  # JOIN: ids; FILTER: rows; TRIM: [n];
    #                                                   OPEN, SAVE, DROP: see Op
    head_rows: int = 0  # HEAD/LOGITS: vocabulary rows [0, head_rows) the last stage computes
    busy_us: int = 0  # on the way back: the last stage's compute time for this step
    part: object = None  # the last stage's head share: HEAD float64 [B, cols], LOGITS [B, C]
    tokens: mx.array | None = None  # FORWARD within stage 0's group: the token ids [B, L]


_WIRE = {  # mlx dtype -> (code, numpy dtype on the wire, view back)
    mx.float32: (0, np.float32, None),
    mx.float16: (1, np.float16, None),
    mx.bfloat16: (2, np.uint16, mx.bfloat16),  # numpy has no bfloat16: ship the bits
}
TOKENS = 3  # the dtype code of a message that carries token ids (int32) instead of h
_FROM_CODE = {code: (np_dtype, view) for code, np_dtype, view in _WIRE.values()}


@dataclass(frozen=True)
class Header:
    """The int64 values that open every message, in this order (control ops: b = payload
    length; code: h's dtype, or TOKENS; cols: columns of the head share that follows)."""

    op: Op
    mb: int = 0
    flags: Flag = Flag.NONE
    code: int = 0
    b: int = 0
    l: int = 0
    d: int = 0
    head_rows: int = 0
    busy_us: int = 0
    cols: int = 0

    def encode(self) -> np.ndarray:
        return np.array([int(getattr(self, f.name)) for f in fields(self)], np.int64)

    @classmethod
    def decode(cls, buf: np.ndarray) -> "Header":
        values = dict(zip((f.name for f in fields(cls)), (int(x) for x in buf)))
        return cls(**{**values, "op": Op(values["op"]), "flags": Flag(values["flags"])})

    @property
    def carries_rows(self) -> bool:
        """An activation (or token ids) follows, not a payload."""
        return self.op in (Op.FORWARD, Op.HEAD)


HEADER_FIELDS = len(fields(Header))


def to_wire(a: mx.array) -> tuple[int, np.ndarray]:
    """(dtype code, contiguous numpy buffer) of an evaluated array."""
    code, _, view = _WIRE[a.dtype]
    return code, np.ascontiguousarray(a.view(mx.uint16) if view is not None else a)


def from_wire(code: int, buf: np.ndarray) -> mx.array:
    a = mx.array(buf)
    view = _FROM_CODE[code][1]
    return a.view(view) if view is not None else a


def encode(msg: Message) -> list[np.ndarray]:
    """The buffers of a message, header first."""
    if msg.tokens is not None:  # [B, L] token ids (the group embeds them itself)
        b, l = msg.tokens.shape
        header = Header(msg.op, msg.mb, msg.flags, TOKENS, b, l, 1, msg.head_rows, msg.busy_us)
        return [header.encode(), np.ascontiguousarray(msg.tokens.astype(mx.int32))]
    if msg.h is None:
        header = Header(msg.op, msg.mb, msg.flags, b=len(msg.payload))
        payload = [np.array(msg.payload, dtype=np.int64)] if msg.payload else []
        return [header.encode(), *payload]
    code, buf = to_wire(msg.h)  # h: [B, L, D], evaluated
    part = None
    if msg.part is not None:  # a float64 summary [B, cols], or logits in h's dtype
        part = (np.ascontiguousarray(msg.part, np.float64) if msg.flags & Flag.HEAD
                else to_wire(msg.part.astype(msg.h.dtype))[1])
    header = Header(msg.op, msg.mb, msg.flags, code, *msg.h.shape, msg.head_rows, msg.busy_us,
                    part.shape[1] if part is not None else 0)
    return [header.encode(), buf] + ([part] if part is not None else [])


def decode(raw: np.ndarray, receive) -> Message:
    """The message whose header is `raw`; `receive(buffer)` fills each buffer that follows the
    header from the wire, in the order encode() produced them."""
    hdr = Header.decode(raw)
    if not hdr.carries_rows:
        payload = np.empty(hdr.b, dtype=np.int64)
        if hdr.b:
            receive(payload)
        return Message(hdr.op, hdr.mb, hdr.flags, payload=payload.tolist())
    if hdr.code == TOKENS:
        ids = np.empty((hdr.b, hdr.l), dtype=np.int32)
        receive(ids)
        return Message(hdr.op, hdr.mb, hdr.flags, tokens=mx.array(ids),
                       head_rows=hdr.head_rows, busy_us=hdr.busy_us)
    buf = np.empty((hdr.b, hdr.l, hdr.d), dtype=_FROM_CODE[hdr.code][0])
    receive(buf)
    msg = Message(hdr.op, hdr.mb, hdr.flags, h=from_wire(hdr.code, buf),
                  head_rows=hdr.head_rows, busy_us=hdr.busy_us)
    if hdr.cols:  # the head share that follows the activation
        head = hdr.flags & Flag.HEAD
        part = np.empty((hdr.b, hdr.cols), np.float64 if head else _FROM_CODE[hdr.code][0])
        receive(part)
        msg.part = part if head else from_wire(hdr.code, part)
    return msg
