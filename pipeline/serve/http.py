"""The HTTP side of `serve` (rank 0, its own thread and asyncio loop): routes, streaming, limits.

Requests become engine Sequences put on the Inbox; the main thread runs them and hands each
token back with loop.call_soon_threadsafe (Job.token / Job.done), and this side reads them
(job.py: detokenize, cut at stop strings, split content, reasoning and tool calls) and writes
JSON or server-sent events (render.py). A request that ends early (a stop
string, a client that went away) sets `seq.cancelled`, and the engine drops it on every rank
at its next step. With serve --api-key, RequireKey answers 401 to any request without the key.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HttpRequest
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pipeline.serve import anthropic, api, render, responses
from pipeline.serve.job import Job

STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/", "/health")  # with a key, these and /static/ stay open (no secrets in them)
MAX_BODY_BYTES = 16 * 2**20  # a request body beyond this gets 413 (a 128k-token chat is ~1 MiB)


class JobStream(StreamingResponse):
    """Server-sent events whose slot is freed however the response ends (even a client gone
    before the first event)."""

    def __init__(self, job: Job, events):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.release()


@dataclass
class Dialect:
    """One API's words for the same engine path: its request parser (body, server -> Request),
    its whole answer (job, pieces, id, created, model -> dict), its stream (job, id, created,
    model -> server-sent events), its error shape (ApiError -> status, body) and ids."""
    parse: Callable
    whole: Callable
    events: Callable
    error: Callable
    new_id: Callable


def _openai(kind: str) -> Dialect:
    def parse(body, state):
        return api.parse(body, kind, state.tokenizer, state.context, state.max_tokens,
                         state.vocab)

    return Dialect(parse, lambda job, pieces, rid, created, model: _response(
        job, kind, rid, created, model, pieces), lambda job, rid, created, model: _events(
        job, kind, rid, created, model), lambda e: (e.status, e.body()),
        lambda: render.new_id(kind))


CHAT, COMPLETION = _openai("chat"), _openai("completion")
MESSAGES = Dialect(anthropic.parse, anthropic.whole, anthropic.events, anthropic.error,
                   anthropic.new_id)
RESPONSES = Dialect(responses.parse, responses.whole, responses.events,
                    lambda e: (e.status, e.body()), responses.new_id)


def _dialect(path: str) -> Dialect:
    """Whose error shape a path answers in."""
    return MESSAGES if path.startswith("/v1/messages") else CHAT


def _error(e: api.ApiError, dialect: Dialect = CHAT) -> JSONResponse:
    status, body = dialect.error(e)
    headers = {"Retry-After": "1"} if status in (429, 503, 529) else None
    if e.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(body, status_code=status, headers=headers)


class RequireKey:
    """ASGI middleware for serve --api-key: every route but the chat page, /static and /health
    needs `Authorization: Bearer KEY`, as OpenAI's API does, or `x-api-key: KEY`, as
    Anthropic's does; otherwise 401 with the API's error body."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not _open(scope["path"]):
            headers = Headers(scope=scope)
            problem = self.problem(headers.get("authorization"), headers.get("x-api-key"))
            if problem:
                await _error(api.ApiError(401, problem, code="invalid_api_key"),
                             _dialect(scope["path"]))(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def problem(self, header: str | None, x_api_key: str | None = None) -> str | None:
        """Why this Authorization (or x-api-key) header is refused (never echoing the key), or
        None."""
        if x_api_key and not header:
            header = "Bearer " + x_api_key
        if not header:
            return ("this server needs an API key: send the header 'Authorization: Bearer KEY' "
                    "(or 'x-api-key: KEY') with the key given to serve (--api-key or "
                    "PIPELINE_API_KEY)")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return "the Authorization header must be 'Bearer KEY'"
        # constant time: how long the comparison takes says nothing about the key
        if not hmac.compare_digest(token.strip().encode(), self.key):
            return "incorrect API key"
        return None


def _open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith("/static/")


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _body(request: HttpRequest) -> bytes:
    """The request body, read up to MAX_BODY_BYTES; beyond that a 413 before reading it all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise api.ApiError(413, f"the request body has {declared} bytes: at most "
                           f"{MAX_BODY_BYTES} are accepted", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise api.ApiError(413, f"the request body has more than {MAX_BODY_BYTES} bytes: at "
                               f"most {MAX_BODY_BYTES} are accepted", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _disconnected(request: HttpRequest) -> None:
    """Returns when the client goes away (the body has been read: nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def make_app(state, api_key: str | None = None) -> Starlette:
    """The ASGI app over `state` (a serve.Server: tokenizer, limits, inbox, figures); with
    `api_key`, requests need it as a Bearer token (see RequireKey)."""

    async def read(request: HttpRequest, dialect: Dialect):
        """The request's JSON body, or the error response to send."""
        try:
            return json.loads(await _body(request)), None
        except api.ApiError as e:
            return None, _error(e, dialect)
        except (ValueError, UnicodeDecodeError):
            return None, _error(api.ApiError(400, "the request body is not valid JSON"),
                                dialect)

    async def generate(request: HttpRequest, dialect: Dialect):
        body, refused = await read(request, dialect)
        if refused:
            return refused
        try:
            req = dialect.parse(body, state)
            state.admit()  # raises 429/503 when full or closing
        except api.ApiError as e:
            return _error(e, dialect)
        if req.chat is not None and req.chat.note:
            state.note(req.chat.note)
        job = Job(state, req)
        state.submit(job)
        rid, created = dialect.new_id(), render.now()
        if req.stream:
            return JobStream(job, dialect.events(job, rid, created, state.model))
        collect = asyncio.ensure_future(_collect(job))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():
                collect.cancel()
            job.release()
        if not collect.done() or collect.cancelled():
            return _error(api.ApiError(503, "the client went away"), dialect)  # nobody listens
        return JSONResponse(dialect.whole(job, collect.result(), rid, created, state.model))

    async def chat(request):
        return await generate(request, CHAT)

    async def completions(request):
        return await generate(request, COMPLETION)

    async def messages(request):
        return await generate(request, MESSAGES)

    async def responses_(request):
        return await generate(request, RESPONSES)

    async def count_tokens(request):
        body, refused = await read(request, MESSAGES)
        if refused:
            return refused
        try:
            return JSONResponse(anthropic.count_tokens(body, state))
        except api.ApiError as e:
            return _error(e, MESSAGES)

    async def models(_):
        return JSONResponse(render.models(state.model, state.created, state.context))

    async def health(_):
        if state.closing:
            return JSONResponse({"status": "closing"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def stats(_):
        return JSONResponse(state.stats())

    async def index(_):
        return FileResponse(STATIC / "index.html")

    async def http_error(request, exc: HTTPException):
        return _error(api.ApiError(exc.status_code, str(exc.detail),
                                   kind="not_found_error" if exc.status_code == 404
                                   else "invalid_request_error"), _dialect(request.url.path))

    routes = [
        Route("/", index),
        Route("/health", health),
        Route("/stats", stats),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
        Route("/v1/responses", responses_, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(RequireKey, key=api_key)] if api_key else []
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={HTTPException: http_error})


async def _collect(job: Job) -> list:
    return [piece async for piece in job.pieces()]


def _response(job: Job, kind: str, rid: str, created: int, model: str, pieces: list) -> dict:
    """A whole OpenAI chat completion or completion."""
    text = "".join(p.content for p in pieces)
    reasoning = "".join(p.reasoning for p in pieces)
    calls = [c for p in pieces for c in p.calls]
    errors = [e for p in pieces for e in p.errors]
    logprobs = [e for p in pieces for e in p.logprobs] if job.req.logprobs is not None else None
    return render.response(kind, rid, created, model, text, job.finish_reason, job.usage(),
                           reasoning, calls, logprobs, errors)


async def _events(job: Job, kind: str, rid: str, created: int, model: str):
    # The role event goes first, as OpenAI's does (before any token, even while queued).
    def event(delta=None, finish_reason=None, logprobs=None, errors=None):
        logprobs = logprobs if job.req.logprobs is not None else None
        return _sse(render.chunk(kind, rid, created, model, delta, finish_reason, logprobs,
                                 offset, errors))

    offset, held, calls = 0, [], 0  # held: logprobs of tokens whose text is not out yet
    if kind == "chat":
        yield event({"role": "assistant", "content": ""})
    async for piece in job.pieces():
        held.extend(piece.logprobs)
        if not piece.shown():
            continue
        delta = {k: v for k, v in (("reasoning_content", piece.reasoning),
                                   ("content", piece.content)) if v}
        if delta or piece.errors:
            yield event(delta, logprobs=held, errors=piece.errors)
            offset += len(piece.content)
            held = []
        for call in piece.calls:
            for d in render.call_deltas(call, calls):
                yield event(d, logprobs=held)
                held = []
            calls += 1
    yield event(finish_reason=job.finish_reason, logprobs=held)
    if job.req.include_usage:
        yield _sse(render.usage_chunk(kind, rid, created, model, job.usage()))
    yield "data: [DONE]\n\n"
