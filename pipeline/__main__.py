"""Command line: `python -m pipeline` (chat REPL or one-shot), under mpirun or alone.

    mpirun -np 2 python -m pipeline                        # chat on the embedded model
    mpirun -np 2 python -m pipeline --prompt "Hi" --temp 0 # one-shot
    python -m pipeline make-model --like tiny-llama OUT    # random-weight model for tests
"""

import os
import signal

# Ctrl-C under launch/mpirun arrives as SIGUSR1 (see exec/job.py INTERRUPTS) at every rank. The
# ranks other than 0 ignore it from the start (an ignored signal stays ignored across the
# BLAS re-exec below); rank 0 decides: its commands set handlers, and before that (start-up)
# the signal ends rank 0 and with it the job, as Ctrl-C should.
if hasattr(signal, "SIGUSR1") and os.environ.get("OMPI_COMM_WORLD_RANK", "0") != "0":
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)

from pipeline.host.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()  # re-execs with OpenBLAS preloaded; must run before mlx is imported

from pipeline.wire import mpi  # noqa: E402

mpi.start()  # MLX starts MPI (tensor-parallel groups), then mpi4py joins it

import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import typer  # noqa: E402

from pipeline.exec.driver import DEFAULT_PREFILL_CHUNK  # noqa: E402
from pipeline.exec.sampling import DEFAULT_MAX_TOKENS, SamplingParams  # noqa: E402
from pipeline.flags import (  # noqa: E402
    CHAT, DEQUANTIZE, DISTRIBUTE, DRAFT_EXACT, DRAFT_MODEL, DTYPE, HOSTFILE, IGNORE_EOS,
    MAX_CONTEXT, MAX_TOKENS, MEMORY_FRACTION, MIN_P, MODEL, NUM_DRAFT_TOKENS, PREFILL_CHUNK,
    OPTIMIZE, PROMPT_CACHE_BYTES, PROMPT_LOOKUP, SEED, SHARE_HEAD, SPLIT, SYSTEM, TEMP, TOP_P, TP,
    VERBOSE,
)
from pipeline.model.load import DTYPE_NAMES  # noqa: E402
from pipeline.serve.server import (  # noqa: E402
    API_KEY_ENV, DEFAULT_CONCURRENCY, DEFAULT_HOST, DEFAULT_MAX_QUEUE, DEFAULT_PORT,
)

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})

MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")


def _rank() -> int:
    # Before MPI starts: the launcher's environment says which rank this is.
    for var in MPI_RANK_VARS:
        if var in os.environ:
            return int(os.environ[var])
    return 0


def _refuse_mlx_launch() -> None:
    """MLX's own launcher (`mlx.launch`, ring or JACCL backend) sets MLX_RANK but starts no
    MPI job: every process would run alone, each believing it is rank 0 of one. Say so once
    (MLX's rank 0) and exit 2 on every rank, before anything loads."""
    if "MLX_RANK" not in os.environ or any(v in os.environ for v in MPI_RANK_VARS):
        return
    if os.environ["MLX_RANK"] == "0":
        print("pipeline: error: started by mlx.launch (MLX_RANK is set, no Open MPI job): "
              "pipeline's ranks talk over MPI; start it with launch/mpirun -hostfile HOSTFILE "
              ".venv/bin/python -m pipeline (or mpirun -np N python -m pipeline)",
              file=sys.stderr, flush=True)
    sys.exit(2)


