"""The planner's search: the best contiguous split of the layers over the ranks (a dynamic
programme over ranks and layers) and the plan a split gives. No MPI, no MLX."""

from __future__ import annotations

from itertools import accumulate

from pipeline.place.layout import (
    DEFAULT_MEMORY_FRACTION,
    HEAD_SHARE_MAX,
    HEADROOM_BYTES,
    ModelCost,
    Node,
    Plan,
    RankPlan,
)
from pipeline.place.split import layer_ranges


def share_rows(cost: ModelCost, size: int) -> int:
    """Rows of the head the last rank of `size` would hold (0: no shared head)."""
    if size < 2 or not cost.vocab or not cost.head_matrix_bytes:
        return 0
    return min(cost.vocab, -(-int(cost.vocab * HEAD_SHARE_MAX) // 128) * 128)


def share_bytes(cost: ModelCost, rows: int) -> int:
    return cost.head_matrix_bytes * rows // cost.vocab if rows else 0


def search_split(cost: ModelCost, nodes: list[Node], context: int, memory_fraction: float,
            headroom: int, use_time: bool, enforce: bool, share: int = 0,
            overhead: list[tuple[float, float, float, float]] | None = None,
            balance: bool = False) -> list[int] | None:
    """Dynamic programming over (ranks, layers) for a contiguous split, or None.

    share: rows of the head the last rank holds (their bytes count against its memory; for
    the slowest stage, half the head's matrix counts on rank 0 and half on the last rank,
    as a shared head roughly splits it in batched decoding).

    Key per partial split: (time, slowest stage's time, peak memory use / usable, sum of
    squared uses), compared in that order. Times count the bytes a token reads, memory the
    bytes held (they differ for a mixture of experts). Each term only grows as ranks are added, so
    keeping the smallest key per state is optimal.

    overhead: per node (a stage, for tensor-parallel groups), seconds added per layer and
    once, for one sequence and for a micro-batch step: (layer_s, fixed_s, batch_layer_s,
    batch_fixed_s), its all-reduces (place/groups.py). balance: compare the slowest stage
    first (the throughput objective); min-max is optimal per state too. Time is integer
    (bytes x femtoseconds per byte) so that equal bandwidths give exactly equal times; then
    the slowest stage decides (balanced stages keep a batch's micro-batches flowing, see
    engine.py), then memory.
    """
    n, size = cost.num_layers, len(nodes)
    wsum = [0, *accumulate(cost.layer_bytes)]
    rsum = [0, *accumulate(cost.read_bytes)]
    ksum = [0, *accumulate(cost.kv_bytes(context))]
    known = use_time and all(node.bandwidth for node in nodes)
    fs_per_byte = [round(1e15 / node.bandwidth) if known else 0 for node in nodes]
    over = [tuple(round(x * 1e15) if known else 0 for x in o)
            for o in (overhead or [(0.0,) * 4] * size)]
    order = (lambda k: (k[1], k[0], k[2], k[3])) if balance else (lambda k: k)
    usable = [node.usable(memory_fraction) for node in nodes]
    best: list[list[tuple | None]] = [[None] * (n + 1) for _ in range(size + 1)]
    cut = [[0] * (n + 1) for _ in range(size + 1)]
    best[0][0] = (0, 0, 0.0, 0.0)
    half = cost.head_matrix_bytes // 2 if share else 0
    for r in range(1, size + 1):
        extra = cost.head_bytes if r == 1 else 0
        held = extra + (share_bytes(cost, share) if r == size and size > 1 else 0)
        batch_extra = extra - half if r == 1 else (half if r == size else 0)
        cap = usable[r - 1]
        for i in range(r, n - (size - r) + 1):
            for j in range(i - 1, r - 2, -1):  # growing slice [j, i): need only grows
                reads = rsum[i] - rsum[j] + extra
                need = wsum[i] - wsum[j] + held + ksum[i] - ksum[j] + headroom
                if enforce and need > cap:
                    break
                prev = best[r - 1][j]
                if prev is None:
                    continue
                use = need / cap if cap > 0 else float("inf")
                layer_s, fixed_s, batch_layer_s, batch_fixed_s = over[r - 1]
                stage_time = reads * fs_per_byte[r - 1] + (i - j) * layer_s + fixed_s
                batch_time = ((reads - extra + batch_extra) * fs_per_byte[r - 1]
                              + (i - j) * batch_layer_s + batch_fixed_s)
                key = (prev[0] + stage_time, max(prev[1], batch_time), max(prev[2], use),
                       prev[3] + use * use)
                if best[r][i] is None or order(key) < order(best[r][i]):
                    best[r][i], cut[r][i] = key, j
    if best[size][n] is None:
        return None
    split, i = [], n
    for r in range(size, 0, -1):
        j = cut[r][i]
        split.append(i - j)
        i = j
    return split[::-1]


def describe_split(cost: ModelCost, nodes: list[Node], split: list[int], max_context: int,
                   memory_fraction: float = DEFAULT_MEMORY_FRACTION,
                   headroom_bytes: int = HEADROOM_BYTES,
                   hops: float | list[float] = 0.0, share: int = 0) -> Plan:
    """The figures of `split` on `nodes` (no fitting check). `hops`: seconds of each rank's
    outgoing hop per token (one number: the same for every hop). `share`: head rows the
    last rank holds (not read for a single sequence, whose head rank 0 computes)."""
    size = len(nodes)
    if size == 1:
        hops = [0.0]
    elif not isinstance(hops, list):
        hops = [float(hops)] * size
    kv = cost.kv_bytes(max_context)
    known = all(node.bandwidth for node in nodes)
    ranks = []
    for node, (start, end), hop in zip(nodes, layer_ranges(split), hops):
        head = cost.head_bytes if node.rank == 0 else 0
        weights = sum(cost.layer_bytes[start:end]) + head
        reads = sum(cost.read_bytes[start:end]) + head
        ms = (reads / node.bandwidth + hop) * 1e3 if known else None
        rows = share if size > 1 and node.rank == size - 1 else 0
        ranks.append(RankPlan(rank=node.rank, host=node.host, layer_range=(start, end),
                              weight_bytes=weights + share_bytes(cost, rows),
                              kv_bytes=sum(kv[start:end]),
                              headroom_bytes=headroom_bytes, memory_bytes=node.memory_bytes,
                              usable_bytes=node.usable(memory_fraction),
                              bandwidth=node.bandwidth, est_ms_per_token=ms, head_rows=rows,
                              read_bytes=reads))
    return Plan(ranks, max_context, memory_fraction, hop_ms=sum(hops) * 1e3)
