"""Helpers shared by the tests (fixtures stay in conftest.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass


class NullTokenizer:
    """Just enough tokenizer for a Driver fed token ids: no EOS, a detokenizer that keeps
    nothing."""

    eos_token_ids: list[int] = []

    class detokenizer:
        last_segment = ""

        @staticmethod
        def reset():
            pass

        @staticmethod
        def add_token(t):
            pass

        @staticmethod
        def finalize():
            pass


@dataclass
class Proc:
    pid: int
    ppid: int
    state: str  # "Z": a zombie, gone for our purposes
    start: str  # start time in clock ticks since boot: a pid reused later differs here
    cmd: bytes  # NUL-separated command line


def processes():
    """Every process readable in /proc now (Linux)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, IndexError, ValueError):
            continue
        yield Proc(int(pid), int(fields[1]), fields[0], fields[19], cmd)


def environ(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def rank_pid(rank: int, *markers: bytes) -> int | None:
    """The pid of MPI rank `rank` (OMPI_COMM_WORLD_RANK) whose command line holds every marker."""
    for p in processes():
        if (all(m in p.cmd for m in markers)
                and f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ(p.pid)):
            return p.pid
    return None
