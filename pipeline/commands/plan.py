"""`python -m pipeline plan`: how the layers would be placed, without loading any weight.

    python -m pipeline plan --model M --hostfile hostfiles/tb4      # declared capacities
    mpirun -np 3 python -m pipeline plan --model M [--hostfile H]   # measured capacities

Under mpirun every rank measures itself (memory, bandwidth, disk) and the ring's hops are
timed; a hostfile then only caps memory (`# pipeline: mem=`). Without mpirun the hostfile's
declarations are the capacities (one rank per slot); without either, this machine alone.
A run's preflight makes the same decision (place/preflight.py).

Stages are single ranks or tensor-parallel groups (place/groups.py has the cost model).
Unless `--optimize` picks one, both plans are printed: "chat" (the lowest time of one
sequence's token, what the REPL and one-shot runs use) and "throughput" (balanced stage
times, the highest aggregate tokens/s at high concurrency, for batch/serve/bench), each with
both bounds, every stage's group and the reason for it. `--tp N` forces N ranks per stage.
"""

from __future__ import annotations

import json
import sys

from pipeline.errors import EXIT_USAGE
from pipeline.model.gguf import GGUFError
from pipeline.model.load import read_config
from pipeline.model.spec import ModelError, resolve_model
from pipeline.model.shell import UnsupportedModel
from pipeline.place.cluster import CapacityError, measure_capacity
from pipeline.place.cost import default_max_context, model_cost, quantized_alternatives
from pipeline.place.groups import OBJECTIVES
from pipeline.place.hostfile import HostfileError
from pipeline.place.planner import DEFAULT_MEMORY_FRACTION, HEADROOM_BYTES, ModelCost, Plan, fmt_bytes
from pipeline.exec.prefix import DEFAULT_PROMPT_CACHE_BYTES
from pipeline.place.preflight import cache_note, nodes_for, measure_cluster, plan_job
from pipeline.place.split import SplitError

PLAN_ERRORS = (ModelError, HostfileError, SplitError, UnsupportedModel, CapacityError,
               GGUFError, FileNotFoundError)


