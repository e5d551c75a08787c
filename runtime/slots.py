"""The slot interface of a static-KV artifact: what continuous batching is built on.

A static-layout graph (`kiln export --kv static`) or engine holds preallocated KV buffers
`[slots, Hkv, max_context, D]`; each row is a slot with its own length. One `step` runs every
slot at once: a slot may be prefilling a new prompt (`restart=True`), decoding one token, or
idle. A finished sequence's slot is refilled by the next request while the others keep decoding.
The ONNX Runtime and TensorRT backends implement this; the `Generator` (static artifacts) and the
server's scheduler use nothing else.

Letters in names: N slots fed this step, V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class SlotFeed:
    """New tokens for one slot this step; `restart` starts a new sequence there (length 0)."""

    slot: int
    tokens: Sequence[int]
    restart: bool = False


class SlotBackend(Protocol):
    """A loaded static-KV graph or engine with `slots` independent rows."""

    name: str
    slots: int  # rows (sequences) held at once
    max_context: int  # positions per slot (prompt + generated)
    vocab: int

    def length(self, slot: int) -> int:
        """Positions this slot's sequence holds now (0 when free or just restarted)."""
        ...

    def step(self, feeds: Sequence[SlotFeed]) -> np.ndarray:
        """Run one graph call over all slots; return float32 logits_NV at each feed's last token.

        Slots not in `feeds` are left unchanged. Raises a KilnError naming the slot when a feed
        would pass max_context, and before touching any buffer.
        """
        ...

    def release(self, slot: int) -> None:
        """Mark a slot free (its buffers are overwritten by the next restart)."""
        ...
