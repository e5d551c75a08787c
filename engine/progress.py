"""Progress of an engine build: TensorRT's IProgressMonitor, logged with the elapsed time.

Builds of real models take seconds to minutes with no output of their own. TensorRT calls the
monitor at each phase and step (tensorrt_rtx 1.7 has it; so does TensorRT >= 10); kiln logs
top-level phases as they start and finish, and at most one heartbeat line per `every_s` from
inside long phases. Libraries without the class get a plain heartbeat thread instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)


def progress_monitor(trt: Any, what: str, every_s: float = 5.0) -> Any | None:
    """An IProgressMonitor logging `what`'s phases, or None when the library has none."""
    if getattr(trt, "IProgressMonitor", None) is None:
        return None

    # tensorrt ships no type stubs: IProgressMonitor is Any to mypy ("subclassing Any").
    class _Monitor(trt.IProgressMonitor):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()  # pybind11 classes need their own __init__ run
            self.t0 = time.perf_counter()
            self.last = self.t0
            self.steps: dict[str, int] = {}
            self.top: set[str] = set()

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.steps[phase_name] = num_steps
            if parent_phase is None:
                self.top.add(phase_name)
                log.info("  %s: %s ... (%.1f s)", what, phase_name, self._elapsed())

        def step_complete(self, phase_name: str, step: int) -> bool:
            now = time.perf_counter()
            if now - self.last >= every_s:
                self.last = now
                total = self.steps.get(phase_name, 0)
                log.info(
                    "  %s: %s step %d/%d, %.0f s elapsed",
                    what,
                    phase_name,
                    step + 1,
                    total,
                    now - self.t0,
                )
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            self.steps.pop(phase_name, None)
            if phase_name in self.top:
                self.top.discard(phase_name)
                log.info("  %s: %s done (%.1f s)", what, phase_name, self._elapsed())

        def _elapsed(self) -> float:
            return time.perf_counter() - self.t0

    return _Monitor()


@contextmanager
def heartbeat(what: str, every_s: float = 5.0) -> Iterator[None]:
    """Log `what ... N s` every `every_s` seconds until the block ends (fallback monitor)."""
    stop = threading.Event()
    t0 = time.perf_counter()

    def beat() -> None:
        while not stop.wait(every_s):
            log.info("  %s: %.0f s elapsed", what, time.perf_counter() - t0)

    thread = threading.Thread(target=beat, name="kiln-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
