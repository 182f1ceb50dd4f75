"""Job start-up shared by every command: MPI, model resolution, split, per-rank load.

Errors that every rank would hit (bad path, bad --split, ...) are found by rank 0 before
anything is loaded and sent to all ranks, which then exit together with one clear line.
A failure while a rank loads its share is gathered the same way. Nothing is left waiting.
"""

from __future__ import annotations

import signal
import socket
import sys
import traceback
from dataclasses import dataclass

from mpi4py import MPI

from pipeline.host import blas, wired
from pipeline.host import hugepages
from pipeline.model.gguf import GGUFError
from pipeline.exec.driver import Driver
from pipeline.exec.worker import Worker
from pipeline.wire import mpi
from pipeline.wire.ring import FollowerRing, GroupLink, Ring
from pipeline.model.spec import ModelError, hub_repo, model_kind, resolve_model
from pipeline.model.load import held_parameters, load_stage, read_config, resident_bytes
from pipeline.place.cluster import CapacityError
from pipeline.errors import EXIT_FAILURE, EXIT_USAGE, JobError, raise_together
from pipeline.files.prepare import prepare as prepare_files
from pipeline.place.hostfile import HostfileError
from pipeline.place.planner import DEFAULT_MEMORY_FRACTION, HIGH_CONCURRENCY
from pipeline.place.split import SplitError, check_rank_count, layer_ranges
from pipeline.place.cost import default_max_context
from pipeline.place.preflight import cache_note, measure_cluster, preflight_plan
from pipeline.model.shell import UnsupportedModel
from pipeline.host.rows_first import use_rows_first

# launch/mpirun turns Ctrl-C into SIGUSR1, which mpirun forwards to every rank (a SIGINT to
# mpirun itself would end the job): rank 0 takes it as Ctrl-C, the other ranks ignore it.
INTERRUPTS = (signal.SIGINT, signal.SIGUSR1)

USER_ERRORS = (ModelError, SplitError, UnsupportedModel, FileNotFoundError, GGUFError,
               HostfileError)


@dataclass
class Options:
    model: str | None = None
    split: str | None = None
    dtype: str | None = None  # None: float32 on CPU, the checkpoint's dtype on a GPU
    verbose: bool = False
    prefill_chunk: int = 512
    dequantize: bool | None = None  # None: only the embedded default model on a CPU
    hostfile: str | None = None  # per-host memory caps (`# pipeline: mem=48G`)
    max_context: int | None = None  # KV-cache tokens to reserve; None: the model's context
    memory_fraction: float = DEFAULT_MEMORY_FRACTION
    distribute: bool | None = None  # None: send model files a rank lacks; False: refuse then
    share_head: bool = True  # the last rank computes part of batched decode steps' head
    tp: int | None = None  # ranks per stage (tensor parallel); None: the planner chooses
    objective: str = "chat"  # what the planner optimizes: "chat" (one sequence) or "throughput"
    sequences: int = 1  # decoded at once: the work the plan is for
    prompt_cache_bytes: int = 0  # per rank (serve, batch): counted by the plan, cut to fit
    refuse: str | None = None  # rank 0 found bad input before start (a taken --port): every
    #                            rank ends at the first collective, before anything loads


def checked_options(model, split, dtype, verbose, prefill_chunk, dequantize, sampling,
                    hostfile=None, max_context=None, memory_fraction=0.8, distribute=None,
                    share_head=False, tp=None, optimize=None, sequences=1,
                    prompt_cache_bytes=0) -> Options:
    """Options from the command's flags, after what every rank can check alone (ValueError
    with the one line to print). sequences: how many the command decodes at once (one chat:
    1); the plan is for them: one chat's speed, or throughput from 2 on, unless --optimize."""
    from pipeline.model.load import DTYPE_NAMES, resolve_dtype
    from pipeline.place.groups import OBJECTIVES

    sampling.check()
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ValueError(f"--dtype {dtype} is not one of {', '.join(DTYPE_NAMES)}")
    if prefill_chunk < 1:
        raise ValueError("--prefill-chunk must be at least 1")
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"--memory-fraction {memory_fraction} is outside (0, 1]")
    if max_context is not None and max_context < 1:
        raise ValueError("--max-context must be at least 1")
    if tp is not None and tp < 1:
        raise ValueError("--tp must be at least 1")
    if optimize is not None and optimize not in OBJECTIVES:
        raise ValueError(f"--optimize {optimize} is not one of {', '.join(OBJECTIVES)}")
    return Options(model=model, split=split, dtype=resolve_dtype(dtype), verbose=verbose,
                   prefill_chunk=prefill_chunk, dequantize=dequantize, hostfile=hostfile,
                   max_context=max_context, memory_fraction=memory_fraction,
                   distribute=distribute, share_head=share_head, tp=tp,
                   objective=optimize or ("throughput" if sequences > 1 else "chat"),
                   sequences=max(1, sequences), prompt_cache_bytes=prompt_cache_bytes)


