"""What placement reasons about: a node's capacity, a model's costs, a rank's and a stage's share,
the plan; and the constants the planner assumes. No MPI, no MLX: plain numbers."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.place.split import SplitError

DEFAULT_MEMORY_FRACTION = 0.8
DEFAULT_MAX_CONTEXT = 8192  # when the config does not say
HEADROOM_BYTES = 256 * 2**20  # per rank: runtime, activations of a prefill chunk, MPI buffers
DEFAULT_HOP_LATENCY_S = 0.25e-3  # one-way TCP over Thunderbolt or Ethernet, per token
DEFAULT_LINK_BANDWIDTH = 1.25e9  # bytes/s (10 Gbit/s) for a hidden state on the wire
GiB = 2**30
# The last rank of a ring holds this share of the head's rows (the vocabulary's first ones)
# so it can take over part of every batched decode step's head (exec/head.py HeadSplit); the cut
# then moves where it evens out the two stages' measured time, at most this far.
HEAD_SHARE_MAX = 0.75
HIGH_CONCURRENCY = 32  # sequences at once for the aggregate bound (mlx-lm's batch cap)


class PlanError(SplitError):
    """No split fits (or a given split does not); the message says what would."""


@dataclass(frozen=True)
class Node:
    """One rank as the planner sees it."""

    rank: int
    host: str
    memory_bytes: int               # this rank's memory (its share of the host's, after caps)
    bandwidth: float | None = None  # memory bandwidth, bytes/s; None: unknown
    limit_bytes: int | None = None  # hard cap besides the fraction (e.g. a GPU working set)
    latency_s: float | None = None  # declared one-way latency of its host's link (`lat=`)
    flops: float | None = None      # matrix-product rate, FLOP/s (`flops=`, or measured)

    def usable(self, memory_fraction: float) -> int:
        usable = int(self.memory_bytes * memory_fraction)
        return usable if self.limit_bytes is None else min(usable, self.limit_bytes)


@dataclass(frozen=True)
class ModelCost:
    """What a model needs, per transformer block and for rank 0's extras."""

    layer_bytes: tuple[int, ...]              # weights of each block
    head_bytes: int                           # embedding + final norm + head (tied: once)
    kv_token_bytes: tuple[int, ...]           # per block, per cached token: keys + values
    kv_window: tuple[int | None, ...] = ()    # per block: sliding window, None = whole context
    hidden_bytes: int = 0                     # one token's hidden state on the wire
    dtype: str = ""                           # floating dtype held (KV cache, activations)
    description: str = ""
    head_matrix_bytes: int = 0                # the head's matrix (tied: the embedding), of head_bytes
    vocab: int = 0                            # its rows
    # per block, what one token reads (MoE: all but the routed experts, plus k/E of those);
    # () = layer_bytes (dense)
    layer_read_bytes: tuple[int, ...] = ()
    experts: int = 0                          # routed experts per MoE layer (0: dense)
    experts_per_token: int = 0                # of them, what a token uses (top-k)
    bytes_per_param: float = 0.0              # a weight's bytes (quantized: bits/8 + scales)

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    @property
    def weight_bytes(self) -> int:
        return sum(self.layer_bytes) + self.head_bytes

    @property
    def read_bytes(self) -> tuple[int, ...]:
        """Per block, the bytes one token reads."""
        return self.layer_read_bytes or self.layer_bytes

    @property
    def token_read_bytes(self) -> int:
        """What one token reads in all: its blocks' read bytes and rank 0's head (whole)."""
        return sum(self.read_bytes) + self.head_bytes

    def kv_bytes(self, context: int) -> list[int]:
        """KV cache bytes of each block holding `context` tokens."""
        windows = self.kv_window or (None,) * self.num_layers
        return [b * (context if w is None else min(context, w))
                for b, w in zip(self.kv_token_bytes, windows)]


@dataclass
class RankPlan:
    rank: int
    host: str
    layer_range: tuple[int, int]
    weight_bytes: int
    kv_bytes: int
    headroom_bytes: int
    memory_bytes: int
    usable_bytes: int
    bandwidth: float | None
    est_ms_per_token: float | None  # reading its token's bytes, plus its outgoing hop
    head_rows: int = 0  # the last rank: rows of the head it holds (see HEAD_SHARE_MAX)
    read_bytes: int = 0  # what one token reads here (MoE: less than its weights; head rows: 0)
    tp: int = 1  # ranks of its stage's tensor-parallel group (each holds 1/tp of the stage)
    flops: float | None = None  # its matrix-product rate (None: unknown)
    cache_bytes: int = 0  # the prompt cache's budget on this rank (--prompt-cache-bytes)

    @property
    def layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]

    @property
    def need_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.headroom_bytes + self.cache_bytes

    def to_json(self) -> dict:
        return {"rank": self.rank, "host": self.host, "layers": self.layers,
                "layer_range": list(self.layer_range), "weight_bytes": self.weight_bytes,
                "kv_bytes": self.kv_bytes, "memory_bytes": self.memory_bytes,
                "est_ms_per_token": _round(self.est_ms_per_token),
                "headroom_bytes": self.headroom_bytes, "prompt_cache_bytes": self.cache_bytes,
                "need_bytes": self.need_bytes,
                "usable_bytes": self.usable_bytes, "bandwidth_bytes_per_s": self.bandwidth,
                "head_rows": self.head_rows, "read_bytes": self.read_bytes, "tp": self.tp}


