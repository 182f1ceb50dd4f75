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

import mlx.core as mx
import numpy as np
from mpi4py import MPI

TAG_RING, TAG_REQ, TAG_STATS = 11, 12, 13

# ring header ops
OP_FORWARD, OP_END = 1, 2
# ring header flags
FLAG_RETURN = 1  # the last stage sends this activation back to rank 0

_WIRE = {  # mlx dtype -> (code, numpy dtype on the wire, view back)
    mx.float32: (0, np.float32, None),
    mx.float16: (1, np.float16, None),
    mx.bfloat16: (2, np.uint16, mx.bfloat16),  # numpy has no bfloat16: ship the bits
}
_FROM_CODE = {code: (np_dtype, view) for code, np_dtype, view in _WIRE.values()}
_HEADER_LEN = 6  # op, flags, dtype code, B, L, D


class Ring:
    """This rank's links in the ring 0 -> 1 -> ... -> N-1 -> 0."""

    def __init__(self, comm: MPI.Comm):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.next = (self.rank + 1) % self.size
        self.prev = (self.rank - 1) % self.size
        self._inflight: list = []  # (requests, buffers kept alive until done)
        self.bytes_sent = 0

    @property
    def is_last_stage(self) -> bool:
        return self.rank == self.size - 1

    def _complete_sends(self) -> None:
        for reqs, _ in self._inflight:
            MPI.Request.Waitall(reqs)
        self._inflight.clear()

    def send(self, op: int, h: mx.array | None = None, flags: int = 0) -> None:
        """Post header (+ activation) to the next rank without waiting for delivery."""
        self._complete_sends()
        if h is None:
            header = np.array([op, flags, 0, 0, 0, 0], dtype=np.int64)
            self._inflight.append(([self.comm.Isend(header, self.next, TAG_RING)], header))
            return
        code, np_dtype, view = _WIRE[h.dtype]
        wire = h.view(mx.uint16) if view is not None else h
        buf = np.ascontiguousarray(wire)  # h: [B, L, D], evaluated
        b, l, d = h.shape
        header = np.array([op, flags, code, b, l, d], dtype=np.int64)
        reqs = [
            self.comm.Isend(header, self.next, TAG_RING),
            self.comm.Isend(buf, self.next, TAG_RING),
        ]
        self._inflight.append((reqs, (header, buf)))
        self.bytes_sent += buf.nbytes

    def recv(self) -> tuple[int, int, mx.array | None]:
        """Blocking receive of (op, flags, activation) from the previous rank."""
        header = np.empty(_HEADER_LEN, dtype=np.int64)
        self.comm.Recv(header, self.prev, TAG_RING)
        op, flags, code, b, l, d = (int(x) for x in header)
        if op != OP_FORWARD:
            return op, flags, None
        np_dtype, view = _FROM_CODE[code]
        buf = np.empty((b, l, d), dtype=np_dtype)
        self.comm.Recv(buf, self.prev, TAG_RING)
        h = mx.array(buf)
        return op, flags, h.view(view) if view is not None else h

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
