"""The wire protocol without MPI: every message type goes through encode() and decode() (the
buffers ring.py moves) and comes back equal, bfloat16 activations and float64 head shares
included; the header's field order is written once."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.wire.protocol import (HEADER_FIELDS, TOKENS, Flag, Header, Message, Op, decode,
                                    encode)

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
CONTROL = [Op.END, Op.OPEN, Op.JOIN, Op.FILTER, Op.TRIM, Op.SAVE, Op.DROP]


def through_the_wire(msg: Message) -> Message:
    bufs = encode(msg)
    rest = iter(bufs[1:])

    def receive(buf: np.ndarray) -> None:  # what an MPI receive into `buf` does
        sent = next(rest)
        assert sent.dtype == buf.dtype and sent.shape == buf.shape
        buf[...] = sent

    assert bufs[0].dtype == np.int64 and bufs[0].shape == (HEADER_FIELDS,)
    got = decode(bufs[0].copy(), receive)
    assert next(rest, None) is None  # every buffer sent was read
    return got


def same_array(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(mx.array_equal(a, b).item())


small = st.integers(0, 2**31 - 1)
flags = st.sampled_from([Flag.NONE, Flag.RETURN, Flag.RETURN | Flag.HEAD,
                         Flag.RETURN | Flag.LOGITS, Flag.HEAD])


@settings(max_examples=60, deadline=None)
@given(op=st.sampled_from(CONTROL), mb=small, fl=flags,
       payload=st.lists(st.integers(-2**62, 2**62), max_size=20))
def test_control_messages_round_trip(op, mb, fl, payload):
    got = through_the_wire(Message(op, mb, fl, payload=payload))
    assert (got.op, got.mb, got.flags, got.payload) == (op, mb, fl, payload)
    assert got.h is None and got.tokens is None and got.part is None


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(DTYPES), b=st.integers(1, 5), l=st.integers(1, 7),
       d=st.integers(1, 33), mb=small, head_rows=small, busy_us=small,
       part=st.sampled_from([None, "HEAD", "LOGITS"]), cols=st.integers(1, 9),
       seed=st.integers(0, 2**31 - 1), op=st.sampled_from([Op.FORWARD, Op.HEAD]))
def test_activations_and_head_shares_round_trip(dtype, b, l, d, mb, head_rows, busy_us, part,
                                                cols, seed, op):
    key = mx.random.key(seed)
    h = (mx.random.normal((b, l, d), key=key) * 1e3).astype(dtype)
    fl, share = Flag.RETURN, None
    if part == "HEAD":  # a float64 summary per row
        fl, share = fl | Flag.HEAD, np.random.default_rng(seed).normal(size=(b, cols)) * 1e9
    elif part == "LOGITS":  # logits in h's dtype
        fl, share = fl | Flag.LOGITS, (mx.random.normal((b, cols), key=key) * 50).astype(dtype)
    mx.eval(h)
    msg = Message(op, mb, fl, h=h, head_rows=head_rows, busy_us=busy_us, part=share)
    got = through_the_wire(msg)
    assert (got.op, got.mb, got.flags, got.head_rows, got.busy_us) == (
        op, mb, fl, head_rows, busy_us)
    assert same_array(got.h, h)  # bit for bit, bfloat16 included
    if part == "HEAD":
        assert got.part.dtype == np.float64 and np.array_equal(got.part, share)
    elif part == "LOGITS":
        assert same_array(got.part, share)
    else:
        assert got.part is None
    assert got.tokens is None


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.lists(st.integers(0, 2**31 - 1), min_size=3, max_size=3), min_size=1,
                    max_size=4), mb=small, fl=flags)
def test_token_ids_travel_in_their_own_field(ids, mb, fl):
    tokens = mx.array(ids, dtype=mx.int32)
    got = through_the_wire(Message(Op.FORWARD, mb, fl, tokens=tokens))
    assert got.h is None and same_array(got.tokens, tokens) and got.flags == fl
    assert Header.decode(encode(Message(Op.FORWARD, tokens=tokens))[0]).code == TOKENS


def test_the_header_is_written_in_one_order():
    hdr = Header(Op.FORWARD, 7, Flag.RETURN | Flag.HEAD, 2, 3, 4, 5, 6, 8, 9)
    assert Header.decode(hdr.encode()) == hdr
    assert list(hdr.encode()) == [1, 7, 3, 2, 3, 4, 5, 6, 8, 9]
    assert HEADER_FIELDS == len(hdr.encode())
