"""The concat-layout KV cache behind one small interface, so the adapter never sees its tensors.

The concat layout (past in, present = past + new out, as transformers' DynamicCache) is what
`kiln export` emits by default; runtime/concat_slots.py holds one such cache per slot and
asks it only how many positions it holds. The backend that owns the cache feeds it to the
graph and stores what comes back.

Letters in names: B batch rows, Hkv KV heads, P cached positions, D head dim.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class KVCache(Protocol):
    """What the adapter needs from a cache; backends own the tensors inside."""

    @property
    def length(self) -> int:
        """Positions held per row (P): the next attention mask starts here."""
        ...


class ConcatKVCache:
    """Past keys/values as one array per layer and kind, `[B, Hkv, P, D]`, replaced every step.

    The arrays are whatever the backend feeds its graph (numpy or ONNX Runtime OrtValues).
    """

    def __init__(self, past: list[Any]) -> None:
        self.past = past
        self._length = 0

    @property
    def length(self) -> int:
        """Positions held per row."""
        return self._length

    def append(self, present: list[Any], new: int) -> None:
        """Replace the past by the graph's present outputs (past + `new` positions)."""
        self.past = present
        self._length += new
