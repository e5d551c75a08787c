"""The Ray Serve ingress: forwards each HTTP request to an engine replica, retries, never truncates.

Serve's proxy hands the request to this deployment; it forwards method, path, headers and body
to an engine replica (runtime/server/ray_replica.py) through a streaming DeploymentHandle and
relays the answer. The API itself lives only in the replica's app (runtime/server/app.py); this
layer adds what a single process cannot need:

- A replica that dies before the response's first body byte reached the client (it was still
  queued, prefilling, or even answering a non-streamed request): the request goes to another
  replica, up to `attempts` times. `x-kiln-attempts` on the response says how many it took.
- A replica that dies after a stream started: the client gets an SSE error event
  (`code: replica_died`) and `data: [DONE]`, never a bare truncation. The stream does not
  resume on another replica: the client retries.
- More than `max_queued_requests` waiting at this ingress: 429 with Retry-After in the OpenAI
  error shape (Serve raises BackPressureError here, before anything is sent).
- An `x-session-id` header becomes the handle's session id: the router
  (runtime/server/ray_routing.py) sends a conversation back to the same replica.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

from kiln.runtime.server.responses import SSE_DONE, error_body, sse

log = logging.getLogger(__name__)

SESSION_HEADER = b"x-session-id"
ATTEMPTS_HEADER = "x-kiln-attempts"


def _replica_gone() -> tuple[type[BaseException], ...]:
    """The exceptions that mean the chosen replica died or went away (nothing else is retried)."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    return (RayActorError, ReplicaUnavailableError)


class KilnIngress:
    """The ingress deployment's user class (made a `serve.ingress` deployment in ray_app.py)."""

    def __init__(self, engine: Any, *, attempts: int = 3, retry_after_s: int = 1) -> None:
        self.engine = engine  # DeploymentHandle of the KilnEngine deployment
        self.attempts = attempts
        self.retry_after_s = retry_after_s

    def __serve_build_asgi_app__(self) -> _Forward:
        return _Forward(self)


class _Forward:
    """A raw ASGI app (no framework: bytes pass through untouched)."""

    def __init__(self, ingress: KilnIngress) -> None:
        self.ingress = ingress

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": f"{message['type']}.complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        await self._forward(scope, b"".join(chunks), send)

    async def _forward(self, scope: dict[str, Any], body: bytes, send: Any) -> None:
        from ray.serve.exceptions import BackPressureError

        ing = self.ingress
        headers = [(bytes(k), bytes(v)) for k, v in scope["headers"]]
        session = next((v.decode("latin-1") for k, v in headers if k.lower() == SESSION_HEADER), "")
        handle = (
            ing.engine.options(stream=True, session_id=session)
            if session
            else ing.engine.options(stream=True)
        )
        gone = _replica_gone()
        path, query = scope["path"], scope.get("query_string", b"")
        for attempt in range(1, ing.attempts + 1):
            gen = handle.http.remote(scope["method"], path, query, headers, body)
            try:
                start = await gen.__anext__()
                first = await _next_or_none(gen)  # hold the headers until a body byte exists
            except BackPressureError as e:
                msg = (
                    f"Server busy: {e.message} Retry after {ing.retry_after_s} s or lower "
                    "your concurrency."
                )
                await _send_error(send, 429, msg, "queue_full", ing.retry_after_s)
                return
            except gone as e:
                log.warning("replica gone before answering (attempt %d): %s", attempt, e)
                _cancel(gen)
                continue
            except BaseException:
                _cancel(gen)
                raise
            break
        else:
            msg = f"Every replica tried ({ing.attempts}) went away before answering; retry."
            await _send_error(send, 503, msg, "replica_died", ing.retry_after_s)
            return
        await self._relay(gen, start, first, attempt, send)

    async def _relay(
        self, gen: Any, start: Any, first: bytes | None, attempt: int, send: Any
    ) -> None:
        """Send the replica's answer on; a replica death mid-stream becomes an SSE error event."""
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in start["headers"]]
        raw.append((ATTEMPTS_HEADER.encode(), str(attempt).encode()))
        stream = any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in raw)
        try:
            await send({"type": "http.response.start", "status": start["status"], "headers": raw})
            if first is not None:
                await send({"type": "http.response.body", "body": first, "more_body": True})
                try:
                    async for chunk in gen:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except _replica_gone() as e:
                    log.warning("replica died mid-response: %s", e)
                    if stream:
                        msg = "The replica serving this stream died; retry the request."
                        tail = (
                            sse(error_body(msg, kind="server_error", code="replica_died"))
                            + SSE_DONE
                        )
                        await send(
                            {"type": "http.response.body", "body": tail.encode(), "more_body": True}
                        )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:  # the client left (send raised or Serve cancelled us): stop the replica's work
            _cancel(gen)


def _cancel(gen: Any) -> None:
    """Cancel a handle's response; one whose routing already failed re-raises that: ignore it."""
    with contextlib.suppress(Exception):
        gen.cancel()


async def _next_or_none(gen: Any) -> bytes | None:
    try:
        return bytes(await gen.__anext__())
    except StopAsyncIteration:
        return None


async def _send_error(send: Any, status: int, message: str, code: str, retry_after_s: int) -> None:
    kind = "rate_limit_exceeded" if status == 429 else "service_unavailable"
    payload = json.dumps(error_body(message, kind=kind, code=code)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"retry-after", str(retry_after_s).encode()),
        (b"content-length", str(len(payload)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})
