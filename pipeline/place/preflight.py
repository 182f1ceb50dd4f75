"""Preflight: the capacities a job plans with and the placement it runs with.

Under mpirun every rank measures itself (memory, bandwidth, disk; cluster.py) and the ring's
hops are timed (`measure_cluster`, collective); a hostfile then only caps memory (`# pipeline:
mem=`). Without mpirun a hostfile's declarations are the capacities (one rank per slot).
Rank 0 then plans (`preflight_plan`: the planner's split, or --split checked to fit, over
stages of one rank or of tensor-parallel groups, place/groups.py). The
`plan` command (commands/plan.py) prints the same decision without loading anything.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pipeline.place.cluster import Capacity, CapacityError, gather_capacities, measure_hops
from pipeline.place.cost import config_cost, default_max_context, model_cost, quantized_alternatives
from pipeline.place.hostfile import HostEntry, HostfileError, rank_entries, read_hostfile
from pipeline.place.groups import layouts, plan_groups, ring_links
from pipeline.place.planner import (DEFAULT_MEMORY_FRACTION, HEADROOM_BYTES, HIGH_CONCURRENCY,
                                    ModelCost, Node,
                                    Plan, PlanError, check_split, fmt_bytes)
from pipeline.place.shortfall import explain
from pipeline.place.split import check_rank_count, parse_split
from pipeline.place.tp import is_shardable, tp_problem


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
        nodes.append(Node(rank, e.host, e.memory_bytes // shares[id(e)], e.bandwidth,
                          latency_s=e.latency_s, flops=e.flops))
    return nodes


def planning_memory(cap: Capacity, on_first_host: bool) -> int:
    """A rank's memory for the plan: its share of the host's total. On rank 0's host (the Mac
    you type on, with a browser and an editor open) no more than its share of what is
    available now: the other hosts run only their ranks, so their total is what they have."""
    share = max(cap.local_ranks, 1)
    memory = cap.total_memory // share
    if on_first_host and cap.available_memory is not None:
        memory = min(memory, cap.available_memory // share)
    return memory


def nodes_from_capacities(caps: list[Capacity], entries: list[HostEntry] | None = None,
                          source: str = "hostfile") -> list[Node]:
    """Measured capacities. Ranks on one host share its memory (on rank 0's host: its
    available memory, see planning_memory), and get the host's mean bandwidth (so that probe
    noise between them does not steer the split). A hostfile line's `mem=` caps the memory of
    the ranks mapped to it (mpirun's default: by slot)."""
    slots = _slots_for(entries, len(caps), source) if entries else None
    shares = _ranks_per_entry(slots) if slots else {}
    by_host: dict[str, list[float]] = {}
    flops_by_host: dict[str, list[float]] = {}
    for c in caps:
        if c.bandwidth:
            by_host.setdefault(c.host, []).append(c.bandwidth)
        if c.flops:
            flops_by_host.setdefault(c.host, []).append(c.flops)
    nodes = []
    for c in caps:
        share = max(c.local_ranks, 1)
        memory = planning_memory(c, c.host == caps[0].host)
        if slots and slots[c.rank].memory_bytes is not None:
            memory = min(memory, slots[c.rank].memory_bytes // shares[id(slots[c.rank])])
        bws, rates = by_host.get(c.host), flops_by_host.get(c.host)
        nodes.append(Node(c.rank, c.host, memory, sum(bws) / len(bws) if bws else None,
                          c.memory_limit // share if c.memory_limit else None,
                          slots[c.rank].latency_s if slots else None,
                          sum(rates) / len(rates) if rates else None))
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


def tp_problems(config: dict | None, size: int) -> dict[int, str]:
    """Group sizes 2..size the model cannot be split into -> why (tp.tp_problem)."""
    if config is None:
        return {}
    shardable = is_shardable(config)
    found = {n: tp_problem(config, n, shardable) for n in range(2, size + 1)}
    return {n: why for n, why in found.items() if why}


def plan_job(cost: ModelCost, nodes: list[Node], max_context: int, *,
             memory_fraction: float = DEFAULT_MEMORY_FRACTION, split: str | None = None,
             hops: float | list[float] | None = None,
             alternatives: list[tuple[str, ModelCost]] = (), share_head: bool = True,
             tp: int | None = None, objective: str = "chat",
             config: dict | None = None, sequences: int = HIGH_CONCURRENCY,
             cache_bytes: int = 0) -> Plan:
    """The placement for a job: the planner's, or the user's `--split` (layers per stage)
    checked to fit. cache_bytes: the prompt cache's budget, counted on every rank beside
    its weights, KV cache and headroom, in the layout (stages' groups) chosen without it:
    the cache moves layers, never makes the stages slower ones; where it does not fit beside
    the model the plan keeps the most that does (Plan.cache_bytes below Plan.cache_asked,
    cache_note says so). tp: ranks per stage (None: the planner chooses, 1: pure pipeline).
    objective: "chat" or "throughput" (place/groups.py). config: the model's, to know
    which group sizes it can be split into (None: any). hops: measured seconds of each
    rank's outgoing hop (None: from the nodes' declared latencies). Raises PlanError (a
    SplitError) with what would fit."""
    if not 0 < memory_fraction <= 1:
        raise PlanError(f"--memory-fraction {memory_fraction:g} must be in (0, 1]")
    if max_context < 1:
        raise PlanError(f"--max-context {max_context} must be at least 1 token")
    size = len(nodes)
    problems = tp_problems(config, size) if tp != 1 else {}
    if tp is not None:
        layouts(size, tp, problems)  # raises when tp does not divide the ranks or the model
        check_rank_count(cost.num_layers, size // tp)
    layers = None
    if split:
        tp = tp or 1  # without --tp, a split per rank: the pure pipeline
        layers = parse_split(split, cost.num_layers, size // tp)
    links = ring_links(nodes, cost.hidden_bytes, hops)

    def place(cache: int, only: list[int] | None = None) -> Plan | None:
        return plan_groups(cost, nodes, links, max_context, fraction=memory_fraction,
                           headroom=HEADROOM_BYTES, tp=tp, objective=objective,
                           problems=problems, share_head=share_head, split=layers,
                           sequences=sequences, cache=cache, only=only)

    plan = place(0)
    if plan is not None and cache_bytes > 0:
        base = plan
        plan = _most_cache(lambda cache: place(cache, base.groups), cache_bytes, base)
        plan = replace(plan, layouts=base.layouts)
    if plan is not None:
        return replace(plan, cache_asked=cache_bytes)
    if layers is not None:
        if tp == 1:  # names the rank that is short
            check_split(cost, nodes, layers, max_context, memory_fraction=memory_fraction,
                        share_head=share_head)
        raise PlanError(f"--split {split} with --tp {tp} does not fit at --max-context "
                        f"{max_context} and --memory-fraction {memory_fraction:g}")
    check_rank_count(cost.num_layers, size)
    why = explain(cost, nodes, max_context, memory_fraction, HEADROOM_BYTES, alternatives)
    if tp and tp > 1:
        why = f"--tp {tp}: no split fits; as a pure pipeline, {why}"
    raise PlanError(why)


CACHE_STEP = 2**20  # a prompt-cache budget cut to fit is a whole number of MiB


def _most_cache(place, asked: int, base: Plan) -> Plan:
    """place(asked), or where that does not fit the plan with the largest prompt-cache
    budget that does, in CACHE_STEP units (base: the plan without a cache). A cache is an
    optimisation: a model that fits without it runs with what is left (cache_note)."""
    plan = place(asked)
    if plan is not None:
        return plan
    best, lo, hi = base, 0, -(-asked // CACHE_STEP)  # lo units fit, hi do not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        plan = place(mid * CACHE_STEP)
        lo, hi, best = (mid, hi, plan) if plan is not None else (lo, mid, best)
    return best


def cache_note(plan: Plan) -> str | None:
    """One line when --prompt-cache-bytes was cut to fit beside the model, else None."""
    if plan.cache_bytes >= plan.cache_asked:
        return None
    kept = plan.cache_bytes // CACHE_STEP
    return (f"--prompt-cache-bytes {fmt_bytes(plan.cache_asked)} per rank does not fit beside "
            f"the model at --max-context {plan.max_context} and --memory-fraction "
            f"{plan.memory_fraction:g}: "
            + (f"the prompt cache gets {kept}M per rank, what fits" if kept else
               "the prompt cache is off, no room is left for it")
            + f" (--prompt-cache-bytes {kept}M silences this; a smaller --max-context"
            + (" or a larger --memory-fraction" if plan.memory_fraction < 1 else "")
            + " leaves more)")


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


def nodes_for(caps: list[Capacity] | None, hostfile: str | None):
    """(nodes, table labels, where the capacities come from)."""
    entries = read_hostfile(hostfile) if hostfile else None
    if caps is not None:
        size = len(caps)
        source = (f"measured on {size} rank(s)" + (" under mpirun" if size > 1 else ", this machine")
                  + (f", memory capped by {hostfile}" if hostfile else ""))
        first = caps[0]
        if planning_memory(first, True) < first.total_memory // max(first.local_ranks, 1):
            source += (f"; rank 0's host counts the {fmt_bytes(first.available_memory)} "
                       f"available of its {fmt_bytes(first.total_memory)}")
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
                   dequantize: bool = False, share_head: bool = True,
                   tp: int | None = None, objective: str = "chat",
                   sequences: int = HIGH_CONCURRENCY, cache_bytes: int = 0) -> Plan:
    """Rank 0, before anything is loaded: the placement of a run on the capacities from
    `measure_cluster` (capped by the hostfile's `mem=`), or `--split` checked against them.
    `dequantize`: the run expands quantized weights at load, so plan with the dense sizes.
    tp: ranks per stage (None: the planner chooses; 1: pure pipeline); objective: "chat"
    (one sequence's token time) or "throughput" (the slowest stage's step, many sequences).
    cache_bytes: --prompt-cache-bytes, counted per rank (plan_job). Raises PlanError (a SplitError) saying which rank is short and what would fit, or why
    the model cannot run --tp N, or HostfileError / ModelError."""
    if dequantize and (config.get("quantization") or config.get("quantization_config")):
        cost = config_cost(config, dtype, quantization=None)
    else:
        cost = model_cost(path, config, dtype)
    nodes, _, _ = nodes_for(caps, hostfile)
    return plan_job(cost, nodes, max_context or default_max_context(config),
                    memory_fraction=memory_fraction, split=split, hops=hops,
                    alternatives=quantized_alternatives(config, cost.dtype),
                    share_head=share_head, tp=tp, objective=objective, config=config,
                    sequences=sequences, cache_bytes=cache_bytes)