OBJECTIVE_WORDS = {"chat": "one chat", "throughput": "many sequences"}


class Log:
    def __init__(self, rank: int, verbose: bool):
        self.rank, self.verbose = rank, verbose
        self.host = socket.gethostname()

    def __call__(self, msg: str) -> None:
        if self.verbose:
            print(f"[rank {self.rank} {self.host}] {msg}", file=sys.stderr, flush=True)


def _plan(opts: Options, path, config: dict, caps, hops, size: int) -> dict:
    """Rank 0: the split, checked against every rank's memory before anything is loaded."""
    check_rank_count(config["num_hidden_layers"], size)
    plan = preflight_plan(path, config, caps, hops, hostfile=opts.hostfile,
                          max_context=opts.max_context, memory_fraction=opts.memory_fraction,
                          dtype=opts.dtype, split=opts.split, dequantize=_dequantize(opts),
                          share_head=opts.share_head, tp=_tp(opts), objective=opts.objective,
                          sequences=opts.sequences if opts.sequences > 1 else HIGH_CONCURRENCY,
                          cache_bytes=opts.prompt_cache_bytes)
    groups = list(plan.groups)
    return {"split": plan.split, "repo": hub_repo(opts.model), "groups": groups,
            "head_share_rows": plan.head_share_rows, "objective": opts.objective,
            "prompt_cache_bytes": plan.cache_bytes, "cache_note": cache_note(plan)}


def _tp(opts: Options) -> int | None:
    """--tp, or 1 (a pure pipeline) where this process cannot make tensor-parallel groups."""
    why = mpi.unavailable()
    if why is None or why == "one rank":
        return opts.tp
    if opts.tp is not None and opts.tp > 1:
        raise SplitError(f"--tp {opts.tp}: tensor parallelism is unavailable here: {why}")
    return 1


def _group(groups: list[int], rank: int) -> tuple[int, list[int]]:
    """(this rank's stage, the ranks of that stage's group, leader first)."""
    first = 0
    for stage, n in enumerate(groups):
        if rank < first + n:
            return stage, list(range(first, first + n))
        first += n
    raise ValueError(f"rank {rank} is outside the plan's {sum(groups)} ranks")


def _dequantize(opts: Options) -> bool:
    if opts.dequantize is not None:
        return opts.dequantize
    return opts.model is None and blas.describe()[0] == "cpu"  # the embedded model on a CPU


