"""Fixtures of the server tests: static exports and one live server per test module."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from server_helpers import running

from kiln.runtime.server import LiveServer


@pytest.fixture(scope="module")
def zen_static(exported: Callable[..., Path]) -> Path:
    """The bundled model with static KV (384-position slots)."""
    return exported("zen", "fp32", kv="static")


@pytest.fixture(scope="module")
def tiny_static(exported: Callable[..., Path]) -> Path:
    """The tiny Llama with static KV (vocab 300, no tokenizer: id prompts)."""
    return exported("llama", "fp32", kv="static")


@pytest.fixture(scope="module")
def zen_server(zen_static: Path) -> Iterator[LiveServer]:
    """The bundled model, 4 slots, prompt budget 8 tokens per step while streams decode."""
    yield from running(zen_static)
