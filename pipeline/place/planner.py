"""Pure placement: which contiguous layers each rank runs, from model costs and capacities.

Decoding one sequence runs the stages one after another and reads every weight it uses
once per token, so

    per-token time ~ sum_i read_bytes_i / bandwidth_i + sum of hop times,

where a dense model reads all its weights and a mixture of experts only the shared ones and
the k experts its router picks per layer (ModelCost.layer_read_bytes); memory holds them all.

`plan_layers` minimizes that subject to every rank fitting weights + KV cache for
`max_context` tokens + headroom into its usable memory (`memory_fraction` of its memory,
capped by a device limit). Rank 0 also holds the embedding, final norm and head. Ties
(equal bandwidths) go to the split whose slowest stage is fastest: with micro-batched
pipelining (batch mode, serve) that stage sets the pace. Remaining ties (and bandwidth
unknown) go to the split with the lowest peak memory use relative to each rank's usable
memory: a memory-proportional split. When nothing fits,
`PlanError` says which ranks are short by how much and what would fit instead.
No MPI, no MLX: plain numbers in, plain numbers out.

A stage may be a tensor-parallel group of ranks (place/groups.py chooses the groups and adds
their all-reduces to the stage times search.py compares); `Plan.groups` says which, and
`Plan.split` counts layers per stage.
"""

from __future__ import annotations

from pipeline.place.layout import (  # noqa: F401  (the planner's names, imported from here)
    DEFAULT_HOP_LATENCY_S,
    DEFAULT_LINK_BANDWIDTH,
    DEFAULT_MAX_CONTEXT,
    DEFAULT_MEMORY_FRACTION,
    HEAD_SHARE_MAX,
    HEADROOM_BYTES,
    HIGH_CONCURRENCY,
    GiB,
    ModelCost,
    Node,
    Plan,
    PlanError,
    RankPlan,
    StageCost,
    fmt_bytes,
)
from pipeline.place.search import describe_split, search_split, share_rows
from pipeline.place.shortfall import explain, shortfall
from pipeline.place.split import check_rank_count


def plan_layers(cost: ModelCost, nodes: list[Node], max_context: int, *,
                memory_fraction: float = DEFAULT_MEMORY_FRACTION,
                headroom_bytes: int = HEADROOM_BYTES, hops: float | list[float] = 0.0,
                alternatives: list[tuple[str, ModelCost]] = (), share_head: bool = True) -> Plan:
    """Layers per rank minimizing the per-token time, every rank within its memory.

    `nodes` are in rank order (rank 0 first: it holds the head). `alternatives` are other
    variants of the model (label, cost), e.g. ("a 4-bit quantized variant", cost4): named
    in the error when they would fit and this one does not. Raises PlanError.

    share_head: let the last rank hold part of the head (share_rows) when that still fits.
    """
    _check(cost, nodes, max_context, memory_fraction)
    share = share_rows(cost, len(nodes)) if share_head else 0
    split = search_split(cost, nodes, max_context, memory_fraction, headroom_bytes,
                    use_time=True, enforce=True, share=share) if share else None
    if split is None:
        share = 0
        split = search_split(cost, nodes, max_context, memory_fraction, headroom_bytes,
                        use_time=True, enforce=True)
    if split is None:
        raise PlanError(explain(cost, nodes, max_context, memory_fraction, headroom_bytes,
                                alternatives))
    return describe_split(cost, nodes, split, max_context, memory_fraction, headroom_bytes, hops,
                          share)


def check_split(cost: ModelCost, nodes: list[Node], split: list[int], max_context: int, *,
                memory_fraction: float = DEFAULT_MEMORY_FRACTION,
                headroom_bytes: int = HEADROOM_BYTES,
                hops: float | list[float] = 0.0, share_head: bool = True) -> Plan:
    """The plan of a user's `--split` (sharing the head when the last rank has room for its
    rows); PlanError when a rank would not fit."""
    _check(cost, nodes, max_context, memory_fraction)
    share = share_rows(cost, len(nodes)) if share_head else 0
    plan = describe_split(cost, nodes, split, max_context, memory_fraction, headroom_bytes, hops,
                          share)
    if share and any(r.need_bytes > r.usable_bytes for r in plan.ranks):
        plan = describe_split(cost, nodes, split, max_context, memory_fraction, headroom_bytes,
                              hops)
    short = [shortfall(r) for r in plan.ranks if r.need_bytes > r.usable_bytes]
    if short:
        raise PlanError(f"--split {','.join(map(str, split))} does not fit at --max-context "
                        f"{max_context} and --memory-fraction {memory_fraction:g}:\n  "
                        + "\n  ".join(short))
    return plan


def _check(cost: ModelCost, nodes: list[Node], max_context: int, fraction: float) -> None:
    check_rank_count(cost.num_layers, len(nodes))
    if not 0 < fraction <= 1:
        raise PlanError(f"--memory-fraction {fraction:g} must be in (0, 1]")
    if max_context < 1:
        raise PlanError(f"--max-context {max_context} must be at least 1 token")
