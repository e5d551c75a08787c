"""Prefix reuse: a finished sequence's K/V stays in its slot until the slot is needed.

A static slot's rows depend only on the tokens before them, so a new prompt that starts with
the tokens a free slot still holds (a chat's next turn, a shared system prompt) can continue
there: the slot is cut back to the shared prefix (`truncate`; attention masks the rows past a
slot's length, export/static_kv.py) and only the rest of the prompt is fed. The index maps each
kept slot to its token ids; a prompt that matches none takes an empty slot first, then the
least recently kept one (LRU eviction). A prompt always feeds at least one token (its logits
pick the first new token).

The loop's side is two calls: `claim(prompt, free_slots) -> SlotFeed` when a prompt takes a slot,
and `keep(slot, tokens)` when a sequence finishes (instead of releasing the slot's length).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from kiln.runtime.slots import RewindableSlots, SlotFeed


@dataclass
class PrefixStats:
    """Lookups (prompts placed), hits (prompts that reused rows) and prompt tokens not fed."""

    lookups: int = 0
    hits: int = 0
    prompt_tokens: int = 0
    tokens_saved: int = 0

    @property
    def hit_rate(self) -> float:
        """Hits over lookups (0 before the first)."""
        return self.hits / self.lookups if self.lookups else 0.0


class PrefixCache:
    """Which free slots still hold a finished sequence's K/V, and for which token ids.

    min_match: the shortest shared prefix worth taking a kept slot for (a shorter one, such as
    a lone BOS token, leaves the slot to a better match and takes an empty or LRU slot).
    """

    def __init__(self, backend: RewindableSlots, *, min_match: int = 4) -> None:
        self.backend = backend
        self.min_match = max(1, min_match)
        self._kept: OrderedDict[int, list[int]] = OrderedDict()  # oldest first
        self.stats = PrefixStats()

    def kept(self) -> dict[int, list[int]]:
        """Slot -> the token ids whose K/V it holds (a copy, oldest first)."""
        return {s: list(t) for s, t in self._kept.items()}

    def keep(self, slot: int, tokens: Sequence[int]) -> None:
        """A sequence finished in `slot`: index the tokens its rows hold (its length's worth)."""
        n = self.backend.length(slot)
        self._kept.pop(slot, None)
        if n:
            self._kept[slot] = list(tokens[:n])

    def forget(self, slot: int) -> None:
        """Drop a slot from the index (it is about to be rewritten)."""
        self._kept.pop(slot, None)

    def claim(self, prompt: Sequence[int], free: Sequence[int]) -> SlotFeed:
        """The feed that places `prompt` in one of the `free` slots, reusing the longest prefix."""
        slot, n = self._best(prompt, free)
        self._kept.pop(slot, None)
        st = self.stats
        st.lookups += 1
        st.prompt_tokens += len(prompt)
        if n == 0:
            return SlotFeed(slot, list(prompt), restart=True)
        st.hits += 1
        st.tokens_saved += n
        self.backend.truncate(slot, n)
        return SlotFeed(slot, list(prompt[n:]))

    def _best(self, prompt: Sequence[int], free: Sequence[int]) -> tuple[int, int]:
        cap = len(prompt) - 1  # the last prompt token is always fed
        best, best_n = -1, 0
        for slot, tokens in self._kept.items():
            if slot not in free:
                continue
            n = _shared(tokens, prompt, cap)
            if n > best_n:
                best, best_n = slot, n
        if best_n >= self.min_match:
            return best, best_n
        empty = [s for s in free if s not in self._kept]
        if empty:
            return min(empty), 0
        lru = next(s for s in self._kept if s in free)
        return lru, 0


def _shared(a: Sequence[int], b: Sequence[int], cap: int) -> int:
    """Length of the common prefix of a and b, at most cap."""
    n = min(len(a), len(b), cap)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