def start(opts: Options, comm=None):
    """Set up this rank. Rank 0 gets a Driver; the others serve and return None."""
    comm = comm or MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    log = Log(rank, opts.verbose)

    # Rank 0 must have the model; another rank may lack its folder (or the hub) and receive
    # its files from rank 0 once the split is known (distribute.py), so it takes rank 0's config.
    kind, refused = comm.bcast(
        (None if opts.refuse else model_kind(opts.model), opts.refuse) if rank == 0 else None,
        root=0)
    if refused:
        raise JobError(refused if rank == 0 else None, EXIT_USAGE)
    path = config = error = None
    try:  # every rank finds the model (a .gguf or the embedded model is imported locally)
        if rank == 0 or kind != "folder":
            path = resolve_model(opts.model)
            config = read_config(path)
    except USER_ERRORS as e:
        if rank == 0 or kind != "hub" or opts.distribute is False:
            error = str(e)
        else:
            log(f"cannot fetch {opts.model} here ({e}): rank 0 will send its files")
    raise_together(comm, error, EXIT_USAGE, any_rank=True)
    config = comm.bcast(config, root=0)

    caps, hops, plan, error = None, None, None, None
    try:
        caps, hops = measure_cluster(comm, str(path or opts.model))  # collective: memory, links
    except CapacityError as e:  # raised on rank 0 only, once every rank is done
        error = str(e)
    if rank == 0 and error is None:
        try:
            plan = _plan(opts, path, config, caps, hops, size)
        except USER_ERRORS as e:
            error = str(e)
    raise_together(comm, error, EXIT_USAGE)
    plan = comm.bcast(plan, root=0)
    # collective: each rank gets verified copies of the files its layers need
    groups = plan["groups"]
    path = prepare_files(comm, opts.model, kind, path, plan["split"], opts.distribute, log,
                         plan["head_share_rows"] > 0, groups)

    stage_index, members = _group(groups, rank)
    tp_group = None
    if any(n > 1 for n in groups):  # collective over the world: every rank splits
        tp_group = mpi.world().split(stage_index, rank)
        if len(members) == 1:
            tp_group = None
    layer_range = layer_ranges(plan["split"])[stage_index]
    stage, error, wired_note = None, None, None
    try:
        log(f"loading layers {layer_range[0]}..{layer_range[1] - 1} from {path}"
            + (f" (tensor parallel over ranks {members[0]}-{members[-1]})" if tp_group else ""))
        dequantize = _dequantize(opts)
        last_leader = stage_index == len(groups) - 1 and rank == members[0]
        share = plan["head_share_rows"] if last_leader and len(groups) > 1 else 0
        stage = load_stage(path, config, layer_range, with_head=stage_index == 0,
                           dtype=opts.dtype, dequantize=dequantize, head_share_rows=share,
                           group=tp_group)
        if share:
            log(f"holds the head's first {share} rows (shared head)")
        weight_bytes = resident_bytes(stage)
        if blas.rows_first_pays():
            switched, plain = use_rows_first(stage)
            log(f"{switched} linear layers multiply few rows as (W @ x.T).T"
                + (f"; {plain} left plain (not bitwise equal on this machine)" if plain else ""))
        if hugepages.wanted():
            huge = hugepages.advise(held_parameters(stage).values())
            log(f"{huge / 2**20:.0f} MiB of weights moved onto 2 MiB pages")
        wired_note = wired.set_wired_limit(weight_bytes)  # Metal only, as mlx-lm does
        log(f"loaded {len(stage.loaded_names)} tensors, {weight_bytes / 2**20:.1f} MiB")
    except USER_ERRORS as e:
        error = str(e)
    except Exception as e:  # an unexpected failure still ends every rank together
        error = f"{type(e).__name__}: {e}"
        log(traceback.format_exc())
    raise_together(comm, error, EXIT_FAILURE, any_rank=True)
    device, blas_name, reference = blas.describe()
    reports = comm.gather((socket.gethostname(), device, blas_name, reference, wired_note),
                          root=0)

    link = GroupLink(comm, members[1:]) if tp_group and rank == members[0] else None
    if rank != 0:
        if rank == members[0]:
            Worker(Ring(comm, groups), stage, weight_bytes, group=link).run()
        else:
            Worker(FollowerRing(comm, groups), stage, weight_bytes).run()
        return None

    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(path)
    hosts = sorted({r[0] for r in reports})
    print(f"pipeline: {size} rank{'s' * (size > 1)} on {len(hosts)} host{'s' * (len(hosts) > 1)}, "
          f"{config['model_type']} {config['num_hidden_layers']} layers split {plan['split']}"
          + (f" over stages of {groups} ranks (tensor parallel within)" if tp_group or any(
              n > 1 for n in groups) else "")
          + (f" (planned for {OBJECTIVE_WORDS[plan['objective']]})" if size > 1 else "") + ", "
          f"device {device}, BLAS {blas_name}", file=sys.stderr, flush=True)
    for r, (host, _, name, ref, note) in enumerate(reports):
        if ref:
            print(f"pipeline: warning: rank {r} ({host}) uses the {name} (~30x slower): "
                  f"install OpenBLAS (apt-get install libopenblas0-pthread)",
                  file=sys.stderr, flush=True)
        if note:
            print(f"pipeline: warning: rank {r} ({host}): {note}", file=sys.stderr, flush=True)
    if plan["cache_note"]:
        print(f"pipeline: note: {plan['cache_note']}", file=sys.stderr, flush=True)
    context = opts.max_context or default_max_context(config)
    ring = Ring(comm, groups) if size > 1 else None
    driver = Driver(comm, stage, tokenizer, weight_bytes, opts.prefill_chunk, context,
                    head_share_rows=plan["head_share_rows"], log=log, ring=ring, group=link)
    driver.groups = groups
    driver.prompt_cache_bytes = plan["prompt_cache_bytes"]
    driver.cache_scale = _cache_scale(layer_ranges(plan["split"]), groups)
    return driver


def _cache_scale(ranges: list[tuple[int, int]], groups: list[int]) -> float:
    """Prompt-cache bytes on the busiest rank per byte on rank 0: a rank keeps its layers'
    share of an entry (a tensor-parallel rank its heads' share), rank 0 measures its own."""
    per_rank = [(end - start) / n for (start, end), n in zip(ranges, groups)]
    return max(per_rank) / per_rank[0]


def abort_on_error(comm, exc: BaseException, verbose: bool) -> None:
    """Unexpected failure: one line naming rank and host, then end the whole job (all ranks)."""
    rank = comm.Get_rank()
    if verbose:
        traceback.print_exception(exc)
    print(f"pipeline: error: rank {rank} ({socket.gethostname()}) failed: "
          f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    if comm.Get_size() > 1:
        # Not comm.Abort: mpirun may then drop this rank's last output (the line above). A
        # rank that exits non-zero without MPI_Finalize makes mpirun end every rank too, once
        # its output is passed on; os._exit skips mpi4py's Finalize, which would wait for them.
        import os

        sys.stdout.flush()
        os._exit(EXIT_FAILURE)
    sys.exit(EXIT_FAILURE)
