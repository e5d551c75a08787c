"""Run the app under uvicorn with a graceful shutdown; `LiveServer` runs one in a thread.

On SIGTERM/SIGINT the server first drains: new requests get 503 while the running ones finish
(up to `drain_timeout_s`), then uvicorn closes. A second signal exits at once.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from kiln.errors import ArtifactError
from kiln.runtime.server.app import ServerState, create_app

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal drains the scheduler before closing."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self._drain: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: drain in a thread, then exit; a second one: exit now."""
        if self._drain is not None:
            super().handle_exit(sig, frame)
            return
        log.info("signal %s: draining (new requests get 503)", sig)
        self.state.draining = True  # before this returns: the next request already gets 503
        self._drain = threading.Thread(target=self._drain_then_exit, name="kiln-drain")
        self._drain.start()

    def _drain_then_exit(self) -> None:
        self.state.drain(self.drain_timeout_s)
        self.should_exit = True


def slots_loader(
    artifact: Path,
    *,
    slots: int,
    backend: str,
    device: str,
    threads: int,
    spin: bool = False,
    last_only: bool = True,
) -> Callable[[], Any]:
    """A loader for ServerState: the static-KV artifact as a Generator over `slots` slots.

    `spin` (ONNX Runtime's intra-op threads spinning between ops): `kiln serve` turns it on
    (a quiet 2-core host served 8-20% more tokens/s with it, runtime/server/README.md); off
    here for callers that share cores (Ray replicas, tests). `last_only=False` keeps logits at
    every position, which speculation's verify pass needs (ServerState's `speculate`).
    """

    def load() -> Any:
        from kiln.runtime import load

        return load(
            artifact,
            slots=slots,
            backend=backend,
            device=device,
            threads=threads,
            spin=spin,
            last_only=last_only,
        )

    return load


def check_static(artifact: Path) -> None:
    """Refuse a concat-KV artifact up front: continuous batching needs the static slot layout."""
    from kiln.runtime.artifact import inspect_artifact

    info = inspect_artifact(artifact)
    if not info.layout.has_slots:
        raise ArtifactError(
            f"{artifact} has a {info.layout.name} KV cache; the server batches requests over "
            "static KV slots. Re-export with `kiln export MODEL --kv static --max-context N` "
            "(and optimize/build from that folder)."
        )


def serve(
    state: ServerState, *, host: str = "127.0.0.1", port: int = 8000, drain_timeout_s: float = 30
) -> None:
    """Serve until a signal; blocks. Raises ArtifactError when the model fails to load."""
    config = uvicorn.Config(
        create_app(state), host=host, port=port, log_level="info", timeout_graceful_shutdown=5
    )
    server = DrainingServer(config, state, drain_timeout_s)
    state.on_load_error = lambda: setattr(server, "should_exit", True)
    server.run()
    if state.load_error:
        raise ArtifactError(
            f"The server stopped: loading the artifact failed ({state.load_error})."
        )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """A server on 127.0.0.1 in a background thread (tests, `make load`)."""

    def __init__(self, state: ServerState, *, drain_timeout_s: float = 30) -> None:
        self.state = state
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(state), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = DrainingServer(config, state, drain_timeout_s)
        self._thread = threading.Thread(target=self.server.run, name="kiln-uvicorn", daemon=True)

    def start(self, timeout_s: float = 120, *, wait: bool = True) -> LiveServer:
        """Start and wait until the model is loaded and warmed up (or raise its load error)."""
        self._thread.start()
        if not wait:
            while not self.server.started:
                time.sleep(0.01)
            return self
        deadline = time.monotonic() + timeout_s
        while not self.state.ready.wait(0.05):
            if self.state.load_error:
                raise RuntimeError(f"server failed to load: {self.state.load_error}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready after {timeout_s} s")
        while not self.server.started:
            time.sleep(0.01)
        return self

    def shutdown(self) -> None:
        """Drain as on SIGTERM (new requests 503, running ones finish), then stop."""
        self.server.handle_exit(15, None)

    def join(self, timeout_s: float = 60) -> None:
        """Wait for the server thread to end."""
        self._thread.join(timeout_s)

    def stop(self) -> None:
        """Stop now (drain with no wait)."""
        self.server.drain_timeout_s = 0
        self.shutdown()
        self.join()
