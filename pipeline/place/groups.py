"""Stages made of rank groups: which consecutive ranks run a stage in tensor parallel.

A stage is one rank, or a group of n consecutive ranks that split each of its layers
(Megatron-style, mlx-lm's `shard()`: two all-reduces of the hidden state per layer) and,
in stage 0, the embedding and head by vocabulary. Stages form the pipeline ring. The cost
model, per token (M = one token's hidden state in bytes, R = the bytes a token reads in
the stage's layers and, in stage 0, the head; MoE: routed experts counted k/E):

    link(r)  = latency + M / link bandwidth        one hidden state from rank r to r + 1
    ar(n)    = 2 (n-1) x (latency + (M/n) / bw)    ring all-reduce (n = 2: 2 latencies + M/bw)
    compute  = R / (n x B)                         B: the slowest member's memory bandwidth
    allreduce = 2 x layers x ar(n)                 (stage 0 also: ar(n) for the embedding and
                                                    an all-gather of the float32 logits)
    hop      = link(the stage's last rank)         to the next stage (none with one stage)
    chat ms  = sum over stages (compute + allreduce + hop)          one chat: 1 / it tok/s
    b        = ceil(S / D)                         S sequences in D micro-batches (D stages)
    step     = max(compute, b x F / (n x rate)) + the all-reduces of b hidden states per layer
    round    = D x max over stages of step         every sequence one token further
    aggregate tok/s = S / round

F is a token's arithmetic in the stage (2 FLOP per weight read), rate the slowest member's
measured (or `flops=` declared) matrix-product rate; unknown, the step is the weights' read
alone. A step reads the weights once however many sequences it holds, so while that read
dominates, fewer stages (tensor parallel) gain as much per round as they do for one chat;
once the arithmetic dominates (a Mac GPU from ~8-16 sequences, a CPU core from ~30),
micro-batches in flight keep every stage busy and the pure pipeline saves the all-reduces.
Hops overlap with the other stages' work. A link's latency is
measured (the start-up ping-pong of M bytes: the whole message time counts as latency, so
ar(n) over it is an upper bound), else declared (`lat=` in the hostfile: the slower end's),
else SAME_HOST_LATENCY_S between ranks of one host, else DEFAULT_HOP_LATENCY_S. A group's
all-reduce runs at its slowest inside link. Memory: each member holds 1/n of the stage's
weights, KV cache (whole KV heads each) and, in stage 0, head, plus its own headroom and
prompt-cache budget; the smallest member bounds the group.

Searched: every way to cut the ranks into consecutive groups for up to MAX_MIXED_RANKS
ranks (2^(N-1) layouts: [2, 1], [1, 2], ...), beyond that equal groups of each g dividing N;
group sizes the model cannot split (tp.py) are skipped. Each layout's layers come from the
planner's dynamic programme (search.py search_split) with the groups' all-reduces added; the
layout with the best objective wins: "chat" the lowest one-chat time, "throughput" the
lowest slowest step (balanced stages), and within TP_MARGIN of the best, the one with fewest
all-reduces (an estimated gain of a few % does not pay for another all-reduce per layer;
nor does one under TP_MIN_GAIN_MS, which keeps tiny models single-rank stages).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import accumulate

from pipeline.place.planner import (DEFAULT_HOP_LATENCY_S, DEFAULT_LINK_BANDWIDTH,
                                    HIGH_CONCURRENCY, ModelCost, Node, Plan, PlanError, RankPlan,
                                    StageCost, fmt_bytes)
from pipeline.place.search import search_split, share_bytes, share_rows
from pipeline.place.split import layer_ranges

SAME_HOST_LATENCY_S = 10e-6  # ranks of one host: a shared-memory message (dev box: 14 us, 4 KB)
SAME_HOST_BANDWIDTH = 10e9  # bytes/s of a shared-memory copy
MAX_MIXED_RANKS = 5  # up to here every consecutive grouping is tried
LOGIT_BYTES = 4  # float32 logits gathered from a vocabulary-parallel head
# The all-reduce terms are estimates: a layout with more all-reduces must beat the best one
# with fewer by more than this share of the objective.
TP_MARGIN = 0.05
# ... and by at least this much (ms a token or a step): a model so small that a group saves
# less keeps its stages single (its gain would be inside the all-reduces' own jitter).
TP_MIN_GAIN_MS = 1.0
OBJECTIVES = ("chat", "throughput")


@dataclass(frozen=True)
class Link:
    """One direction of a link between ring neighbours."""

    latency_s: float
    bandwidth: float = DEFAULT_LINK_BANDWIDTH
    measured_bytes: int = 0  # a measured link: latency_s is the time of a message this big

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + max(nbytes - self.measured_bytes, 0) / self.bandwidth


def ring_links(nodes: list[Node], hidden_bytes: int,
               hops: float | list[float] | None = None) -> list[Link]:
    """The link from each rank to the next (the last: to rank 0). hops: measured seconds of
    each rank's outgoing hop of `hidden_bytes` (one number: every hop); else declared."""
    size = len(nodes)
    if hops is not None:
        hops = hops if isinstance(hops, list) else [float(hops)] * size
        return [Link(h, DEFAULT_LINK_BANDWIDTH, hidden_bytes) for h in hops]
    links = []
    for r, node in enumerate(nodes):
        nxt = nodes[(r + 1) % size]
        if nxt.host == node.host:
            links.append(Link(SAME_HOST_LATENCY_S, SAME_HOST_BANDWIDTH))
            continue
        declared = [x for x in (node.latency_s, nxt.latency_s) if x is not None]
        links.append(Link(max(declared) if declared else DEFAULT_HOP_LATENCY_S))
    return links


