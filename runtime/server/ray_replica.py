"""One Ray Serve engine replica: the single-process server's FastAPI app, called in-process.

The replica loads the artifact once in its constructor (Serve marks it RUNNING only after that,
so no request reaches a loading replica), then answers `http(...)` calls from the ingress
(runtime/server/ray_ingress.py) by running the SAME app as `kiln serve` (runtime/server/app.py:
routes, schemas, SSE, metrics, errors) over an in-memory ASGI exchange, streaming the response
back as a start message and body chunks: each chunk is everything the app sent since the last
one, so a busy replica sends several tokens' SSE events per Ray item (each item crosses the
replica -> ingress -> proxy hops). Each response names its replica in `x-kiln-replica`.

The replica reports its engine state to Serve: `record_autoscaling_stats` (free slots, queue
depth, oldest queue wait) feeds the autoscaling policy of runtime/server/ray_autoscale.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.runtime.server.app import ServerState, create_app
from kiln.runtime.server.scheduler import PREFILL_STALL_S
from kiln.runtime.server.serve import slots_loader

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-kiln-replica"


@dataclass(frozen=True)
class EngineSpec:
    """What each replica serves and how (picklable: Serve ships it to every replica)."""

    artifact: str
    slots: int = 8
    prefill_chunk: int = 0  # 0: the budget from prefill_stall_s (kiln serve's defaults)
    model_name: str | None = None
    backend: str = "auto"
    device: str = "auto"
    threads: int = 0
    spin: bool = False
    prefill_stall_s: float | None = PREFILL_STALL_S  # scheduler.py prefill_budget
    queue: int = 2  # jobs the scheduler may hold beyond its slots (Serve queues the rest)
    ttft_target_s: float | None = None  # not None: adaptive (runtime/server/adaptive.py)
    prefix_cache: bool = False
    speculate: str | None = None  # "ngram"
    draft_tokens: int = 4


# Messages of `KilnEngine.http`: first a Start, then body chunks (bytes).
Start = dict[str, Any]  # {"status": int, "headers": [[name, value], ...]} (latin-1 strings)


class KilnEngine:
    """The engine replica's user class (`serve.deployment` options are set in ray_app.py)."""

    def __init__(self, spec: EngineSpec) -> None:
        from ray import serve

        t0 = time.perf_counter()
        self.spec = spec
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        loader = slots_loader(
            Path(spec.artifact),
            slots=spec.slots,
            backend=spec.backend,
            device=spec.device,
            threads=spec.threads,
            spin=spec.spin,
            last_only=spec.speculate is None,
        )
        self.state = ServerState(
            loader,
            model_name=spec.model_name,
            max_queue=spec.queue,
            prefill_chunk=spec.prefill_chunk,
            prefill_stall_s=spec.prefill_stall_s,
            ttft_target_s=spec.ttft_target_s,
            prefix_cache=spec.prefix_cache,
            speculate=spec.speculate,
            draft_tokens=spec.draft_tokens,
        )
        self.state.load()  # in the constructor: Serve routes nothing here until it returns
        if self.state.load_error:
            raise RuntimeError(
                f"kiln replica failed to load {spec.artifact}: {self.state.load_error}"
            )
        self.app = create_app(self.state)  # its lifespan (a second load) is never run here
        self.load_s = time.perf_counter() - t0
        log.info("replica %s loaded %s in %.2f s", self.replica_id, spec.artifact, self.load_s)

    async def http(
        self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> AsyncIterator[Start | bytes]:
        """Run one HTTP request through the app; yield its start message, then body chunks."""
        sent: asyncio.Queue[MutableMapping[str, Any] | None] = asyncio.Queue()
        gone = asyncio.Event()
        body_read = False

        async def receive() -> dict[str, Any]:
            nonlocal body_read
            if not body_read:
                body_read = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()  # the consumer stopped: tell the app its client left
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            await sent.put(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query,
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 0),
            "server": ("127.0.0.1", 0),
        }

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            finally:
                await sent.put(None)

        task = asyncio.create_task(run())
        try:
            ended = False
            while not ended:
                # Everything the app has sent since the last yield goes as one item: each item
                # crosses replica -> ingress -> proxy, so under load one carries several tokens'
                # events (one when idle: nothing here ever waits for more).
                ready = [await sent.get()]
                while not sent.empty():
                    ready.append(sent.get_nowait())
                chunk = bytearray()
                for message in ready:
                    if message is None:
                        ended = True
                    elif message["type"] == "http.response.start":
                        yield self._start(message)
                    elif message["type"] == "http.response.body":
                        chunk += message.get("body", b"")
                        ended = ended or not message.get("more_body", False)
                if chunk:
                    yield bytes(chunk)
            await task
        finally:  # the ingress cancelled (its client left) or the response ended
            gone.set()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _start(self, message: MutableMapping[str, Any]) -> Start:
        """The response's start message, latin-1 strings, with this replica's id added."""
        names = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]]
        names.append((REPLICA_HEADER, self.replica_id))
        return {"status": message["status"], "headers": names}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Engine state for the autoscaling policy (runtime/server/ray_autoscale.py)."""
        scheduler = self.state.scheduler
        if scheduler is None:
            return {}
        return {**scheduler.engine_load(), "slots": float(scheduler.backend.slots)}

    def check_health(self) -> None:
        """Serve restarts a replica whose health check raises: a dead engine thread fails it."""
        scheduler = self.state.scheduler
        if self.state.load_error or scheduler is None or not scheduler.engine_load()["running"]:
            raise RuntimeError(f"kiln replica {self.replica_id}: the engine thread is not running")

    def __del__(self) -> None:
        # Serve calls this after graceful_shutdown_timeout_s has let running requests finish.
        with contextlib.suppress(Exception):
            self.state.drain(0.0)
