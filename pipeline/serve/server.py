"""`serve`: an OpenAI-compatible HTTP API and a chat page on rank 0; the other ranks serve layers.

    mpirun -np 2 python -m pipeline serve --host 127.0.0.1 --port 8080

Rank 0 runs two threads. The HTTP thread (uvicorn + starlette on its own asyncio loop, see
http.py) parses requests and puts them on the Inbox. The main thread owns MLX and MPI:
it waits for the Inbox, then runs Engine.run over it; the engine takes new requests whenever a
micro-batch has room (several in flight at once) and returns when nothing is left, and the
main thread waits again. Tokens go back to the HTTP thread with loop.call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from pathlib import Path

from pipeline.serve import api, render
from pipeline.serve.logprobs import TokenText
from pipeline.exec.engine import Engine, Sequence
from pipeline.exec.driver import Driver

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_CONCURRENCY = 8  # sequences generated at once
DEFAULT_MAX_QUEUE = 32  # requests waiting beyond those; more get 429
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
API_KEY_ENV = "PIPELINE_API_KEY"  # the --api-key default (an argument would show in `ps`)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # SIGUSR1: launch/mpirun's Ctrl-C


class Inbox:
    """Sequences waiting for the engine: put by the HTTP thread, taken by Engine.run.

    `next(inbox, None)` is None when nothing waits *now*; the engine carries on with what it
    has and asks again at its next step (so this iterator may yield again after stopping).
    """

    def __init__(self):
        self._items: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self.taken = 0  # sequences handed to the engine

    def put(self, seq: Sequence) -> None:
        with self._cond:
            self._items.append(seq)
            self._cond.notify()

    def __iter__(self):
        return self

    def __next__(self) -> Sequence:
        with self._cond:
            while self._items:
                seq = self._items.popleft()
                if not seq.cancelled:  # its client left while it waited
                    self.taken += 1
                    return seq
        raise StopIteration

    def wait(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: bool(self._items), timeout)

    def drain(self) -> list[Sequence]:
        with self._cond:
            items, self._items = list(self._items), deque()
        return items

    def __len__(self) -> int:
        return len(self._items)


class Server:
    """What the two threads share: settings, the inbox, counters and figures. Each counter is
    written by one thread only (most by the event loop, engine_* by the main thread), and
    `ranks` is replaced whole by the main thread."""

    def __init__(self, driver: Driver, model: str, concurrency: int, max_queue: int,
                 max_tokens: int):
        self.tokenizer = driver.tokenizer
        self.context = driver.context
        self.vocab = len(self.tokenizer.get_vocab())
        self.token_text = TokenText(self.tokenizer)  # logprobs' token texts
        self.model, self.created = model, render.now()
        self.noted: set[str] = set()  # log lines said once
        self.concurrency, self.max_queue, self.max_tokens = concurrency, max_queue, max_tokens
        self.inbox = Inbox()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closing = False
        self.active = 0  # requests accepted and not yet answered (running or queued)
        self.served = self.rejected = self.generated = 0
        self.engine_done = self.engine_tokens = 0  # main thread: sequences ended, tokens made
        self.passes = self.drafted = self.accepted = 0  # main thread: --concurrency 1 drafting
        self.last: dict | None = None
        self.prefixes = None  # the engine's prompt-cache index (exec/prefix.py), if on
        self.ranks: list[dict] = []
        self.ranks_at = 0.0
        self.started = time.time()

    # -- event loop side -------------------------------------------------------------------
    def admit(self) -> None:
        """Take a slot for a new request, or refuse it (429 when full, 503 when closing)."""
        if self.closing:
            raise api.ApiError(503, "the server is shutting down", kind="server_error")
        if self.active >= self.concurrency + self.max_queue:
            self.rejected += 1
            raise api.ApiError(
                429, f"the server is busy: {self.active} requests are running or queued "
                f"(--concurrency {self.concurrency} + --max-queue {self.max_queue}); retry later",
                code="queue_full", kind="rate_limit_error")
        self.active += 1

    def note(self, line: str) -> None:
        """Say `line` in the log the first time only (e.g. tools in the generic form)."""
        if line not in self.noted:
            self.noted.add(line)
            print(f"pipeline: {line}", file=sys.stderr, flush=True)

    def submit(self, job) -> None:
        self.inbox.put(job.seq)

    def record(self, job) -> None:
        seq, end = job.seq, time.perf_counter()
        self.served += 1
        self.generated += job.tokens
        first = seq.first_token or end
        decode_s = (seq.finished or end) - first
        self.last = {
            "prompt_tokens": len(seq.prompt), "cached_tokens": seq.cached_tokens,
            "completion_tokens": job.tokens,
            "finish_reason": job.finish_reason,
            "ttft_s": round(first - job.arrived, 4),
            "tokens_per_s": round((job.tokens - 1) / decode_s, 2) if decode_s > 0 else 0.0,
        }

    def stats(self) -> dict:
        return {
            "model": self.model, "context": self.context,
            "uptime_s": round(time.time() - self.started, 1),
            "limits": {"concurrency": self.concurrency, "max_queue": self.max_queue},
            "requests": {"active": self.active, "queued": len(self.inbox),
                         "running": self.inbox.taken - self.engine_done,
                         "served": self.served, "rejected": self.rejected},
            "tokens_generated": self.generated, "engine_tokens": self.engine_tokens,
            "speculative": {"passes": self.passes, "drafted": self.drafted,
                            "accepted": self.accepted},
            "prompt_cache": self.prefixes.stats() if self.prefixes is not None else None,
            "last_request": self.last,
            "ranks": self.ranks, "ranks_age_s": round(time.time() - self.ranks_at, 1),
        }

    # -- main thread side: the engine's callbacks ------------------------------------------
    def on_token(self, seq: Sequence, token: int) -> None:
        self.engine_tokens += 1
        logprobs = seq.token_logprobs[-1] if seq.logprobs is not None else None
        self.loop.call_soon_threadsafe(seq.extra["job"].token, token, logprobs)

    def on_done(self, seq: Sequence) -> None:
        self.engine_done += 1
        self.loop.call_soon_threadsafe(seq.extra["job"].done)

    def run_one_at_a_time(self, driver: Driver, engine: Engine, stopping: threading.Event
                          ) -> None:
        """--concurrency 1: each request as a one-shot chat through Driver.generate, which
        drafts (prompt lookup or --draft-model) and keeps the KV cache of the longest prompt
        prefix shared with the previous request (a chat resends its whole conversation).
        One that asks for logprobs or has a grammar goes through the engine, which computes
        the one and applies the other."""
        for seq in self.inbox:
            if seq.logprobs is not None or seq.constraint is not None:
                engine.run([seq], self.on_done, self.on_token)
                continue
            seq.started = time.perf_counter()
            driver.interrupted = False
            for token, _ in driver.generate(seq.prompt, seq.sampling):
                if token < 0:
                    continue
                now = time.perf_counter()
                seq.first_token = seq.first_token or now
                seq.tokens.append(token)
                seq.token_times.append(now)
                self.on_token(seq, token)
                if seq.cancelled or stopping.is_set():
                    driver.interrupted = True
            stats = driver.last_stats
            seq.cached_tokens = stats.cached_tokens  # the conversation's cache, kept from before
            seq.finish_reason = ("cancelled" if seq.cancelled else
                                 "interrupted" if stopping.is_set() else stats.finish_reason)
            self.passes += stats.passes
            self.drafted += stats.drafted
            self.accepted += stats.accepted
            seq.finished = time.perf_counter()
            self.on_done(seq)

    def refresh_ranks(self, driver: Driver) -> None:
        """Per-rank figures; only between engine runs (the other ranks answer when idle)."""
        self.ranks, self.ranks_at = driver.rank_stats(), time.time()


class HttpThread:
    """uvicorn in a daemon thread with its own event loop, on a socket bound beforehand."""

    def __init__(self, app, sock: socket.socket, server: Server, verbose: bool):
        import uvicorn

        config = uvicorn.Config(app, loop="asyncio", http="h11", lifespan="off",
                                log_level="info" if verbose else "warning", access_log=verbose,
                                timeout_graceful_shutdown=3)
        self.uvicorn, self.sock, self.server = uvicorn.Server(config), sock, server
        self.thread = threading.Thread(target=self._main, name="pipeline-http", daemon=True)

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self.server.loop = asyncio.get_running_loop()
        await self.uvicorn.serve(sockets=[self.sock])

    def start(self, timeout: float = 30) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.uvicorn.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)


def listen_socket(host: str, port: int) -> socket.socket:
    """Bind now, so a taken port is reported before anything else happens."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}: choose another "
                         f"--port (or --host)") from None
    return sock


