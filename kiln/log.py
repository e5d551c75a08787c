"""Logging set-up and a timer for long work: one formatter, `-v`/`-q` from the CLI."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("kiln")


def setup_logging(verbosity: int = 0) -> None:
    """Route kiln's logs to stderr; verbosity -1 quiet, 0 info, 1+ debug."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[kiln] %(message)s"))
    root = logging.getLogger("kiln")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


@contextmanager
def timed(
    what: str, into: dict[str, float] | None = None, key: str | None = None
) -> Iterator[None]:
    """Log `what` on start and its elapsed time on finish; optionally record seconds in `into`."""
    log.info("%s ...", what)
    t0 = time.perf_counter()
    yield
    elapsed = time.perf_counter() - t0
    if into is not None:
        into[key or what] = round(elapsed, 3)
    log.info("%s done in %.1f s", what, elapsed)