def _fail(message: str, code: int = 2) -> None:
    """Every rank parses the same flags, so every rank stops; only rank 0 says why."""
    if _rank() == 0:
        print(f"pipeline: error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def _run(opts, body) -> None:
    from mpi4py import MPI

    from pipeline.exec import job

    comm = MPI.COMM_WORLD
    try:
        driver = job.start(opts, comm)
    except KeyboardInterrupt:  # Ctrl-C while loading: end the job (mpirun stops the others)
        print("pipeline: interrupted during start-up", file=sys.stderr, flush=True)
        os._exit(130)
    except job.JobError as e:
        if e.message:
            print(f"pipeline: error: {e.message}", file=sys.stderr, flush=True)
        raise typer.Exit(e.exit_code)
    except Exception as e:  # a bug or a dead peer: end the whole job, never hang it
        job.abort_on_error(comm, e, opts.verbose)
    if driver is None:
        return  # this rank served the pipeline until rank 0 said quit
    try:
        body(driver)
    except ValueError as e:  # a request rank 0 refused (e.g. prompt too long): ranks still idle
        driver.shutdown()
        _fail(str(e))
    except Exception as e:
        job.abort_on_error(comm, e, opts.verbose)
    driver.shutdown()


def _bytes(text: str, flag: str) -> int:
    from pipeline.place.hostfile import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        _fail(f"{flag}: {e}")


def _options(*args, **kwargs):
    """The job's options from the flags (exec/job.py checks them: every rank stops alike)."""
    from pipeline.exec.job import checked_options

    try:
        return checked_options(*args, **kwargs)
    except ValueError as e:
        _fail(str(e))


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    model: Optional[str] = MODEL,
    prompt: Optional[str] = typer.Option(
        None, "--prompt", "-p", help="Generate once for this prompt and exit (else: chat REPL)."),
    max_tokens: int = MAX_TOKENS, temp: float = TEMP, top_p: float = TOP_P, min_p: float = MIN_P,
    seed: Optional[int] = SEED, system: Optional[str] = SYSTEM, chat: Optional[bool] = CHAT,
    split: Optional[str] = SPLIT, dtype: Optional[str] = DTYPE, prefill_chunk: int = PREFILL_CHUNK,
    dequantize: Optional[bool] = DEQUANTIZE, ignore_eos: bool = IGNORE_EOS,
    as_json: bool = typer.Option(False, "--json", help="One-shot: print a JSON object with tokens and stats."),
    hostfile: Optional[str] = HOSTFILE, max_context: Optional[int] = MAX_CONTEXT,
    memory_fraction: float = MEMORY_FRACTION, distribute: Optional[bool] = DISTRIBUTE,
    prompt_lookup: bool = PROMPT_LOOKUP, num_draft_tokens: int = NUM_DRAFT_TOKENS,
    draft_model: Optional[str] = DRAFT_MODEL, draft_exact: bool = DRAFT_EXACT,
    tp: Optional[int] = TP, optimize: Optional[str] = OPTIMIZE, verbose: bool = VERBOSE,
):
    """Chat with (or, with --prompt, run once) an LLM split by layers across MPI ranks."""
    if ctx.invoked_subcommand is not None:
        return
    sampling = SamplingParams(temp=temp, top_p=top_p, min_p=min_p, seed=seed,
                        max_tokens=max_tokens, ignore_eos=ignore_eos)
    opts = _options(model, split, dtype, verbose, prefill_chunk, dequantize, sampling, hostfile,
                    max_context, memory_fraction, distribute, tp=tp, optimize=optimize)
    if prompt is not None and not prompt.strip():
        _fail("--prompt is empty: give some text")
    if num_draft_tokens < 1:
        _fail("--num-draft-tokens must be at least 1 (--no-prompt-lookup turns drafting off)")
    from pipeline.commands.chat import run_one_shot, run_repl, set_drafting

    def body(driver):
        set_drafting(driver, prompt_lookup, num_draft_tokens, draft_model, opts, draft_exact)
        if prompt is not None:
            run_one_shot(driver, prompt, system, chat, sampling, as_json)
        else:
            run_repl(driver, system, chat, sampling)

    _run(opts, body)


