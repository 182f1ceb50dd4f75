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


def brute_force_plan(cost, nodes, n_layers: int):
    """The planner's plan for `cost` on `nodes` (max context 16, no headroom, all memory
    usable), checked to be as fast as the fastest feasible split found by trying every one;
    None when no split fits (and the planner must say so)."""
    import itertools

    import pytest

    from pipeline.place.planner import PlanError, describe_split, plan_layers

    feasible = []
    for cuts in itertools.combinations(range(1, n_layers), len(nodes) - 1):
        split = [b - a for a, b in zip((0, *cuts), (*cuts, n_layers))]
        plan = describe_split(cost, nodes, split, 16, 1.0, 0)
        if all(r.need_bytes <= r.usable_bytes for r in plan.ranks):
            feasible.append(plan.est_ms_per_token)
    if not feasible:
        with pytest.raises(PlanError):
            plan_layers(cost, nodes, 16, memory_fraction=1.0, headroom_bytes=0)
        return None
    plan = plan_layers(cost, nodes, 16, memory_fraction=1.0, headroom_bytes=0)
    assert plan.est_ms_per_token == pytest.approx(min(feasible), rel=1e-9)
    return plan


def launch_script(name: str):
    """A launch/ script (no .py suffix) imported as a module."""
    import importlib.machinery
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "launch" / name
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module
