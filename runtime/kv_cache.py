"""The KV cache behind one small interface, so the decode loop never sees its layout.

The loop only asks a cache how many positions it holds and tells it which rows and columns to
keep; the backend that owns the cache feeds it to the graph and stores what comes back. The
concat layout here (past in, present = past + new out, as transformers' DynamicCache) is what
the export stage emits; a static in-place layout (preallocated `[slots, Hkv, max_context, D]`
buffers with a write position per slot) implements the same four members and needs no change
in runtime/decode.py.

Letters in names: B batch rows, Hkv KV heads, P cached positions, D head dim.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class KVCache(Protocol):
    """What the decode loop needs from a cache; backends own the tensors inside."""

    @property
    def length(self) -> int:
        """Positions held per row (P), padding included: the next attention mask starts here."""
        ...

    @property
    def capacity(self) -> int:
        """Most positions this cache can hold (the artifact's or engine profile's max context)."""
        ...

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Keep only these batch rows, in this order (finished rows stop costing work)."""
        ...

    def trim_left(self, n: int) -> None:
        """Drop the first `n` positions of every row (columns that are padding in all rows)."""
        ...


class ConcatKVCache:
    """Past keys/values as one array per layer and kind, `[B, Hkv, P, D]`, replaced every step.

    The arrays are whatever the backend feeds its graph (numpy, ONNX Runtime OrtValues, device
    buffers); `to_host` and `from_host` convert for the rare row/column edits.
    """

    def __init__(
        self,
        past: list[Any],
        *,
        capacity: int,
        to_host: Callable[[Any], np.ndarray] = np.asarray,
        from_host: Callable[[np.ndarray], Any] = lambda a: a,
    ) -> None:
        self.past = past
        self._capacity = capacity
        self._to_host = to_host
        self._from_host = from_host
        self._length = 0

    @property
    def length(self) -> int:
        """Positions held per row."""
        return self._length

    @property
    def capacity(self) -> int:
        """Most positions the graph accepts."""
        return self._capacity

    def append(self, present: list[Any], new: int) -> None:
        """Replace the past by the graph's present outputs (past + `new` positions)."""
        self.past = present
        self._length += new

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Select batch rows in every layer's K and V."""
        idx = np.asarray(rows, dtype=np.int64)
        self.past = [
            self._from_host(np.ascontiguousarray(self._to_host(a)[idx])) for a in self.past
        ]

    def trim_left(self, n: int) -> None:
        """Drop the oldest `n` positions (axis 2) in every layer's K and V."""
        if n <= 0:
            return
        self.past = [
            self._from_host(np.ascontiguousarray(self._to_host(a)[:, :, n:])) for a in self.past
        ]
        self._length -= n
