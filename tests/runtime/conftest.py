"""Fixtures of the runtime tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from kiln.runtime import Generator, load


@pytest.fixture(scope="module")
def gen(exported: Callable[..., Path]) -> Generator:
    """The tiny Llama's export, loaded on ONNX Runtime (one per test module)."""
    return load(exported("llama"))