@app.command("batch")
def batch_cmd(
    prompts: Path = typer.Argument(..., help="Prompts: .txt (one per line) or .jsonl."),
    out: Path = typer.Option(..., "--out", "-o", help="Results, one JSON line each (appended; "
                             "ids already there are skipped, so a rerun resumes)."),
    concurrency: int = typer.Option(8, "--concurrency", "-c", help="Sequences generated at once."),
    model: Optional[str] = MODEL, max_tokens: int = MAX_TOKENS, temp: float = TEMP,
    top_p: float = TOP_P, min_p: float = MIN_P, seed: Optional[int] = SEED,
    system: Optional[str] = SYSTEM, chat: Optional[bool] = CHAT, split: Optional[str] = SPLIT,
    dtype: Optional[str] = DTYPE, prefill_chunk: int = PREFILL_CHUNK,
    dequantize: Optional[bool] = DEQUANTIZE, ignore_eos: bool = IGNORE_EOS,
    hostfile: Optional[str] = HOSTFILE, max_context: Optional[int] = MAX_CONTEXT,
    memory_fraction: float = MEMORY_FRACTION, distribute: Optional[bool] = DISTRIBUTE,
    share_head: bool = SHARE_HEAD, tp: Optional[int] = TP, optimize: Optional[str] = OPTIMIZE,
    prompt_cache_bytes: str = PROMPT_CACHE_BYTES, verbose: bool = VERBOSE,
):
    """Run a file of prompts with micro-batched pipelining; results stream into OUT."""
    from pipeline.commands.batch import (BatchFileError, Defaults, check_output, run_batch,
                                         sequences_at_once)

    sampling = SamplingParams(temp=temp, top_p=top_p, min_p=min_p, seed=seed,
                        max_tokens=max_tokens, ignore_eos=ignore_eos)
    at_once = sequences_at_once(prompts, out, concurrency)  # one prompt left: plan one chat
    cache_bytes = _bytes(prompt_cache_bytes, "--prompt-cache-bytes")
    opts = _options(model, split, dtype, verbose, prefill_chunk, dequantize, sampling, hostfile,
                    max_context, memory_fraction, distribute, share_head, tp, optimize,
                    sequences=at_once, prompt_cache_bytes=cache_bytes)
    if concurrency < 1:
        _fail("--concurrency must be at least 1")
    try:
        if not prompts.is_file():
            raise BatchFileError(f"prompts file {prompts} does not exist")
        check_output(out)
    except BatchFileError as e:
        _fail(str(e))
    defaults = Defaults(sampling, system, chat)
    status = []  # rank 0's exit code, given once every rank has shut down
    # the plan's budget: --prompt-cache-bytes, or what fits beside the model
    _run(opts, lambda d: status.append(run_batch(d, prompts, out, defaults, concurrency,
                                                   prompt_cache_bytes=d.prompt_cache_bytes)))
    if status and status[0]:
        raise typer.Exit(status[0])


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        _fail(f"{flag} '{text}' must be a comma-separated list of positive numbers")
    return values