def _fmt_number(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _fmt_bw(bw: float | None) -> str:
    return "?" if not bw else f"{bw / 1e9:.3g} GB/s"


def format_plan(plan: Plan, cost: ModelCost, labels: list[str], header: list[str]) -> str:
    """The table; a mixture of experts gets a column of what one token reads per rank."""
    moe = cost.experts > 0
    rows = [("rank", "host", "memory", "usable", "bandwidth", "layers", "range", "weights",
             *(("read/token",) if moe else ()), "KV cache", "prompt cache", "est ms/token",
             "tp")]
    for r, label in zip(plan.ranks, labels):
        start, end = r.layer_range
        ms = "?" if r.est_ms_per_token is None else f"{r.est_ms_per_token:.3g}"
        rows.append((str(r.rank), label, fmt_bytes(r.memory_bytes), fmt_bytes(r.usable_bytes),
                     _fmt_bw(r.bandwidth), str(r.layers), f"{start}..{end - 1}",
                     fmt_bytes(r.weight_bytes), *((fmt_bytes(r.read_bytes),) if moe else ()),
                     fmt_bytes(r.kv_bytes), fmt_bytes(r.cache_bytes), ms, str(r.tp)))
    total_ms = plan.est_ms_per_token
    rows.append(("total", "", "", "", "", str(sum(plan.split)), "",
                 fmt_bytes(sum(r.weight_bytes for r in plan.ranks)),
                 *((fmt_bytes(sum(r.read_bytes for r in plan.ranks)),) if moe else ()),
                 fmt_bytes(sum(r.kv_bytes for r in plan.ranks)),
                 fmt_bytes(sum(r.cache_bytes for r in plan.ranks)),
                 "?" if total_ms is None else f"{total_ms:.3g}", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    left = {1, 6}  # host, range
    lines = [*header, ""]
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i in left else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    lines += ["", *_stage_lines(plan)]
    if plan.tokens_per_s is not None:
        read = "bytes a token reads" if moe else "weight bytes"
        tp = " + all-reduces" if any(n > 1 for n in plan.groups) else ""
        lines.append(f"\ntokens/s bound: {_fmt_number(plan.tokens_per_s)} (one sequence: {read} / "
                     f"bandwidth per rank{tp} + {plan.hop_ms:.3g} ms of hops per token)")
        if plan.aggregate_tokens_per_s is not None:
            stages, rates = len(plan.groups), all(r.flops for r in plan.ranks)
            lines.append(f"aggregate tokens/s bound at {plan.sequences} concurrent: "
                         f"{_fmt_number(plan.aggregate_tokens_per_s)} ({plan.sequences} / "
                         f"{stages} stage{'s' * (stages > 1)} x slowest step of "
                         f"{plan.step_ms:.3g} ms; " + ("steps: reading the weights or the "
                         "arithmetic, the longer" if rates else "steps: reading the weights "
                         "(no flops= rate: arithmetic not counted)") + ")")
    else:
        lines.append("\ntokens/s bound: unknown (bandwidth not known for every rank: "
                     "split in proportion to memory)")
    return "\n".join(lines)


def _stage_lines(plan: Plan) -> list[str]:
    """Per stage: ranks, tp size, layers, the time it costs and why its group is this size."""
    lines = [f"stages ({plan.objective}): groups {plan.groups}"]
    for s, (stage, lead) in enumerate(zip(plan.stages, plan.leaders)):
        ranks = (f"rank {stage.ranks[0]}" if len(stage.ranks) == 1
                 else f"ranks {stage.ranks[0]}-{stage.ranks[-1]}")
        ms = "" if stage.compute_ms is None else (
            f", {stage.compute_ms:.3g} + {stage.allreduce_ms:.3g} all-reduce + "
            f"{stage.hop_ms:.3g} hop ms")
        lines.append(f"  stage {s}: {ranks}, tp {len(stage.ranks)}, {lead.layers} layers{ms}")
        lines.append(f"    why: {stage.reason}")
    tried = "; ".join(f"{list(g)} {'?' if ms is None else f'{ms:.3g} ms'}"
                      + ("" if step is None else f" (step {step:.3g} ms)")
                      for g, ms, step in plan.layouts)
    lines.append(f"  layouts tried (one-chat ms/token, slowest step): {tried}")
    return lines


def _read_config(path) -> tuple[dict, str | None]:
    """The config, and a note when runs do not support its model_type yet: planning sizes
    any architecture mlx-lm has a class for (read_config parsed it before refusing it)."""
    try:
        return read_config(path), None
    except UnsupportedModel as e:
        config = json.loads((path / "config.json").read_text())
        if not isinstance(config.get("num_hidden_layers"), int):
            raise ModelError(f"{path / 'config.json'} has no integer num_hidden_layers") from None
        return config, f"{e} (planned from mlx-lm's own model class)"


def _model(model: str | None, dtype: str | None):
    path = resolve_model(model)
    config, note = _read_config(path)
    return path, config, model_cost(path, config, dtype), note


def run_plan(model: str | None, hostfile: str | None = None, max_context: int | None = None,
             memory_fraction: float = DEFAULT_MEMORY_FRACTION, as_json: bool = False,
             comm=None, *, dtype: str | None = None, split: str | None = None,
             out=None, tp: int | None = None, optimize: str | None = None,
             prompt_cache_bytes: int | None = None) -> int:
    """Print the plan (rank 0) and return the exit code, the same on every rank: 0, or 2
    with one `pipeline: error:` line when the model does not fit or the input is wrong.

    comm: the job's communicator (None or size 1: no mpirun). dtype: the run's --dtype
    ("checkpoint": as stored; default: float32 on a CPU it measures, as the run would; the
    checkpoint's for hosts declared in a hostfile). tp: ranks per stage (None: the planner
    chooses). optimize: "chat" or "throughput" (None: print both plans). prompt_cache_bytes:
    the prompt cache's budget per rank, counted in every plan (None: the default budget in
    the throughput plan, for batch and serve; none in the chat plan: the REPL and one-shot
    runs keep no prompt cache).
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
                            split, as_json, out, tp, optimize, prompt_cache_bytes)
        except PLAN_ERRORS as e:
            print(f"pipeline: error: {e}", file=sys.stderr, flush=True)
            code = EXIT_USAGE
    return comm.bcast(code, root=0) if size > 1 else code


def _cache_for(objective: str, prompt_cache_bytes: int | None) -> int:
    if prompt_cache_bytes is not None:
        return prompt_cache_bytes
    return DEFAULT_PROMPT_CACHE_BYTES if objective == "throughput" else 0


def _plan_and_print(model_info, hostfile, caps, hops, max_context, memory_fraction, split,
                    as_json, out, tp=None, optimize=None, prompt_cache_bytes=None) -> None:
    path, config, cost, note = model_info
    max_context = max_context or default_max_context(config)
    nodes, labels, source = nodes_for(caps, hostfile)
    plans = {objective: plan_job(cost, nodes, max_context, memory_fraction=memory_fraction,
                                 split=split, hops=hops, tp=tp, objective=objective,
                                 config=config,
                                 alternatives=quantized_alternatives(config, cost.dtype),
                                 cache_bytes=_cache_for(objective, prompt_cache_bytes))
             for objective in ([optimize] if optimize else OBJECTIVES)}
    plan = next(iter(plans.values()))
    hop_note = "measured" if hops is not None else "assumed"
    if as_json:
        doc = {**plan.to_json(), "plans": {k: {**p.to_json(), "prompt_cache_note": cache_note(p)}
                                           for k, p in plans.items()},
               "model": {"path": str(path), "description": cost.description,
               "num_layers": cost.num_layers, "head_bytes": cost.head_bytes,
               "weight_bytes": cost.weight_bytes, "read_bytes_per_token": cost.token_read_bytes,
               "experts": cost.experts, "experts_per_token": cost.experts_per_token},
               "note": note, "source": source, "hops": hop_note, "headroom_bytes": HEADROOM_BYTES,
               "capacities": [c.to_json() for c in caps] if caps else None}
        print(json.dumps(doc), file=out, flush=True)
        return
    moe = [f"  weights {fmt_bytes(cost.weight_bytes)}, read per token "
           f"{fmt_bytes(cost.token_read_bytes)} (all but the routed experts, and "
           f"{cost.experts_per_token} of their {cost.experts} per layer)"] if cost.experts else []
    header = [f"model: {path}", f"  {cost.description}", *moe,
              *([f"note: {note}"] if note else []), f"capacities: {source}",
              f"max context {max_context} tokens, memory fraction {memory_fraction:g}, headroom "
              f"{fmt_bytes(HEADROOM_BYTES)} per rank, hops {hop_note}"
              + (" (lat= declared)" if hops is None and any(n.latency_s for n in nodes) else "")
              + (f", --split {split}" if split else "") + (f", --tp {tp}" if tp else "")]
    print("\n".join(header), file=out)
    for objective, plan in plans.items():
        title = [f"{objective} plan ({_USE[objective]}):", _cache_line(plan, prompt_cache_bytes)]
        if cache_note(plan):
            title.append(f"note: {cache_note(plan)}")
        if plan.head_share_rows:
            title.append(f"shared head: in batch/serve/bench the last rank also holds the head's "
                         f"first {plan.head_share_rows} of {cost.vocab} rows (counted in its "
                         f"weights; --no-share-head there)")
        print("\n" + format_plan(plan, cost, labels, title), file=out, flush=True)


def _cache_line(plan: Plan, asked: int | None) -> str:
    if plan.cache_bytes:
        return (f"prompt cache: {fmt_bytes(plan.cache_bytes)} per rank (--prompt-cache-bytes), "
                f"counted beside weights, KV cache and headroom")
    if asked is None and not plan.cache_asked:  # the chat plan's default
        return "prompt cache: none (the REPL and one-shot runs keep none)"
    return "prompt cache: off"


_USE = {"chat": "one sequence as fast as it goes: REPL and one-shot runs",
        "throughput": "many sequences, balanced stage times: batch, serve, bench"}
