"""`python -m pipeline plan`: how the layers would be placed, without loading any weight.

    python -m pipeline plan --model M --hostfile hostfiles/tb4      # declared capacities
    mpirun -np 3 python -m pipeline plan --model M [--hostfile H]   # measured capacities

Under mpirun every rank measures itself (memory, bandwidth, disk) and the ring's hops are
timed; a hostfile then only caps memory (`# pipeline: mem=`). Without mpirun the hostfile's
declarations are the capacities (one rank per slot); without either, this machine alone.
The runtime's preflight makes the same decision: `measure_cluster` on every rank, then
`preflight_plan` on rank 0.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from pipeline.place.cluster import Capacity, CapacityError, gather_capacities, measure_capacity, measure_hops
from pipeline.place.hostfile import HostEntry, HostfileError, read_hostfile, rank_entries
from pipeline.model.gguf import GGUFError
from pipeline.model.load import ModelError, read_config, resolve_model
from pipeline.place.cost import config_cost, default_max_context, model_cost, quantized_alternatives
from pipeline.place.planner import (DEFAULT_MEMORY_FRACTION, HEADROOM_BYTES, ModelCost, Node, Plan,
                        PlanError, check_split, fmt_bytes, hop_seconds, plan_layers)
from pipeline.place.split import SplitError, parse_split
from pipeline.model.stage import UnsupportedModel

PLAN_ERRORS = (ModelError, HostfileError, SplitError, UnsupportedModel, CapacityError,
               GGUFError, FileNotFoundError)
EXIT_USAGE = 2


def _ranks_per_entry(slots: list[HostEntry]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for e in slots:
        counts[id(e)] = counts.get(id(e), 0) + 1
    return counts


def _slots_for(entries: list[HostEntry], size: int, source: str) -> list[HostEntry]:
    slots = rank_entries(entries)
    if len(slots) < size:
        raise HostfileError(f"{source} has {len(slots)} slots but the job has {size} ranks: "
                            f"add hosts or slots=N")
    return slots[:size]


def nodes_from_hostfile(entries: list[HostEntry], source: str = "hostfile") -> list[Node]:
    """Declared capacities, one rank per slot; a line's `mem=` is shared by its ranks."""
    slots = rank_entries(entries)
    shares = _ranks_per_entry(slots)
    nodes = []
    for rank, e in enumerate(slots):
        if e.memory_bytes is None:
            raise HostfileError(f"{source}:{e.line}: {e.host} declares no memory: planning "
                                f"without mpirun needs `# pipeline: mem=64G` on every line")
        nodes.append(Node(rank, e.host, e.memory_bytes // shares[id(e)], e.bandwidth))
    return nodes


def nodes_from_capacities(caps: list[Capacity], entries: list[HostEntry] | None = None,
                          source: str = "hostfile") -> list[Node]:
    """Measured capacities. Ranks on one host share its memory, and get the host's mean
    bandwidth (so that probe noise between them does not steer the split). A hostfile line's
    `mem=` caps the memory of the ranks mapped to it (mpirun's default: by slot)."""
    slots = _slots_for(entries, len(caps), source) if entries else None
    shares = _ranks_per_entry(slots) if slots else {}
    by_host: dict[str, list[float]] = {}
    for c in caps:
        if c.bandwidth:
            by_host.setdefault(c.host, []).append(c.bandwidth)
    nodes = []
    for c in caps:
        share = max(c.local_ranks, 1)
        memory = c.total_memory // share
        if slots and slots[c.rank].memory_bytes is not None:
            memory = min(memory, slots[c.rank].memory_bytes // shares[id(slots[c.rank])])
        bws = by_host.get(c.host)
        nodes.append(Node(c.rank, c.host, memory, sum(bws) / len(bws) if bws else None,
                          c.memory_limit // share if c.memory_limit else None))
    return _merge_near_bandwidths(nodes)


BANDWIDTH_SAME = 1.2  # measured bandwidths closer than this factor count as one speed


def _merge_near_bandwidths(nodes: list[Node]) -> list[Node]:
    """Hosts whose probes differ by less than 20% get their mean bandwidth: two alike
    machines (or namespaces of one) measure a few % apart, and the planner would otherwise
    pile every layer that fits onto the one that happened to measure faster. Real
    differences between Macs are 1.5x and more (M4 Pro 273 GB/s, M4 Max 546)."""
    known = sorted({n.bandwidth for n in nodes if n.bandwidth})
    groups: list[list[float]] = []
    for bw in known:
        if groups and bw <= groups[-1][0] * BANDWIDTH_SAME:
            groups[-1].append(bw)
        else:
            groups.append([bw])
    merged = {bw: sum(g) / len(g) for g in groups for bw in g}
    return [replace(n, bandwidth=merged[n.bandwidth]) if n.bandwidth else n for n in nodes]


def plan_job(cost: ModelCost, nodes: list[Node], max_context: int, *,
             memory_fraction: float = DEFAULT_MEMORY_FRACTION, split: str | None = None,
             hops: float | list[float] | None = None,
             alternatives: list[tuple[str, ModelCost]] = (), share_head: bool = True) -> Plan:
    """The placement for a job: the planner's, or the user's `--split` checked to fit.
    Raises PlanError (a SplitError) with what would fit."""
    if hops is None:
        hops = hop_seconds(cost.hidden_bytes)
    if split:
        layers = parse_split(split, cost.num_layers, len(nodes))
        return check_split(cost, nodes, layers, max_context, memory_fraction=memory_fraction,
                           hops=hops, share_head=share_head)
    return plan_layers(cost, nodes, max_context, memory_fraction=memory_fraction, hops=hops,
                       alternatives=alternatives, share_head=share_head)


HOP_PROBE_BYTES = 16 * 2**10  # about one token's hidden state of a 70B model (8192 x 2 B)


def _ring_hop_seconds(hops, size: int) -> list[float]:
    one_way = {}
    for h in hops:
        one_way[(h.src, h.dst)] = one_way[(h.dst, h.src)] = h.one_way_s
    # one rank: no hop (its "ring" is itself)
    return [one_way.get((r, (r + 1) % size), 0.0) for r in range(size)]


def measure_cluster(comm, model_path: str | None,
                    payload_bytes: int = HOP_PROBE_BYTES) -> tuple[list[Capacity] | None,
                                                                   list[float] | None]:
    """Collective: every rank measures itself, then each ring hop is timed with messages of
    `payload_bytes`. Rank 0 gets (capacities, seconds of each rank's outgoing hop), the
    others (None, None). Raises CapacityError on rank 0 only, after every rank is done."""
    caps, error = None, None
    try:
        caps = gather_capacities(comm, model_path)
    except CapacityError as e:
        error = e
    hops = measure_hops(comm, payload_bytes)
    if error is not None:
        raise error
    return caps, None if hops is None else _ring_hop_seconds(hops, comm.Get_size())


def _fmt_number(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _fmt_bw(bw: float | None) -> str:
    return "?" if not bw else f"{bw / 1e9:.3g} GB/s"


def format_plan(plan: Plan, cost: ModelCost, labels: list[str], header: list[str]) -> str:
    rows = [("rank", "host", "memory", "usable", "bandwidth", "layers", "range", "weights",
             "KV cache", "est ms/token")]
    for r, label in zip(plan.ranks, labels):
        start, end = r.layer_range
        ms = "?" if r.est_ms_per_token is None else f"{r.est_ms_per_token:.3g}"
        rows.append((str(r.rank), label, fmt_bytes(r.memory_bytes), fmt_bytes(r.usable_bytes),
                     _fmt_bw(r.bandwidth), str(r.layers), f"{start}..{end - 1}",
                     fmt_bytes(r.weight_bytes), fmt_bytes(r.kv_bytes), ms))
    total_ms = plan.est_ms_per_token
    rows.append(("total", "", "", "", "", str(sum(plan.split)), "",
                 fmt_bytes(sum(r.weight_bytes for r in plan.ranks)),
                 fmt_bytes(sum(r.kv_bytes for r in plan.ranks)),
                 "?" if total_ms is None else f"{total_ms:.3g}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {0, 2, 3, 4, 5, 7, 8, 9}
    lines = [*header, ""]
    for row in rows:
        lines.append("  ".join(c.rjust(w) if i in right else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    if plan.tokens_per_s is not None:
        lines.append(f"\ntokens/s bound: {_fmt_number(plan.tokens_per_s)} (one sequence: weight bytes / "
                     f"bandwidth per rank + {plan.hop_ms:.3g} ms of hops per token)")
    else:
        lines.append("\ntokens/s bound: unknown (bandwidth not known for every rank: "
                     "split in proportion to memory)")
    return "\n".join(lines)


def _model(model: str | None, dtype: str | None):
    path = resolve_model(model)
    config = read_config(path)
    return path, config, model_cost(path, config, dtype)


def _nodes(caps: list[Capacity] | None, hostfile: str | None):
    """(nodes, table labels, where the capacities come from)."""
    entries = read_hostfile(hostfile) if hostfile else None
    if caps is not None:
        size = len(caps)
        source = (f"measured on {size} rank(s)" + (" under mpirun" if size > 1 else ", this machine")
                  + (f", memory capped by {hostfile}" if hostfile else ""))
        return (nodes_from_capacities(caps, entries, str(hostfile)),
                [f"{c.host} ({c.device}, {c.device_name})" for c in caps], source)
    if entries is None:
        raise PlanError("no capacities to plan with: run under mpirun or give --hostfile")
    return (nodes_from_hostfile(entries, str(hostfile)), [e.label for e in rank_entries(entries)],
            f"declared in {hostfile} (no mpirun: one rank per slot)")


def preflight_plan(path: Path, config: dict, caps: list[Capacity] | None,
                   hops: list[float] | None = None, *, hostfile: str | None = None,
                   max_context: int | None = None,
                   memory_fraction: float = DEFAULT_MEMORY_FRACTION,
                   dtype: str | None = None, split: str | None = None,
                   dequantize: bool = False, share_head: bool = True) -> Plan:
    """Rank 0, before anything is loaded: the placement of a run on the capacities from
    `measure_cluster` (capped by the hostfile's `mem=`), or `--split` checked against them.
    `dequantize`: the run expands quantized weights at load, so plan with the dense sizes.
    Raises PlanError (a SplitError) saying which rank is short and what would fit, or
    HostfileError / ModelError."""
    if dequantize and (config.get("quantization") or config.get("quantization_config")):
        cost = config_cost(config, dtype, quantization=None)
    else:
        cost = model_cost(path, config, dtype)
    nodes, _, _ = _nodes(caps, hostfile)
    return plan_job(cost, nodes, max_context or default_max_context(config),
                    memory_fraction=memory_fraction, split=split, hops=hops,
                    alternatives=quantized_alternatives(config, cost.dtype),
                    share_head=share_head)


def run_plan(model: str | None, hostfile: str | None = None, max_context: int | None = None,
             memory_fraction: float = DEFAULT_MEMORY_FRACTION, as_json: bool = False,
             comm=None, *, dtype: str | None = None, split: str | None = None,
             out=None) -> int:
    """Print the plan (rank 0) and return the exit code, the same on every rank: 0, or 2
    with one `pipeline: error:` line when the model does not fit or the input is wrong.

    comm: the job's communicator (None or size 1: no mpirun). dtype: the run's --dtype
    ("checkpoint": as stored; default: float32 on a CPU it measures, as the run would; the
    checkpoint's for hosts declared in a hostfile).
    """
    out = out or sys.stdout
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    measured = size > 1 or hostfile is None
    model_info, error = None, None
    if rank == 0:
        try:
            from pipeline.model.load import resolve_dtype

            # Hosts declared in a hostfile alone: devices unknown, the checkpoint's dtypes.
            dtype = resolve_dtype(dtype) if measured or dtype is not None else None
            model_info = _model(model, dtype)
        except PLAN_ERRORS as e:
            error = str(e)
    path = str(model_info[0]) if model_info else None
    hidden = model_info[2].hidden_bytes if model_info else 0
    if size > 1:
        error, path, hidden = comm.bcast((error, path, hidden), root=0)
    if error:
        if rank == 0:
            print(f"pipeline: error: {error}", file=sys.stderr, flush=True)
        return EXIT_USAGE

    caps, hops = None, None
    try:
        if size > 1:
            caps, hops = measure_cluster(comm, path, max(hidden, 1))
        elif measured:
            caps = [measure_capacity(0, path)]
    except CapacityError as e:  # rank 0 only
        error = str(e)
    code = 0
    if rank == 0:
        try:
            if error:
                raise CapacityError(error)
            _plan_and_print(model_info, hostfile, caps, hops, max_context, memory_fraction,
                            split, as_json, out)
        except PLAN_ERRORS as e:
            print(f"pipeline: error: {e}", file=sys.stderr, flush=True)
            code = EXIT_USAGE
    return comm.bcast(code, root=0) if size > 1 else code


def _plan_and_print(model_info, hostfile, caps, hops, max_context, memory_fraction, split,
                    as_json, out) -> None:
    path, config, cost = model_info
    max_context = max_context or default_max_context(config)
    nodes, labels, source = _nodes(caps, hostfile)
    plan = plan_job(cost, nodes, max_context, memory_fraction=memory_fraction, split=split,
                    hops=hops, alternatives=quantized_alternatives(config, cost.dtype))
    hop_note = "measured" if hops is not None else "assumed"
    if as_json:
        doc = {**plan.to_json(), "model": {"path": str(path), "description": cost.description,
               "num_layers": cost.num_layers, "head_bytes": cost.head_bytes},
               "source": source, "hops": hop_note, "headroom_bytes": HEADROOM_BYTES,
               "capacities": [c.to_json() for c in caps] if caps else None}
        print(json.dumps(doc), file=out, flush=True)
        return
    header = [f"model: {path}", f"  {cost.description}", f"capacities: {source}",
              f"max context {max_context} tokens, memory fraction {memory_fraction:g}, headroom "
              f"{fmt_bytes(HEADROOM_BYTES)} per rank, hops {hop_note}"
              + (f", --split {split}" if split else "")]
    if plan.head_share_rows:
        header.append(f"shared head: in batch/serve/bench the last rank also holds the head's "
                      f"first {plan.head_share_rows} of {cost.vocab} rows (counted in its "
                      f"weights; --no-share-head there)")
    print(format_plan(plan, cost, labels, header), file=out, flush=True)
