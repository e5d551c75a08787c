"""What a concat-KV backend gives runtime/concat_slots.py: a cache factory and one forward call.

Backends (ONNX Runtime, TensorRT) hide devices and tensor types; the adapter hands them host
numpy ids/mask/positions and gets back host float32 logits of the last position of each row.

Letters in names: B batch rows, S new tokens, T = P + S attention length, V vocab.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import numpy as np

from kiln.runtime.kv_cache import KVCache

# Each backend's own cache type: `forward` takes only caches its `new_cache` made.
CacheT = TypeVar("CacheT", bound=KVCache)


class Backend(Protocol[CacheT]):
    """One loaded concat-KV graph (or engine) ready to run prefill and decode calls."""

    name: str
    max_context: int  # positions (prompt + generated) the graph or engine profile accepts
    vocab: int

    def new_cache(self, batch: int) -> CacheT:
        """An empty cache for `batch` rows."""
        ...

    def forward(
        self, ids_BS: np.ndarray, mask_BT: np.ndarray, pos_BS: np.ndarray, cache: CacheT
    ) -> np.ndarray:
        """Run S new tokens per row over the cache, append their KV; return logits_BV (last S)."""
        ...
