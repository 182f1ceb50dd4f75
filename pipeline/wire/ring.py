"""The ring over MPI: this rank's links to the next and previous rank, and rank 0's requests.

What the messages mean and how they are encoded: protocol.py. Sends are non-blocking (Isend)
so that two neighbours sending large buffers to each other at once cannot deadlock past the
eager limit; a send's buffers are kept alive until it completes. Every rank receives only
from its predecessor, in the order that predecessor sent: no stage waits on a message that
another stage is waiting to send.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from pipeline.wire.protocol import (HEADER_FIELDS, TAG_GROUP, TAG_REQ, TAG_RING, TAG_STATS,
                                    Message, Request, decode, encode)

SEND_DEPTH = 4  # messages a rank may have posted and not yet delivered
# Messages with a buffer above this are pushed along while the rank computes (see progress):
# Open MPI sends larger ones by rendezvous (shared memory from 4 KiB, TCP from 64 KiB),
# which moves only when the sender calls into MPI after the receiver has answered.
PROGRESS_BYTES = 4 * 1024
# A rank waiting for a message polls for up to SPIN_S, then sleeps between polls, starting at
# SLEEP_MIN_S and doubling up to SLEEP_MAX_S: a blocking MPI receive busy-polls a core for the
# whole wait, which on a box whose two vCPUs share a physical core slows the rank that computes
# (and heats a laptop for nothing). The sleep adds at most SLEEP_MAX_S to a message's arrival.
SPIN_S = 50e-6
SLEEP_MIN_S = 20e-6
SLEEP_MAX_S = 200e-6


def wait(requests: list) -> None:
    """Complete MPI requests without spinning a core for long (see SPIN_S)."""
    if MPI.Request.Testall(requests):
        return
    spin_until = time.perf_counter() + SPIN_S
    while time.perf_counter() < spin_until:
        if MPI.Request.Testall(requests):
            return
    delay = SLEEP_MIN_S
    while not MPI.Request.Testall(requests):
        time.sleep(delay)
        delay = min(delay * 2, SLEEP_MAX_S)


def leaders(groups: list[int]) -> list[int]:
    """The first rank of each stage, for stages of groups[s] consecutive ranks."""
    return [sum(groups[:s]) for s in range(len(groups))]


class Ring:
    """This rank's links in the ring of stages 0 -> 1 -> ... -> S-1 -> 0.

    A stage is one rank, or a tensor-parallel group of consecutive ranks (`groups`: ranks per
    stage, default one each) whose first rank, its leader, is the one on the ring."""

    tag = TAG_RING

    def __init__(self, comm: MPI.Comm, groups: list[int] | None = None):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        groups = groups or [1] * self.size
        starts = leaders(groups)
        self.stages = len(groups)
        self.stage = max(s for s, first in enumerate(starts) if first <= self.rank)
        self.next = starts[(self.stage + 1) % self.stages]
        self.prev = starts[(self.stage - 1) % self.stages]
        self._inflight: list = []  # (requests, buffers kept alive until done)
        self.bytes_sent = 0
        self.wait_s = 0.0  # time spent blocked in recv (idle, waiting for the previous stage)

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.stages - 1

    def _complete_sends(self, keep: int = 0) -> None:
        """Wait until at most `keep` posted messages are still in flight (oldest first)."""
        while len(self._inflight) > keep:
            reqs, _ = self._inflight.pop(0)
            wait(reqs)

    @property
    def sending(self) -> bool:
        """Whether a message above the eager size may still be on its way (worth calling
        progress() for). Header-only messages always go eagerly. Sends that have completed are
        dropped first: one counted after it arrived would make every layer of the next step
        evaluate and poll (on a GPU, a host round trip per layer)."""
        self.progress()
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
        bufs = encode(msg)
        self.bytes_sent += sum(b.nbytes for b in bufs[1:]) if msg.h is not None else 0
        reqs = [self.comm.Isend(b, self.next, TAG_RING) for b in bufs]
        self._inflight.append((reqs, bufs))

    def recv(self) -> Message:
        """Blocking receive of the next message from the previous rank."""
        raw = np.empty(HEADER_FIELDS, dtype=np.int64)
        start = time.perf_counter()
        wait([self.comm.Irecv(raw, self.prev, self.tag)])
        self.wait_s += time.perf_counter() - start
        return decode(raw, lambda buf: self.comm.Recv(buf, self.prev, self.tag))

    # -- requests: rank 0 to every other rank ------------------------------------------
    def request(self, request: Request) -> None:
        """Rank 0 tells every other rank what comes next (a broadcast by point-to-point sends,
        so that idle ranks can wait for it without spinning a core)."""
        for r in range(1, self.size):
            self.comm.send(request, dest=r, tag=TAG_REQ)

    def wait_request(self) -> Request:
        """Idle wait for rank 0's next request: poll with a growing sleep, not a busy loop."""
        delay = 1e-4
        while not self.comm.Iprobe(source=0, tag=TAG_REQ):
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        return self.comm.recv(source=0, tag=TAG_REQ)

    def gather_stats(self, mine: dict) -> list[dict]:
        """Rank 0 asks every rank for its figures (after request(Stats()))."""
        return [mine] + [self.comm.recv(source=r, tag=TAG_STATS) for r in range(1, self.size)]

    def reply_stats(self, mine: dict) -> None:
        self.comm.send(mine, dest=0, tag=TAG_STATS)

    def close(self) -> None:
        self._complete_sends()




class GroupLink:
    """A tensor-parallel stage's leader to the group's other ranks: every message the leader
    handles, passed on (TAG_GROUP) before the leader computes it, so that all of the group run
    the same layers on the same rows with the same caches and meet in the same all-reduces."""

    def __init__(self, comm: MPI.Comm, members: list[int]):
        self.comm, self.members = comm, members  # the other ranks of the group
        self._inflight: list = []

    def tell(self, msg: Message) -> None:
        while len(self._inflight) >= SEND_DEPTH:
            reqs, _ = self._inflight.pop(0)
            wait(reqs)
        bufs = encode(msg)
        reqs = [self.comm.Isend(b, r, TAG_GROUP) for r in self.members for b in bufs]
        self._inflight.append((reqs, bufs))

    def close(self) -> None:
        while self._inflight:
            wait(self._inflight.pop(0)[0])


class FollowerRing(Ring):
    """A tensor-parallel group's other ranks: they receive what their leader handles and
    send nothing on (the leader does); requests and stats go to rank 0 as on the ring."""

    tag = TAG_GROUP

    def __init__(self, comm: MPI.Comm, groups: list[int]):
        super().__init__(comm, groups)
        self.prev = leaders(groups)[self.stage]  # receive from the leader
        self.next = None

    @property
    def is_last_stage(self) -> bool:
        return False  # the shared head's part and the way back are the leader's

    @property
    def sending(self) -> bool:
        return False

    def send(self, msg: Message) -> None:
        pass
