"""A concat-KV artifact run over slots: the adapter that gives a `Backend` the SlotBackend API.

The runtime's one decode loop (runtime/decode.py) runs over slots; the concat layout (past in,
past + new out) stays an export format for other consumers and reaches the loop only through
this adapter (runtime/README.md says why). Each slot holds its own past as the backend's
`KVCache`, and each fed slot runs as its own batch-1 call: no padding, no rows to drop when a
sequence finishes, and a sequence's tokens never depend on what shares the step with it.

Letters in names: S new tokens, T = P + S attention length, V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic

import numpy as np

from kiln.errors import KilnError
from kiln.runtime.backend import Backend, CacheT
from kiln.runtime.slots import SlotCall, SlotFeed, SlotRunner


class ConcatSlotBackend(SlotRunner, Generic[CacheT]):
    """`slots` sequences over one concat-KV `Backend`, one cache and one call per fed slot."""

    def __init__(self, concat: Backend[CacheT], *, slots: int = 4) -> None:
        super().__init__(slots=slots, max_context=concat.max_context, vocab=concat.vocab)
        self.concat = concat
        self.name = f"{concat.name}-concat"
        self._caches: list[CacheT | None] = [None] * slots

    def plan(self, feeds: Sequence[SlotFeed]) -> list[SlotCall]:
        """One batch-1 call per feed: each slot's past is its own cache."""
        return [SlotCall(f.slot, f.slot + 1, (f,), len(f.tokens)) for f in feeds]

    def release(self, slot: int) -> None:
        """Free a slot and drop its cache."""
        super().release(slot)
        self._caches[slot] = None

    def step_tails(self, feeds: Sequence[SlotFeed], tails: Sequence[int]) -> list[np.ndarray]:
        """The last token's logits, as `step`; more are refused (the adapter keeps only those)."""
        if any(t != 1 for t in tails):
            raise _needs_static("logits at several fed tokens (speculative decoding)")
        return super().step_tails(feeds, tails)

    def truncate(self, slot: int, length: int) -> None:
        """Refused: a concat cache is not cut back here."""
        raise _needs_static("shortening a slot (speculative decoding, prefix reuse)")

    def _execute(
        self, call: SlotCall, ids: np.ndarray, pos: np.ndarray, index: np.ndarray, pick: np.ndarray
    ) -> np.ndarray:
        """The slot's tokens over its cache (a new one on restart); logits_1V of the last."""
        cache = self._caches[call.lo]
        if call.feeds[0].restart or cache is None:
            cache = self._caches[call.lo] = self.concat.new_cache(1)
        assert cache.length == index[0], "slot length and cache length disagree"
        mask_1T = np.ones((1, cache.length + ids.shape[1]), np.int64)
        return self.concat.forward(ids, mask_1T, pos, cache)


def _needs_static(what: str) -> KilnError:
    return KilnError(
        f"A concat-KV artifact does not support {what}; re-export with "
        "`kiln export MODEL --kv static --max-context N`."
    )
