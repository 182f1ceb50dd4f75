"""Messages between ranks: hidden states round the ring, requests from rank 0.

Two kinds of traffic, on separate tags:
- the ring (TAG_RING): a small int64 header then the activation buffer, always to `next`
  and from `prev`. Sends are non-blocking (Isend) so that two neighbours sending large
  buffers to each other at once cannot deadlock past the eager limit; a send's buffers
  are kept alive until it completes.
- requests (TAG_REQ): small Python objects from rank 0 to every other rank (what to run,
  how much of the KV cache to keep, sampling settings), and stats replies (TAG_STATS).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mpi4py import MPI

TAG_RING, TAG_REQ, TAG_STATS = 11, 12, 13

# ring header ops
OP_FORWARD = 1  # activation for micro-batch `mb`: run the stage's layers on it
OP_END = 2  # the current request is over
OP_OPEN = 3  # new empty caches for id `mb` (a sequence about to be prefilled)
OP_JOIN = 4  # merge the caches of the ids in the payload into micro-batch `mb`
OP_FILTER = 5  # keep only the rows in the payload of micro-batch `mb`
# ring header flags
FLAG_RETURN = 1  # the last stage sends this activation back to rank 0
FLAG_HEAD = 2  # the last stage adds its share of the head: per row max, argmax, near-tie count
FLAG_LOGITS = 4  # ... or its share's logits themselves (rows that are sampled need them all)

_WIRE = {  # mlx dtype -> (code, numpy dtype on the wire, view back)
    mx.float32: (0, np.float32, None),
    mx.float16: (1, np.float16, None),
    mx.bfloat16: (2, np.uint16, mx.bfloat16),  # numpy has no bfloat16: ship the bits
}
_FROM_CODE = {code: (np_dtype, view) for code, np_dtype, view in _WIRE.values()}
# op, mb, flags, dtype code, B, L, D, aux, part columns  (control ops: B = payload length).
# aux: on the way to the last stage, how many vocabulary rows it computes (FLAG_HEAD /
# FLAG_LOGITS); on the way back, its busy time for the step in microseconds.
_HEADER_LEN = 9


def _to_wire(a: mx.array) -> tuple[int, np.ndarray]:
    code, _, view = _WIRE[a.dtype]
    return code, np.ascontiguousarray(a.view(mx.uint16) if view is not None else a)


@dataclass
class Message:
    op: int
    mb: int = 0
    flags: int = 0
    h: mx.array | None = None  # OP_FORWARD: [B, L, D]
    payload: list[int] = field(default_factory=list)  # control ops
    aux: int = 0  # see _HEADER_LEN
    part: object = None  # the last stage's head share: FLAG_HEAD float64 [B, 3], FLAG_LOGITS [B, C]


SEND_DEPTH = 4  # messages a rank may have posted and not yet delivered
# Messages with a buffer above this are pushed along while the rank computes (see progress):
# Open MPI sends larger ones by rendezvous (shared memory from 4 KiB, TCP from 64 KiB),
# which moves only when the sender calls into MPI after the receiver has answered.
PROGRESS_BYTES = 4 * 1024


class Ring:
    """This rank's links in the ring 0 -> 1 -> ... -> N-1 -> 0."""

    def __init__(self, comm: MPI.Comm):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.next = (self.rank + 1) % self.size
        self.prev = (self.rank - 1) % self.size
        self._inflight: list = []  # (requests, buffers kept alive until done)
        self.bytes_sent = 0
        self.wait_s = 0.0  # time spent blocked in recv (idle, waiting for the previous stage)

    @property
    def is_last_stage(self) -> bool:
        return self.rank == self.size - 1

    def _complete_sends(self, keep: int = 0) -> None:
        """Wait until at most `keep` posted messages are still in flight (oldest first)."""
        while len(self._inflight) > keep:
            reqs, _ = self._inflight.pop(0)
            MPI.Request.Waitall(reqs)

    @property
    def sending(self) -> bool:
        """Whether a message above the eager size may still be on its way (worth calling
        progress() for). Header-only messages always go eagerly."""
        return any(b.nbytes > PROGRESS_BYTES for _, bufs in self._inflight for b in bufs)

    def progress(self) -> None:
        """Let MPI move posted sends while this rank computes. Open MPI moves a message above
        the eager size only during MPI calls: without this a prefill chunk would wait at the
        sender until it posts the next one (a whole chunk's compute later), and over TCP a
        decode step's activations (64 KiB for 16 rows of 1024 floats) would wait while rank 0
        computes the next micro-batch (measured, 2 nodes over TCP, 32 sequences: 143 tok/s
        with rank 0 waiting ~25 ms a step, against 170 with progress)."""
        while self._inflight and MPI.Request.Testall(self._inflight[0][0]):
            self._inflight.pop(0)

    def send(self, msg: Message) -> None:
        """Post header (+ activation or payload) to the next rank without waiting for delivery.

        Up to SEND_DEPTH messages stay in flight, so a stage that runs ahead (prefill chunks)
        is not held up by one slow step of the next stage."""
        self._complete_sends(SEND_DEPTH - 1)
        if msg.h is None:
            header = np.array([msg.op, msg.mb, msg.flags, 0, len(msg.payload), 0, 0, 0, 0],
                              np.int64)
            bufs = [header]
            if msg.payload:
                bufs.append(np.array(msg.payload, dtype=np.int64))
        else:
            code, buf = _to_wire(msg.h)  # h: [B, L, D], evaluated
            b, l, d = msg.h.shape
            part = None
            if msg.part is not None:  # [B, 3] float64 summary, or logits in h's dtype
                part = (np.ascontiguousarray(msg.part, np.float64) if msg.flags & FLAG_HEAD
                        else _to_wire(msg.part.astype(msg.h.dtype))[1])
            cols = part.shape[1] if part is not None else 0
            bufs = [np.array([msg.op, msg.mb, msg.flags, code, b, l, d, msg.aux, cols],
                             np.int64), buf]
            if part is not None:
                bufs.append(part)
                self.bytes_sent += part.nbytes
            self.bytes_sent += buf.nbytes
        reqs = [self.comm.Isend(b, self.next, TAG_RING) for b in bufs]
        self._inflight.append((reqs, bufs))

    def recv(self) -> Message:
        """Blocking receive of the next message from the previous rank."""
        header = np.empty(_HEADER_LEN, dtype=np.int64)
        start = time.perf_counter()
        self.comm.Recv(header, self.prev, TAG_RING)
        self.wait_s += time.perf_counter() - start
        op, mb, flags, code, b, l, d, aux, cols = (int(x) for x in header)
        if op != OP_FORWARD:
            payload = np.empty(b, dtype=np.int64)
            if b:
                self.comm.Recv(payload, self.prev, TAG_RING)
            return Message(op, mb, flags, payload=payload.tolist())
        msg = Message(op, mb, flags, h=self._recv_array(code, (b, l, d)), aux=aux)
        if cols and flags & FLAG_HEAD:
            msg.part = np.empty((b, cols), dtype=np.float64)
            self.comm.Recv(msg.part, self.prev, TAG_RING)
        elif cols:
            msg.part = self._recv_array(code, (b, cols))
        return msg

    def _recv_array(self, code: int, shape: tuple) -> mx.array:
        np_dtype, view = _FROM_CODE[code]
        buf = np.empty(shape, dtype=np_dtype)
        self.comm.Recv(buf, self.prev, TAG_RING)
        a = mx.array(buf)
        return a.view(view) if view is not None else a

    def close(self) -> None:
        self._complete_sends()


def send_request(comm: MPI.Comm, request: dict) -> None:
    """Rank 0 tells every other rank what comes next (a broadcast by point-to-point sends,
    so that idle ranks can wait for it without spinning a core)."""
    for r in range(1, comm.Get_size()):
        comm.send(request, dest=r, tag=TAG_REQ)


def wait_request(comm: MPI.Comm) -> dict:
    """Idle wait for rank 0's next request: poll with a growing sleep, not a busy loop."""
    delay = 1e-4
    while not comm.Iprobe(source=0, tag=TAG_REQ):
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return comm.recv(source=0, tag=TAG_REQ)


def gather_stats(comm: MPI.Comm, mine: dict) -> list[dict]:
    """Rank 0 asks every rank for its figures (after send_request({'op': 'stats'}))."""
    return [mine] + [comm.recv(source=r, tag=TAG_STATS) for r in range(1, comm.Get_size())]


def reply_stats(comm: MPI.Comm, mine: dict) -> None:
    comm.send(mine, dest=0, tag=TAG_STATS)