@app.command("bench")
def bench_cmd(
    model: Optional[str] = MODEL,
    prompt_tokens: str = typer.Option("128", "--prompt-tokens", help="Prompt lengths, e.g. 128,2048."),
    gen_tokens: int = typer.Option(64, "--gen-tokens", help="Tokens generated per sequence."),
    concurrency: str = typer.Option("1,8", "--concurrency", help="Sequences at once, e.g. 1,8,32."),
    repeats: int = typer.Option(3, "--repeats"),
    warmup: int = typer.Option(1, "--warmup"),
    prefill_tokens: int = typer.Option(0, "--prefill-tokens",
                                       help="Also time the prefill of one prompt this long."),
    prefill_chunks: str = typer.Option("128,256,512", "--prefill-chunks",
                                       help="Chunk sizes tried for that prefill."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results here."),
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="Draw tok/s against concurrency "
                                            "(or, with --from-json, against the runs) to this PNG."),
    label: Optional[str] = typer.Option(None, "--label", help="Name of this run in the JSON and "
                                        "plots, e.g. the link [default: N ranks]."),
    from_json: Optional[str] = typer.Option(None, "--from-json", help="No benchmark: plot these "
                                            "runs' JSON files (comma-separated) with --plot."),
    speculative: bool = typer.Option(False, "--speculative", help="Instead: one chat's decode "
                                     "tok/s with and without prompt lookup, on edit prompts "
                                     "and plain questions (acceptance, tokens per pass)."),
    num_draft_tokens: int = NUM_DRAFT_TOKENS, draft_exact: bool = DRAFT_EXACT,
    prefix_cache: bool = typer.Option(False, "--prefix-cache", help="Instead: conversations "
                                      "over a shared system prompt, turn by turn, with the "
                                      "prompt cache and without (time to first token per "
                                      "turn, cached tokens, aggregate time)."),
    grammar: bool = typer.Option(False, "--grammar", help="Instead: one sequence's decode tok/s "
                                 "free and under a JSON grammar (constrained decoding's cost)."),
    conversations: int = typer.Option(8, "--conversations", help="With --prefix-cache."),
    turns: int = typer.Option(3, "--turns", help="With --prefix-cache: turns per conversation."),
    system_tokens: int = typer.Option(2000, "--system-tokens", help="With --prefix-cache: the "
                                      "shared system prompt's length."),
    user_tokens: int = typer.Option(64, "--user-tokens", help="With --prefix-cache: each user "
                                    "message's length."),
    prompt_cache_bytes: str = PROMPT_CACHE_BYTES,
    split: Optional[str] = SPLIT, dtype: Optional[str] = DTYPE,
    dequantize: Optional[bool] = DEQUANTIZE, distribute: Optional[bool] = DISTRIBUTE,
    share_head: bool = SHARE_HEAD, tp: Optional[int] = TP, optimize: Optional[str] = OPTIMIZE,
    verbose: bool = VERBOSE,
):
    """Measure TTFT, decode and prefill throughput of this job (random prompts, EOS ignored)."""
    import importlib.util

    from pipeline.commands.bench import probe_links, run_bench
    from pipeline.commands.bench_plot import plot_files

    if plot_out is not None and _rank() == 0 and importlib.util.find_spec("matplotlib") is None:
        _fail("--plot needs matplotlib: pip install 'matplotlib>=3.7' (make install does)")
    if from_json is not None:
        if plot_out is None:
            _fail("--from-json only plots: add --plot OUT.png")
        try:
            plot_files([Path(f) for f in from_json.split(",") if f.strip()], plot_out)
        except ValueError as e:
            _fail(str(e))
        raise typer.Exit(0)
    # the prompt cache only in --prefix-cache mode (the plan counts it, and may cut it)
    cache_bytes = _bytes(prompt_cache_bytes, "--prompt-cache-bytes") if prefix_cache else 0
    opts = _options(model, split, dtype, verbose, DEFAULT_PREFILL_CHUNK, dequantize,
                    SamplingParams(max_tokens=gen_tokens), distribute=distribute,
                    share_head=share_head, tp=tp, optimize=optimize,
                    sequences=max(_int_list(concurrency, "--concurrency"), default=1),
                    prompt_cache_bytes=cache_bytes)
    args = (_int_list(prompt_tokens, "--prompt-tokens"), gen_tokens,
            _int_list(concurrency, "--concurrency"), repeats, warmup, prefill_tokens,
            _int_list(prefill_chunks, "--prefill-chunks"), json_out, plot_out, label)
    if repeats < 1 or warmup < 0:
        _fail("--repeats must be at least 1 and --warmup at least 0")
    if speculative:
        from pipeline.commands.bench_spec import run_speculative_bench

        if num_draft_tokens < 1:
            _fail("--num-draft-tokens must be at least 1")
        _run(opts, lambda d: run_speculative_bench(d, gen_tokens, repeats, warmup,
                                                   num_draft_tokens, json_out, label,
                                                   exact=draft_exact))
        return
    if grammar:
        from pipeline.commands.bench_grammar import run_grammar_bench

        _run(opts, lambda d: run_grammar_bench(d, gen_tokens, repeats, warmup, json_out, label))
        return
    if prefix_cache:
        from pipeline.commands.bench_cache import run_cache_bench

        if min(conversations, system_tokens, user_tokens) < 1 or turns < 2 or cache_bytes < 1:
            _fail("--prefix-cache needs --conversations, --system-tokens, --user-tokens and "
                  "--prompt-cache-bytes of at least 1 and --turns of at least 2")
        _run(opts, lambda d: run_cache_bench(
            d, conversations, turns, system_tokens, user_tokens, gen_tokens,
            max(_int_list(concurrency, "--concurrency")), d.prompt_cache_bytes, repeats,
            json_out, label))
        return
    from mpi4py import MPI

    links = probe_links(MPI.COMM_WORLD)  # collective: each ring link, before the model loads
    _run(opts, lambda d: run_bench(d, *args, links))


