"""When nothing fits: which ranks are short by how much, and what would fit instead."""

from __future__ import annotations

from pipeline.place.layout import GiB, Node, RankPlan, fmt_bytes
from pipeline.place.search import describe_split, search_split


def shortfall(r: RankPlan) -> str:
    """One line: what rank r needs against what it has."""
    return (f"rank {r.rank} ({r.host}) needs {fmt_bytes(r.need_bytes)} (weights "
            f"{fmt_bytes(r.weight_bytes)}, KV cache {fmt_bytes(r.kv_bytes)}, headroom "
            f"{fmt_bytes(r.headroom_bytes)}) but has {fmt_bytes(r.usable_bytes)} usable of "
            f"{fmt_bytes(r.memory_bytes)}: short by {fmt_bytes(r.need_bytes - r.usable_bytes)}")


def _fits(cost, nodes, context, fraction, headroom) -> bool:
    if len(nodes) > cost.num_layers:
        return False
    return search_split(cost, nodes, context, fraction, headroom, False, True) is not None


def explain(cost, nodes, context, fraction, headroom, alternatives) -> str:
    """The PlanError message: the most even split's shortfalls and the fixes that fit."""
    split = search_split(cost, nodes, context, fraction, headroom, use_time=False, enforce=False)
    plan = describe_split(cost, nodes, split, context, fraction, headroom)
    total_need = sum(r.need_bytes for r in plan.ranks)
    total_usable = sum(r.usable_bytes for r in plan.ranks)
    lines = [f"the model does not fit at --max-context {context} and --memory-fraction "
             f"{fraction:g}: it needs {fmt_bytes(total_need)} (weights "
             f"{fmt_bytes(cost.weight_bytes)}), the {len(nodes)} rank(s) have "
             f"{fmt_bytes(total_usable)} usable; the most even split {split} leaves"]
    lines += [shortfall(r) for r in plan.ranks if r.need_bytes > r.usable_bytes]
    fixes = []
    if _fits(cost, nodes, 1, fraction, headroom):
        lo, hi = 1, context  # lo fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if _fits(cost, nodes, mid, fraction, headroom) else (lo, mid)
        fixes.append(f"--max-context {lo - lo % 256 if lo >= 256 else lo}")
    for label, alt in alternatives:
        if _fits(alt, nodes, context, fraction, headroom):
            fixes.append(f"{label} ({fmt_bytes(alt.weight_bytes)} of weights)")
    extra = _extra_node_memory(cost, nodes, context, fraction, headroom)
    if extra is not None:
        fixes.append(f"one more node with at least {extra} GiB of memory "
                     f"(at --memory-fraction {fraction:g})")
    if fixes:
        lines.append("what would fit: " + "; ".join(fixes))
    else:
        lines.append("neither fewer context tokens, a quantized variant nor one more node "
                     "would fit: use a smaller model or several more nodes")
    return "\n  ".join(lines)


def _extra_node_memory(cost, nodes, context, fraction, headroom) -> int | None:
    """Whole GiB of memory a node appended to the ring needs for the model to fit."""
    def with_extra(gib: int) -> list[Node]:
        return [*nodes, Node(len(nodes), "new", gib * GiB)]

    hi = -(-(cost.weight_bytes + sum(cost.kv_bytes(context))) // GiB) * 2 + 2
    hi = int(hi / fraction) + 1
    if not _fits(cost, with_extra(hi), context, fraction, headroom):
        return None
    lo = 0  # does not fit (it did not without the node)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _fits(cost, with_extra(mid), context, fraction, headroom) else (mid, hi)
    return hi