def check_api_key(key: str | None) -> str | None:
    """The key requests must carry (None: no key); a ValueError for one that cannot work."""
    if key is None and os.environ.get(API_KEY_ENV) == "":  # click takes an empty one as unset
        raise ValueError(f"{API_KEY_ENV} is set but empty: give it a key, or unset it")
    if key is None:
        return None
    if not key:
        raise ValueError("--api-key is empty: give a key (or leave the option out)")
    if not all("!" <= c <= "~" for c in key):  # it travels in an HTTP header, after "Bearer "
        raise ValueError("the API key must be printable ASCII without spaces")
    return key


def model_name(spec: str | None) -> str:
    if spec is None:
        return DEFAULT_MODEL_NAME
    path = Path(spec).expanduser()
    if path.exists():
        return path.stem if path.suffix.lower() == ".gguf" else path.resolve().name
    return spec  # a Hugging Face repo id


def _url(sock: socket.socket) -> tuple[str, bool]:
    host, port = sock.getsockname()[:2]
    ip = ipaddress.ip_address(host.split("%")[0])
    shown = f"[{host}]" if ip.version == 6 else host
    return f"http://{shown}:{port}", ip.is_loopback


def run_serve(driver: Driver, sock: socket.socket, model: str, concurrency: int, max_queue: int,
              max_tokens: int, verbose: bool = False, api_key: str | None = None,
              prompt_cache_bytes: int = 0) -> None:
    """Serve until SIGINT/SIGTERM (or launch/mpirun's SIGUSR1); then every rank ends cleanly.
    With `api_key`, every request but the page's files and /health needs it; with
    `prompt_cache_bytes`, the engine keeps a prompt cache of that size (exec/prefix.py)."""
    from pipeline.serve.http import make_app

    server = Server(driver, model, concurrency, max_queue, max_tokens)
    engine = Engine(driver, concurrency, prompt_cache_bytes=prompt_cache_bytes)
    server.prefixes = engine.prefixes
    http = HttpThread(make_app(server, api_key), sock, server, verbose)
    server.refresh_ranks(driver)
    stop = threading.Event()

    def on_signal(*_):
        stop.set()
        engine.interrupted = True  # sequences in flight end at their next step

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    http.start()
    url, loopback = _url(sock)
    keyed = ", API key required" if api_key else ""
    print(f"pipeline: serving {model} at {url}/ (chat page) and {url}/v1 (OpenAI API{keyed}); "
          f"Ctrl-C stops", flush=True)
    if not loopback and not api_key:
        print(f"pipeline: warning: listening on {url}, reachable from other machines, with no "
              f"API key: anyone who reaches it can use it; set {API_KEY_ENV} (or --api-key)",
              file=sys.stderr, flush=True)
    try:
        while not stop.is_set():
            if not http.alive():
                raise RuntimeError("the HTTP server thread stopped")
            if server.inbox.wait(0.2) and not stop.is_set():
                if concurrency == 1 and driver.drafting is not None:
                    server.run_one_at_a_time(driver, engine, stop)
                else:
                    engine.run(server.inbox, server.on_done, server.on_token)
                server.refresh_ranks(driver)
    finally:
        server.closing = True
        for seq in server.inbox.drain():  # never started: answer them now
            seq.finish_reason = "interrupted"
            server.loop.call_soon_threadsafe(seq.extra["job"].done)
        http.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("pipeline: server stopped", file=sys.stderr, flush=True)