@app.command("serve")
def serve_cmd(
    host: str = typer.Option(DEFAULT_HOST, "--host", help="Address to listen on (127.0.0.1: "
                             "this machine only; 0.0.0.0: every interface)."),
    port: int = typer.Option(DEFAULT_PORT, "--port", help="TCP port (0: any free one)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar=API_KEY_ENV, help="Key every "
                                          "request must send as 'Authorization: Bearer KEY' "
                                          "(the page and /health stay open)."),
    concurrency: int = typer.Option(DEFAULT_CONCURRENCY, "--concurrency", "-c",
                                     help="Requests generated at once."),
    max_queue: int = typer.Option(DEFAULT_MAX_QUEUE, "--max-queue", help="Requests waiting beyond "
                                  "--concurrency; more are refused with 429."),
    model: Optional[str] = MODEL,
    max_tokens: int = typer.Option(DEFAULT_MAX_TOKENS, "--max-tokens",
                                   help="Default max_tokens of a request that gives none."),
    split: Optional[str] = SPLIT, dtype: Optional[str] = DTYPE, prefill_chunk: int = PREFILL_CHUNK,
    dequantize: Optional[bool] = DEQUANTIZE, hostfile: Optional[str] = HOSTFILE,
    max_context: Optional[int] = MAX_CONTEXT, memory_fraction: float = MEMORY_FRACTION,
    distribute: Optional[bool] = DISTRIBUTE, share_head: bool = SHARE_HEAD,
    tp: Optional[int] = TP, optimize: Optional[str] = OPTIMIZE,
    prompt_cache_bytes: str = PROMPT_CACHE_BYTES,
    prompt_lookup: bool = PROMPT_LOOKUP, num_draft_tokens: int = NUM_DRAFT_TOKENS,
    draft_model: Optional[str] = DRAFT_MODEL, draft_exact: bool = DRAFT_EXACT,
    verbose: bool = VERBOSE,
):
    """OpenAI-compatible API (/v1) and a chat page (/) on rank 0; the other ranks serve layers.
    With --concurrency 1 each request is one chat at a time, with speculative decoding."""
    from pipeline.serve.server import check_api_key, listen_socket, model_name, run_serve

    cache_bytes = _bytes(prompt_cache_bytes, "--prompt-cache-bytes")
    opts = _options(model, split, dtype, verbose, prefill_chunk, dequantize,
                    SamplingParams(max_tokens=max_tokens), hostfile, max_context, memory_fraction,
                    distribute, share_head, tp, optimize, sequences=concurrency,
                    prompt_cache_bytes=cache_bytes)
    if concurrency < 1 or max_queue < 0:
        _fail("--concurrency must be at least 1 and --max-queue at least 0")
    if not 0 <= port <= 65535:
        _fail(f"--port {port} is outside 0-65535")
    sock = None
    if _rank() == 0:  # claim the port now; a taken one ends every rank before the model loads
        try:
            api_key = check_api_key(api_key)
            sock = listen_socket(host, port)
        except ValueError as e:
            opts.refuse = str(e)

    def body(driver):
        if concurrency == 1:  # more at once: micro-batches keep the stages busy instead
            from pipeline.commands.chat import set_drafting

            set_drafting(driver, prompt_lookup, num_draft_tokens, draft_model, opts,
                         draft_exact)
        run_serve(driver, sock, model_name(model), concurrency, max_queue, max_tokens, verbose,
                  api_key, prompt_cache_bytes=driver.prompt_cache_bytes)

    _run(opts, body)


