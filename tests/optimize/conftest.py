"""Fixtures of the optimize tests: one cache of optimized artifacts for the whole session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

_MADE: dict[tuple, Path] = {}


@pytest.fixture(scope="session")
def optimized(
    exported: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Path]:
    """Factory: optimize(name, precision, passes, source) of a model's export, made once."""
    from kiln.optimize import optimize_model

    def get(
        name: str,
        precision: str = "fp16",
        passes: tuple[str, ...] | None = None,
        source: str = "fp32",
    ) -> Path:
        key = (name, precision, passes, source)
        if key not in _MADE:
            out = tmp_path_factory.mktemp(f"opt-{name}-{precision}") / "optimized"
            _MADE[key] = optimize_model(
                exported(name, source),
                out,
                precision=precision,
                passes=list(passes) if passes else None,
                check_torch=name != "zen",  # the bundled model is checked by its text
            )
        return _MADE[key]

    return get