def allreduce_s(link: Link, n: int, nbytes: float) -> float:
    """A ring all-reduce of nbytes among n ranks: 2 (n-1) steps of nbytes / n."""
    return 2 * (n - 1) * link.seconds(nbytes / n) if n > 1 else 0.0


def allgather_s(link: Link, n: int, nbytes: float) -> float:
    """A ring all-gather of nbytes in all (nbytes / n from each rank): n - 1 steps."""
    return (n - 1) * link.seconds(nbytes / n) if n > 1 else 0.0


def _compositions(size: int) -> list[list[int]]:
    if size == 0:
        return [[]]
    return [[first, *rest] for first in range(1, size + 1) for rest in _compositions(size - first)]


def layouts(size: int, tp: int | None = None, problems: dict[int, str] | None = None):
    """Candidate groupings (ranks per stage), the pure pipeline first. tp forces n ranks per
    stage; problems: group sizes the model cannot split -> why (tp.tp_problem)."""
    problems = problems or {}
    if tp is not None:
        if tp < 1:
            raise PlanError(f"--tp {tp} must be at least 1 (1: a pure pipeline)")
        if size % tp:
            fits = [d for d in range(1, size + 1) if size % d == 0 and d not in problems]
            raise PlanError(f"--tp {tp} needs a multiple of {tp} ranks but the job has {size}: "
                            f"run {tp * max(1, -(-size // tp))} ranks or use --tp "
                            f"{' or '.join(map(str, fits))}")
        if tp in problems:
            raise PlanError(f"--tp {tp}: {problems[tp]}")
        return [[tp] * (size // tp)]
    if size <= MAX_MIXED_RANKS:
        found = [c for c in _compositions(size) if not any(n in problems for n in c)]
        return sorted(found, key=lambda c: -len(c))  # fewest all-reduces first
    return [[g] * (size // g) for g in range(1, size + 1) if size % g == 0 and g not in problems]


@dataclass
class _Group:
    """A stage's group on the planner's terms: one node standing for its members."""

    ranks: list[int]
    node: Node      # n x the slowest bandwidth and rate, n x the smallest usable memory
    link: Link | None  # the slowest link inside (None: one rank)
    hop: float      # seconds to the next stage
    overhead: tuple[float, float, float, float]  # per layer, once; per layer, once (a step)


def microbatch(sequences: int, stages: int) -> int:
    """Sequences per micro-batch: one micro-batch per stage in flight."""
    return max(1, -(-sequences // stages))


def _groups(cost: ModelCost, nodes: list[Node], links: list[Link], groups: list[int],
            fraction: float, headroom: int, sequences: int) -> list[_Group]:
    """headroom: every rank's fixed reserve (with the prompt cache's budget)."""
    out, m = [], cost.hidden_bytes
    b = microbatch(sequences, len(groups))
    for s, (start, n) in enumerate(zip([0, *accumulate(groups)], groups)):
        members = nodes[start:start + n]
        inner = links[start:start + n - 1]
        link = max(inner, key=lambda k: k.seconds(m)) if inner else None
        hop = links[start + n - 1].seconds(m) if len(groups) > 1 else 0.0
        node, over = members[0], (0.0, 0.0, 0.0, 0.0)
        if n > 1:
            bws = [x.bandwidth for x in members]
            rates = [x.flops for x in members]
            usable = n * min(x.usable(fraction) for x in members) - (n - 1) * headroom
            node = Node(s, members[0].host, sum(x.memory_bytes for x in members),
                        n * min(bws) if all(bws) else None, max(usable, 0),
                        flops=n * min(rates) if all(rates) else None)
            head = allreduce_s(link, n, m) + allgather_s(link, n, cost.vocab * LOGIT_BYTES)
            batch_head = allreduce_s(link, n, b * m) + allgather_s(link, n, b * cost.vocab
                                                                   * LOGIT_BYTES)
            over = (2 * allreduce_s(link, n, m), head if s == 0 else 0.0,
                    2 * allreduce_s(link, n, b * m), batch_head if s == 0 else 0.0)
        out.append(_Group(list(range(start, start + n)), node, link, hop, over))
    return out


def step_seconds(batch_reads: float, bandwidth: float, flops: float | None, rows: int,
                 bytes_per_param: float) -> float:
    """A micro-batch of `rows` sequences through a stage: reading its weights once, or its
    arithmetic (2 FLOP per weight, per row) where that takes longer and the rate is known."""
    read = batch_reads / bandwidth
    if not flops or not bytes_per_param:
        return read
    return max(read, rows * 2 * batch_reads / bytes_per_param / flops)


def describe_groups(cost: ModelCost, nodes: list[Node], groups: list[_Group], split: list[int],
                    max_context: int, fraction: float, headroom: int, share: int = 0,
                    sequences: int = HIGH_CONCURRENCY, cache: int = 0) -> Plan:
    """The figures of a layout: per rank (its 1/n shares) and per stage (StageCost).
    cache: the prompt cache's bytes every rank keeps room for."""
    kv = cost.kv_bytes(max_context)
    half = cost.head_matrix_bytes // 2 if share else 0
    ranks, stages = [], []
    last = len(groups) - 1
    for s, (g, (start, end)) in enumerate(zip(groups, layer_ranges(split))):
        n, head = len(g.ranks), cost.head_bytes if s == 0 else 0
        weights = sum(cost.layer_bytes[start:end]) + head
        reads = sum(cost.read_bytes[start:end]) + head
        bw, layers = g.node.bandwidth, end - start
        compute = reads / bw if bw else None
        batch_reads = reads - (half if s == 0 else 0) + (half if s == last and s else 0)
        layer_s, fixed_s, batch_layer_s, batch_fixed_s = g.overhead
        allreduce = layers * layer_s + fixed_s
        rows = microbatch(sequences, len(groups))
        step = (step_seconds(batch_reads, bw, g.node.flops, rows, cost.bytes_per_param)
                + layers * batch_layer_s + batch_fixed_s) if bw else None
        stage = StageCost(g.ranks, None if bw is None else compute * 1e3, allreduce * 1e3,
                          g.hop * 1e3, None if step is None else step * 1e3)
        stages.append(stage)
        for rank in g.ranks:
            node = nodes[rank]
            rows = share if s == last and last > 0 and n == 1 else 0
            ranks.append(RankPlan(
                rank=rank, host=node.host, layer_range=(start, end),
                weight_bytes=-(-weights // n) + share_bytes(cost, rows),
                kv_bytes=-(-sum(kv[start:end]) // n), headroom_bytes=headroom,
                memory_bytes=node.memory_bytes, usable_bytes=node.usable(fraction),
                bandwidth=node.bandwidth, est_ms_per_token=stage.ms, head_rows=rows,
                read_bytes=-(-reads // n), tp=n, flops=node.flops, cache_bytes=cache))
    return Plan(ranks, max_context, fraction, hop_ms=sum(g.hop for g in groups) * 1e3,
                groups=[len(g.ranks) for g in groups], stages=stages, sequences=sequences)


def _fits(plan: Plan) -> bool:
    return all(r.need_bytes <= r.usable_bytes for r in plan.ranks)


def plan_layout(cost: ModelCost, nodes: list[Node], links: list[Link], groups: list[int],
                max_context: int, fraction: float, headroom: int, *, objective: str = "chat",
                share_head: bool = True, split: list[int] | None = None,
                sequences: int = HIGH_CONCURRENCY, cache: int = 0) -> Plan | None:
    """The best split of the layers over one layout (or `split` checked); None: no fit.
    cache: the prompt cache's bytes each rank reserves beside its headroom."""
    parts = _groups(cost, nodes, links, groups, fraction, headroom + cache, sequences)
    vnodes = [g.node for g in parts]
    over = [g.overhead for g in parts]
    pure_ends = len(groups) > 1 and groups[0] == 1 and groups[-1] == 1
    share = share_rows(cost, len(groups)) if share_head and pure_ends else 0
    balance = objective == "throughput"
    if split is not None:
        plan = describe_groups(cost, nodes, parts, split, max_context, fraction, headroom, share,
                               sequences, cache)
        if share and not _fits(plan):
            plan = describe_groups(cost, nodes, parts, split, max_context, fraction, headroom, 0,
                                   sequences, cache)
        return plan if _fits(plan) else None
    reserve = headroom + cache
    layers = search_split(cost, vnodes, max_context, fraction, reserve, True, True, share, over,
                     balance) if share else None
    if layers is None:
        share = 0
        layers = search_split(cost, vnodes, max_context, fraction, reserve, True, True, 0, over,
                         balance)
    if layers is None:
        return None
    return describe_groups(cost, nodes, parts, layers, max_context, fraction, headroom, share,
                           sequences, cache)


def _allreduces(plan: Plan) -> int:
    return sum(2 * layers for n, layers in zip(plan.groups, plan.split) if n > 1)


def _key(plan: Plan, objective: str) -> tuple:
    chat, step = plan.est_ms_per_token or 0.0, plan.round_ms or 0.0
    if objective == "throughput":
        return (step, _allreduces(plan), chat)
    return (chat, _allreduces(plan), step)


def _choose(plans: list[Plan], objective: str) -> Plan:
    """The best plan, or within TP_MARGIN (and TP_MIN_GAIN_MS) of it the one with fewest
    all-reduces."""
    best = _key(min(plans, key=lambda p: _key(p, objective)), objective)[0]
    limit = best + max(best * TP_MARGIN, TP_MIN_GAIN_MS)
    near = [p for p in plans if _key(p, objective)[0] <= limit]
    return min(near, key=lambda p: (_allreduces(p), _key(p, objective)))


def plan_groups(cost: ModelCost, nodes: list[Node], links: list[Link], max_context: int, *,
                fraction: float, headroom: int, tp: int | None = None,
                objective: str = "chat", problems: dict[int, str] | None = None,
                share_head: bool = True, split: list[int] | None = None,
                sequences: int = HIGH_CONCURRENCY, cache: int = 0,
                only: list[int] | None = None) -> Plan | None:
    """The best layout and split for the objective, with every stage's reason; None when no
    layout fits. sequences: decoded at once (the throughput figures); cache: the prompt
    cache's bytes each rank keeps room for; only: this layout alone. Raises PlanError for an
    unknown objective or an impossible --tp."""
    if objective not in OBJECTIVES:
        raise PlanError(f"--optimize {objective} is not one of {', '.join(OBJECTIVES)}")
    problems = problems or {}
    plans, tried = [], []
    for groups in [only] if only is not None else layouts(len(nodes), tp, problems):
        if len(groups) > cost.num_layers or (split is not None and len(split) != len(groups)):
            continue
        plan = plan_layout(cost, nodes, links, groups, max_context, fraction, headroom,
                           objective=objective, share_head=share_head, split=split,
                           sequences=sequences, cache=cache)
        if plan is None:
            continue
        tried.append((tuple(groups), plan.est_ms_per_token, plan.round_ms))
        plans.append(plan)
    if not plans:
        return None
    best = replace(_choose(plans, objective), objective=objective, layouts=tried)
    for s, stage in enumerate(best.stages):
        stage.reason = _reason(cost, nodes, links, best, s, tp, problems)
    return best


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.3g} us" if seconds < 1e-3 else _ms(seconds)


def _reason(cost: ModelCost, nodes: list[Node], links: list[Link], plan: Plan, s: int,
            tp: int | None, problems: dict[int, str]) -> str:
    """Why stage s has its group size, in the cost model's own numbers."""
    stage, lead = plan.stages[s], plan.leaders[s]
    n, layers, size = len(stage.ranks), lead.layers, len(nodes)
    members = [nodes[r] for r in stage.ranks]
    reads = lead.read_bytes * n
    bws = [x.bandwidth for x in members]
    m = cost.hidden_bytes
    if n > 1:
        link = max(links[stage.ranks[0]:stage.ranks[-1]], key=lambda k: k.seconds(m))
        ar = allreduce_s(link, n, m)
        text = (f"tp {n}: link {_us(link.latency_s)}, 2 x {layers} all-reduces of {_us(ar)} "
                f"= {_ms(2 * layers * ar)}")
        if s == 0:
            text += f" + {_ms(stage.allreduce_ms / 1e3 - 2 * layers * ar)} for the split head"
        if all(bws):
            one = reads / min(bws)
            sign = "<" if stage.allreduce_ms / 1e3 < one - one / n else ">="
            text += (f" {sign} {_ms(one - one / n)} saved (reading {fmt_bytes(reads)} at "
                     f"{n} x {min(bws) / 1e9:.3g} GB/s)")
        text += f" (--tp {n})" if tp else ""
    elif size == 1:
        text = "tp 1: one rank"
    elif tp == 1:
        text = "tp 1: --tp 1 (pure pipeline)"
    elif 2 in problems:
        text = f"tp 1: {problems[2]}"
    else:
        rank = stage.ranks[0]
        other = rank + 1 if rank + 1 < size else rank - 1
        link = links[min(rank, other)]
        ar = allreduce_s(link, 2, m)
        text = (f"tp 1: tp 2 with rank {other} (link {_us(link.latency_s)}) would cost 2 x "
                f"{layers} all-reduces of {_us(ar)} = {_ms(2 * layers * ar)}")
        if bws[0] and nodes[other].bandwidth:
            saved = reads / bws[0] - reads / (2 * min(bws[0], nodes[other].bandwidth))
            text += f" for {_ms(saved)} saved" if saved > 0 else " and save nothing"
            if 0 < 2 * layers * ar < saved:
                text += (f" (whole plans compared in the layouts tried: more all-reduces must "
                         f"win by over {TP_MARGIN:.0%} and {TP_MIN_GAIN_MS:g} ms)")
        else:
            text += " (bandwidth unknown: pure pipeline)"
    above = [k for k in sorted(problems) if n < k <= size and not (n == 1 and k == 2)]
    if above and (tp is None or tp == n):
        text += f"; not tp {above[0]}: {problems[above[0]]}"
    if plan.objective == "throughput" and plan.step_ms is not None:
        text += (f"; step of {microbatch(plan.sequences, len(plan.groups))} sequences "
                 f"{stage.step_ms:.3g} ms (slowest {plan.step_ms:.3g} ms)")
    return text