@dataclass
class StageCost:
    """One stage's share of a token's time (place/groups.py has the cost model)."""

    ranks: list[int]
    compute_ms: float | None  # reading the stage's bytes, 1/tp of them on each rank
    allreduce_ms: float       # its all-reduces (0 for one rank)
    hop_ms: float             # to the next stage
    step_ms: float | None     # a micro-batch step (Plan.sequences over the stages)
    reason: str = ""

    @property
    def ms(self) -> float | None:
        if self.compute_ms is None:
            return None
        return self.compute_ms + self.allreduce_ms + self.hop_ms


@dataclass
class Plan:
    ranks: list[RankPlan]
    max_context: int
    memory_fraction: float
    hop_ms: float  # all hops of one token round the ring
    groups: list[int] = None  # ranks per stage, consecutive (None: one rank per stage)
    stages: list[StageCost] = None  # per stage (None: described per rank, no groups)
    objective: str = "chat"
    layouts: list[tuple] = ()  # (groups, one-chat ms, round ms) of every layout tried
    sequences: int = HIGH_CONCURRENCY  # decoded at once, for the throughput figures
    cache_asked: int = 0  # --prompt-cache-bytes per rank; the ranks' cache_bytes: what fits

    def __post_init__(self):
        if self.groups is None:
            self.groups = [1] * len(self.ranks)

    @property
    def leaders(self) -> list[RankPlan]:
        """The first rank of each stage (its group's figures stand for the stage)."""
        starts = [sum(self.groups[:s]) for s in range(len(self.groups))]
        return [self.ranks[i] for i in starts]

    @property
    def split(self) -> list[int]:
        """Layers per stage."""
        return [r.layers for r in self.leaders]

    @property
    def head_share_rows(self) -> int:
        """Rows of the head the last rank holds (0: rank 0 computes the whole head; always 0
        when the first or last stage is a tensor-parallel group)."""
        if len(self.groups) < 2 or self.groups[0] > 1 or self.groups[-1] > 1:
            return 0
        return self.ranks[-1].head_rows

    @property
    def cache_bytes(self) -> int:
        """The prompt cache's budget per rank (the same on every rank; below cache_asked
        when that did not fit beside the layers)."""
        return self.ranks[0].cache_bytes if self.ranks else 0

    @property
    def bandwidth_known(self) -> bool:
        return all(r.est_ms_per_token is not None for r in self.ranks)

    @property
    def est_ms_per_token(self) -> float | None:
        """One sequence: every stage in turn (a group's ranks work at once)."""
        return sum(r.est_ms_per_token for r in self.leaders) if self.bandwidth_known else None

    @property
    def step_ms(self) -> float | None:
        """The slowest stage's micro-batch step at high concurrency (None: not modelled)."""
        steps = [s.step_ms for s in self.stages or ()]
        return max(steps) if steps and None not in steps else None

    @property
    def round_ms(self) -> float | None:
        """Every one of `sequences` sequences one token further: each stage steps once per
        micro-batch (one per stage in flight), so the slowest stage's step times the stages."""
        return len(self.groups) * self.step_ms if self.step_ms else None

    @property
    def tokens_per_s(self) -> float | None:
        ms = self.est_ms_per_token
        return 1000.0 / ms if ms else None

    @property
    def aggregate_tokens_per_s(self) -> float | None:
        return self.sequences * 1000.0 / self.round_ms if self.round_ms else None

    def stages_json(self) -> list[dict]:
        out = []
        for s, (lead, cost) in enumerate(zip(self.leaders, self.stages or ())):
            out.append({"stage": s, "ranks": cost.ranks, "tp": len(cost.ranks),
                        "layers": lead.layers, "layer_range": list(lead.layer_range),
                        "compute_ms": _round(cost.compute_ms),
                        "allreduce_ms": _round(cost.allreduce_ms), "hop_ms": _round(cost.hop_ms),
                        "est_ms_per_token": _round(cost.ms), "step_ms": _round(cost.step_ms),
                        "reason": cost.reason})
        return out

    def to_json(self) -> dict:
        return {"ranks": [r.to_json() for r in self.ranks], "split": self.split,
                "groups": self.groups, "stages": self.stages_json(), "objective": self.objective,
                "aggregate_tokens_per_s_bound": _round(self.aggregate_tokens_per_s),
                "sequences": self.sequences, "round_ms": _round(self.round_ms),
                "layouts": [{"groups": list(g), "est_ms_per_token": _round(ms),
                             "round_ms": _round(step)} for g, ms, step in self.layouts],
                "max_context": self.max_context, "memory_fraction": self.memory_fraction,
                "head_share_rows": self.head_share_rows,
                "weight_bytes": sum(r.weight_bytes for r in self.ranks),
                "read_bytes": sum(r.read_bytes for r in self.ranks),
                "kv_bytes": sum(r.kv_bytes for r in self.ranks),
                "prompt_cache_bytes": self.cache_bytes,
                "prompt_cache_asked_bytes": self.cache_asked,
                "hop_ms": _round(self.hop_ms),
                "est_ms_per_token": _round(self.est_ms_per_token),
                "tokens_per_s_bound": _round(self.tokens_per_s)}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def fmt_bytes(n: float) -> str:
    """Binary units, 3 significant digits: 1.5 GiB, 640 KiB, 12 B."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.3g} {unit}" if v < 1000 else f"{v:.0f} {unit}"
    return f"{int(n)} B"
