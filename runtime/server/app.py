"""The FastAPI app: OpenAI routes, health, metrics, and the bridge from engine thread to asyncio.

The model loads in a background thread after the HTTP server starts, so `/health` can say
"loading" (503) until the artifact is loaded and a warm-up step has run, then "ok" (200). Each
request becomes a scheduler `Job` whose `emit` hands pieces to the request's asyncio queue via
`loop.call_soon_threadsafe`; a client that goes away cancels its job, which frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.errors import KilnError, RequestError
from kiln.runtime.decode import Event, Sequence
from kiln.runtime.prefix_cache import PrefixCache
from kiln.runtime.server.metrics import Metrics
from kiln.runtime.server.prepare import ModelView, Prepared, prepare_chat, prepare_completion
from kiln.runtime.server.responses import SSE_DONE, Reply, error_body, error_kind, sse
from kiln.runtime.server.scheduler import Job, Scheduler
from kiln.runtime.server.schemas import ChatRequest, CompletionRequest, parse_request
from kiln.runtime.speculate import load_speculator
from kiln.runtime.structured import grammars_for

log = logging.getLogger(__name__)

_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
_DISCONNECT_POLL_S = 0.5


class ServerState:
    """The served model, its scheduler and metrics, and whether the server takes requests."""

    def __init__(
        self,
        loader: Callable[[], Any],
        *,
        model_name: str | None = None,
        max_queue: int = 64,
        prefill_chunk: int = 64,
        prefill_stall_s: float | None = None,
        ttft_target_s: float | None = None,
        prefix_cache: bool = False,
        speculate: str | None = None,
        draft_tokens: int = 4,
    ) -> None:
        self.loader = loader
        self.model_name = model_name
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.prefill_stall_s = prefill_stall_s  # runtime/server/scheduler.py prefill_budget
        self.ttft_target_s = ttft_target_s  # not None: adaptive (runtime/server/adaptive.py)
        self.prefix_cache = prefix_cache  # runtime/prefix_cache.py
        self.speculate = speculate  # "ngram" (runtime/speculate.py); the loader keeps all logits
        self.draft_tokens = draft_tokens
        self.metrics = Metrics()
        self.scheduler: Scheduler | None = None
        self.model: ModelView | None = None
        self.ready = threading.Event()
        self.draining = False
        self.load_error: str | None = None
        self.on_load_error: Callable[[], None] | None = None  # `kiln serve` exits

    def load(self) -> None:
        """Load the artifact, build the scheduler, warm up; then the server is ready."""
        t0 = time.perf_counter()
        try:
            gen = self.loader()
            backend = gen.backend
            self.model = ModelView(
                name=self.model_name or served_name(gen.info),
                max_context=backend.max_context,
                vocab=backend.vocab,
                eos_ids=tuple(gen.info.eos_ids),
                tokenizer=gen.tokenizer,
                grammars=grammars_for(gen.tokenizer, backend.vocab, tuple(gen.info.eos_ids)),
            )
            self.scheduler = Scheduler(
                backend,
                self.metrics,
                max_queue=self.max_queue,
                prefill_chunk=self.prefill_chunk,
                prefill_stall_s=self.prefill_stall_s,
                reprefill_at=gen.info.reprefill_at,
                ttft_target_s=self.ttft_target_s,
                prefix_cache=PrefixCache(backend) if self.prefix_cache else None,
                speculator=(
                    load_speculator(gen, self.speculate, draft_tokens=self.draft_tokens)
                    if self.speculate
                    else None
                ),
            )
            self.scheduler.start()
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}" if not isinstance(e, KilnError) else str(e)
            log.debug("loading the model failed", exc_info=True)
            if self.on_load_error is not None:
                self.on_load_error()
            return
        self.ready.set()
        log.info(
            "serving '%s' (%s, %d slots x %d positions) after %.1f s",
            self.model.name,
            backend.name,
            backend.slots,
            backend.max_context,
            time.perf_counter() - t0,
        )

    def drain(self, timeout_s: float) -> None:
        """Refuse new requests (503); wait up to `timeout_s` for running ones; stop the engine."""
        self.draining = True
        if self.scheduler is not None:
            if timeout_s > 0:
                log.info("draining: waiting up to %.0f s for running requests", timeout_s)
            self.scheduler.stop(timeout_s)

    def require_serving(self) -> tuple[Scheduler, ModelView]:
        """The scheduler and model, or a 503 RequestError while loading or shutting down."""
        if self.draining:
            raise RequestError(
                "The server is shutting down and takes no new requests; retry against another "
                "replica or after it restarts.",
                status=503,
                code="shutting_down",
            )
        if not self.ready.is_set() or self.scheduler is None or self.model is None:
            why = f"failed to load: {self.load_error}" if self.load_error else "is still loading"
            raise RequestError(
                f"The model {why}; poll GET /health until it answers 200, then retry.",
                status=503,
                code="not_ready",
            )
        return self.scheduler, self.model


def served_name(info: Any) -> str:
    """The model name clients use: the exported model folder's name, else the artifact's."""
    src = info.manifest.source.get("path")  # an engine's source names its ONNX folder instead
    return str(src).rstrip("/").rsplit("/", 1)[-1] if src else info.path.name


def create_app(state: ServerState) -> FastAPI:
    """The app over one ServerState; the model loads in a thread when the app starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=state.load, name="kiln-load", daemon=True).start()
        yield
        state.drain(0.0)

    app = FastAPI(title="kiln", lifespan=lifespan)
    app.state.kiln = state
    app.add_middleware(_CountRequests, metrics=state.metrics)
    _add_error_handlers(app)

    @app.get("/health")
    def health() -> JSONResponse:
        if state.load_error:
            return JSONResponse({"status": "error", "message": state.load_error}, 500)
        if state.draining:
            return JSONResponse({"status": "draining"}, 503)
        if not state.ready.is_set() or state.model is None or state.scheduler is None:
            return JSONResponse({"status": "loading"}, 503)
        b = state.scheduler.backend
        return JSONResponse(
            {"status": "ok", "model": state.model.name, "slots": b.slots, "backend": b.name}
        )

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        _, model = state.require_serving()
        card = {"id": model.name, "object": "model", "created": 0, "owned_by": "kiln"}
        return {"object": "list", "data": [{**card, "max_model_len": model.max_context}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        scheduler, model = state.require_serving()
        req = parse_request(await request.body(), CompletionRequest)
        return await _respond(request, scheduler, model, prepare_completion(req, model), False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        scheduler, model = state.require_serving()
        req = parse_request(await request.body(), ChatRequest)
        return await _respond(request, scheduler, model, prepare_chat(req, model), True)

    return app


async def _respond(
    request: Request, scheduler: Scheduler, model: ModelView, prep: Prepared, chat: bool
) -> Response:
    """Submit the request's n choices as n jobs (429/503 come back before any byte), answer.

    The n choices share the prompt but not a prefill: each job takes its own slot and the
    scheduler admits them together, so their prompts go into the same graph call (one prefill
    call, n rows). Choice i samples with SamplingParams.for_choice(i) (seed + i).
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event | BaseException] = asyncio.Queue()

    def emit(item: Event | BaseException) -> None:  # engine thread
        # RuntimeError: the event loop is gone (shutdown), nobody is listening.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(queue.put_nowait, item)

    jobs = []
    for i in range(prep.n):
        constraint = None
        if prep.grammar is not None and model.grammars is not None:
            constraint = model.grammars.constraint(prep.grammar)
        seq = Sequence(
            i,
            prep.prompt_ids,
            prep.params.for_choice(i),
            model.eos_ids,
            model.tokenizer,
            constraint=constraint,
        )
        jobs.append(Job(seq, emit))
    scheduler.submit(*jobs)
    reply = Reply(model.name, chat, len(prep.prompt_ids), model.tokenizer)
    if prep.stream:
        body = _stream(scheduler, jobs, queue, reply, prep.include_usage)
        # The background task runs after the response, also when the client left before the
        # stream started (then the generator never ran and its finally cannot cancel the jobs).
        after = BackgroundTask(_cancel_unless_done, scheduler, jobs)
        return StreamingResponse(body, media_type="text/event-stream", background=after)
    choices: list[list[Event]] = [[] for _ in jobs]
    async for event in _pieces(request, scheduler, jobs, queue):
        choices[event.index].append(event)
    return JSONResponse(reply.full(choices))


def _cancel_unless_done(scheduler: Scheduler, jobs: list[Job]) -> None:
    for job in jobs:
        if not job.seq.done:
            scheduler.cancel(job)


async def _pieces(
    request: Request | None,
    scheduler: Scheduler,
    jobs: list[Job],
    queue: asyncio.Queue[Event | BaseException],
) -> AsyncIterator[Event]:
    """The jobs' pieces until all finish; cancels the rest if the consumer stops early."""
    checked = time.monotonic()
    running = len(jobs)
    item: Event | BaseException | None
    try:
        while True:
            if request is None:
                item = await queue.get()
            else:  # a non-streamed request: look for a client that went away every 0.5 s
                try:
                    item = await asyncio.wait_for(queue.get(), _DISCONNECT_POLL_S)
                except TimeoutError:
                    item = None
                if time.monotonic() - checked >= _DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        log.info("client went away; cancelling its request")
                        return
            if item is None:  # no piece within the poll interval
                continue
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                running -= 1
                if not running:
                    return
    finally:
        _cancel_unless_done(scheduler, jobs)


async def _stream(
    scheduler: Scheduler,
    jobs: list[Job],
    queue: asyncio.Queue[Event | BaseException],
    reply: Reply,
    include_usage: bool,
) -> AsyncIterator[str]:
    """SSE events: one chunk per text piece, the finish reason, optional usage, `[DONE]`.

    Starlette cancels this generator when the client disconnects (ASGI spec 2.3 disconnect
    listener); `_pieces`' finally then cancels the jobs.
    """
    n = 0
    try:
        if reply.chat:
            for i in range(len(jobs)):
                yield reply.role_chunk(i)
        async for piece in _pieces(None, scheduler, jobs, queue):
            n += 1  # one chunk per token, even with '' (a character not complete yet)
            yield reply.chunk(piece)
    except Exception as e:  # the headers are sent: report the error as an event, as OpenAI does
        status = (
            e.status if isinstance(e, RequestError) else 400 if isinstance(e, KilnError) else 500
        )
        yield sse(error_body(str(e), kind=error_kind(status)))
    finally:  # cancelled while suspended at a yield (client gone): free the slots now
        _cancel_unless_done(scheduler, jobs)
    if include_usage:
        yield reply.usage_chunk(n)
    yield SSE_DONE


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(KilnError)
    async def kiln_error(request: Request, e: KilnError) -> JSONResponse:
        status, param, code = 400, None, None
        if isinstance(e, RequestError):
            status, param, code = e.status, e.param, e.code
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        body = error_body(str(e), kind=error_kind(status), param=param, code=code)
        return JSONResponse(body, status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        hint = f"; the routes are {', '.join(_ENDPOINTS)}" if e.status_code in (404, 405) else ""
        body = error_body(
            f"{e.detail}: {request.method} {request.url.path}{hint}.",
            kind=error_kind(e.status_code),
        )
        return JSONResponse(body, e.status_code)

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        body = error_body(
            f"Internal server error ({type(e).__name__}: {e}); this is a bug in kiln.",
            kind="server_error",
        )
        return JSONResponse(body, 500)


class _CountRequests:
    """ASGI middleware: count each response by endpoint and status code."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in _ENDPOINTS else "other"

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
