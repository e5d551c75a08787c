"""Helpers of the server tests: a live server over an artifact, slow backends, metric reads."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

from live_metrics import metric as metric  # the server tests import it from here

from kiln.runtime.server import LiveServer, ServerState
from kiln.runtime.server.serve import slots_loader


def running(artifact: Path, **kw) -> Iterator[LiveServer]:
    """Body of a server fixture: start a LiveServer, yield it, stop it."""
    srv = start_server(artifact, **kw)
    try:
        yield srv
    finally:
        srv.stop()


def start_server(
    artifact: Path,
    *,
    slots: int = 4,
    max_queue: int = 64,
    prefill_chunk: int = 8,
    loader: Callable | None = None,
    wait: bool = True,
) -> LiveServer:
    """A LiveServer over `artifact` (ONNX Runtime, 1 thread: the tests share 2 cores)."""
    load = loader or slots_loader(artifact, slots=slots, backend="auto", device="cpu", threads=1)
    state = ServerState(load, max_queue=max_queue, prefill_chunk=prefill_chunk)
    return LiveServer(state, drain_timeout_s=30).start(wait=wait)


class SlowSteps:
    """The real slot backend, each step held `delay_s` longer: a request that holds its slot long
    enough for a test to act while it runs (the tiny model decodes 250 tokens in ~0.1 s)."""

    def __init__(self, backend, delay_s: float) -> None:
        self._backend = backend
        self.delay_s = delay_s

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    def step(self, feeds):
        time.sleep(self.delay_s)
        return self._backend.step(feeds)


def slow_loader(artifact: Path, *, slots: int, delay_s: float = 0.01) -> Callable:
    """A loader whose backend is the real one wrapped in SlowSteps."""
    load = slots_loader(artifact, slots=slots, backend="auto", device="cpu", threads=1)

    def slow():
        gen = load()
        gen.backend = SlowSteps(gen.backend, delay_s)
        return gen

    return slow