@app.command("make-model")
def make_model_cmd(
    out: Path = typer.Argument(..., help="Folder to write."),
    like: str = typer.Option("tiny-llama", "--like", help="Shape preset, e.g. tiny-llama, qwen2.5-0.5b."),
    dtype: str = typer.Option("float32", "--dtype"),
    seed: int = typer.Option(0, "--seed"),
    layers: Optional[int] = typer.Option(None, "--layers", help="Override the layer count."),
    shards: int = typer.Option(1, "--shards", help="Safetensors files (with an index when > 1)."),
    quantize_bits: Optional[int] = typer.Option(None, "--quantize-bits", help="4 or 8: quantize."),
):
    """Write a random-weight model of a real shape with a working tokenizer (offline)."""
    from pipeline.model.make_model import make_model

    try:
        path = make_model(like, out, dtype=dtype, seed=seed, num_layers=layers, shards=shards,
                          quantize_bits=quantize_bits)
    except ValueError as e:
        _fail(str(e))
    print(path)


@app.command("plan")
def plan_cmd(
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="Model folder (config.json alone is enough), .gguf file or "
        "Hugging Face repo. Default: embedded SmolLM2-135M-Instruct."),
    hostfile: Optional[str] = typer.Option(
        None, "--hostfile", help="OpenMPI hostfile; `# pipeline: mem=64G bw=273G` per line "
        "declares (without mpirun) or caps (under mpirun) each host's memory."),
    max_context: Optional[int] = typer.Option(
        None, "--max-context", help="Tokens of KV cache to reserve [default: the model's "
        "context length, else 8192]."),
    memory_fraction: float = typer.Option(
        0.8, "--memory-fraction", help="Share of each rank's memory the plan may use."),
    split: Optional[str] = typer.Option(
        None, "--split", help="Check these layers per rank instead of planning."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype", help="Cast floating weights (as the run would): float32, float16, "
        "bfloat16 or checkpoint [default: float32 on a measured CPU, else checkpoint]."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    tp: Optional[int] = TP,
    optimize: Optional[str] = typer.Option(
        None, "--optimize", help="chat (one sequence's speed) or throughput (many sequences) "
        "[default: print both plans]."),
    prompt_cache_bytes: Optional[str] = typer.Option(
        None, "--prompt-cache-bytes", help="The prompt cache's memory per rank, as serve's "
        "and batch's flag, counted in every plan (cut to what fits, with a note) "
        f"[default: {PROMPT_CACHE_BYTES.default} in the throughput plan, none in the chat plan]."),
):
    """Show how the layers would be placed (no weights loaded); under mpirun, measured."""
    from mpi4py import MPI

    from pipeline.commands.plan import run_plan

    if dtype is not None and dtype not in DTYPE_NAMES:
        _fail(f"--dtype {dtype} is not one of {', '.join(DTYPE_NAMES)}")
    cache_bytes = (None if prompt_cache_bytes is None
                   else _bytes(prompt_cache_bytes, "--prompt-cache-bytes"))
    raise typer.Exit(run_plan(model, hostfile, max_context, memory_fraction, as_json,
                              MPI.COMM_WORLD, dtype=dtype, split=split, tp=tp,
                              optimize=optimize, prompt_cache_bytes=cache_bytes))


@app.command("doctor")
def doctor_cmd(
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="Also check this model's files on every rank, and each "
        "rank's planned share of its weights against a Mac's GPU wired limit."),
    hostfile: Optional[str] = typer.Option(
        None, "--hostfile", help="The hostfile mpirun was given: the hosts each hop's route "
        "is checked to, and their `# pipeline: iface=bridge0`."),
):
    """Check every rank (under mpirun): versions, device, BLAS, memory, model files, links
    and the interface each one takes."""
    from mpi4py import MPI

    from pipeline.commands.doctor import run_doctor

    raise typer.Exit(run_doctor(model, MPI.COMM_WORLD, hostfile=hostfile))


def main_entry() -> None:
    _refuse_mlx_launch()
    try:
        app(prog_name="pipeline")
    except SystemExit as e:
        mpi.finish(e.code)  # returns unless MLX started MPI
        raise
    mpi.finish(0)


if __name__ == "__main__":
    main_entry()
