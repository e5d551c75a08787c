"""The slot interface of a static-KV artifact: what continuous batching is built on.

A static-layout graph (`kiln export --kv static`) or engine holds preallocated KV buffers
`[slots, Hkv, max_context, D]`; each row is a slot with its own length. One `step` runs every
slot at once: a slot may be prefilling a new prompt (`restart=True`), decoding one token, or
idle. A finished sequence's slot is refilled by the next request while the others keep decoding.
Every artifact runs through this interface: the `Generator` and the server's scheduler use
nothing else (a concat-KV artifact through runtime/concat_slots.py's adapter).

Every backend runs a step the same way (`SlotRunner.step`: `check_feeds`, `plan_calls`,
`call_inputs` below) and differs only in how one call runs (`SlotRunner._execute`).

Letters in names: N slots fed this step, R rows (slots) in one call, S new tokens, V vocab.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kiln.errors import KilnError

PAD_TOKEN = 0  # any valid id: padding is written past a slot's length and stays masked


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


class RewindableSlots(SlotBackend, Protocol):
    """A slot backend whose positions can be given back: what speculation and prefix reuse need.

    Attention masks every position at or past a slot's length (export/static_kv.py), so
    shortening a slot needs no buffer write: rows past the new length are ignored until
    overwritten. The static backends (SlotRunner) provide it.
    """

    def step_tails(self, feeds: Sequence[SlotFeed], tails: Sequence[int]) -> list[np.ndarray]:
        """`step`, returning float32 logits_SV at each feed's last `tails[i]` tokens (feed order).

        A verify pass over k drafted tokens asks for k + 1 rows; a prompt for 1.
        """
        ...

    def truncate(self, slot: int, length: int) -> None:
        """Keep the slot's first `length` positions (at most its length now); drop the rest."""
        ...


def check_feeds(
    feeds: Sequence[SlotFeed], lengths: Sequence[int], *, vocab: int, max_context: int
) -> None:
    """Raise a KilnError naming the slot and the fix before any buffer is touched."""
    slots = len(lengths)
    seen: set[int] = set()
    for f in feeds:
        if not 0 <= f.slot < slots:
            raise KilnError(
                f"Slot {f.slot} is out of range: this backend holds slots 0..{slots - 1}; "
                f"use a slot below {slots} or load with more slots."
            )
        if f.slot in seen:
            raise KilnError(
                f"Slot {f.slot} is fed twice in one step; merge its tokens into one SlotFeed."
            )
        seen.add(f.slot)
        if len(f.tokens) == 0:
            raise KilnError(
                f"Slot {f.slot} is fed no tokens; feed at least one token or leave the slot "
                "out of this step."
            )
        bad = [t for t in f.tokens if not 0 <= int(t) < vocab]
        if bad:
            raise KilnError(
                f"Slot {f.slot}: token id {bad[0]} is outside the vocabulary "
                f"(0..{vocab - 1}); encode the prompt with this artifact's tokenizer."
            )
        start = 0 if f.restart else lengths[f.slot]
        if start + len(f.tokens) > max_context:
            raise KilnError(
                f"Slot {f.slot} holds {start} positions; {len(f.tokens)} more would pass this "
                f"artifact's max context of {max_context}. Release or restart the slot, "
                "shorten the input, or re-export with a larger --max-context."
            )


@dataclass(frozen=True)
class SlotCall:
    """One graph or engine call: the slot range it binds and the feeds it carries."""

    lo: int
    hi: int
    feeds: tuple[SlotFeed, ...]
    width: int  # S


def plan_calls(
    feeds: Sequence[SlotFeed], lengths: Sequence[int], max_context: int
) -> list[SlotCall]:
    """Split a step: wide feeds (prefill) first, then one-token feeds (decode).

    A group runs as one call over the slot range it spans when every row in it fits the width
    and padding is at most half the work; otherwise one call per feed. Slots in the range that
    are not fed idle on one padding row written at their length (masked until overwritten).
    """
    wide = [f for f in feeds if len(f.tokens) > 1 or f.restart]
    narrow = [f for f in feeds if not (len(f.tokens) > 1 or f.restart)]
    now = list(lengths)
    calls: list[SlotCall] = []
    for group in (wide, narrow):
        if not group:
            continue
        lo, hi = min(f.slot for f in group), max(f.slot for f in group) + 1
        width = max(len(f.tokens) for f in group)
        fed = {f.slot: f for f in group}
        starts = [0 if s in fed and fed[s].restart else now[s] for s in range(lo, hi)]
        real = sum(len(f.tokens) for f in group)
        if all(s + width <= max_context for s in starts) and (hi - lo) * width <= 2 * real:
            calls.append(SlotCall(lo, hi, tuple(sorted(group, key=lambda f: f.slot)), width))
        else:
            calls += [SlotCall(f.slot, f.slot + 1, (f,), len(f.tokens)) for f in group]
        for f in group:
            now[f.slot] = (0 if f.restart else now[f.slot]) + len(f.tokens)
    return calls


def call_inputs(
    call: SlotCall, lengths: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ids_RS, positions_RS, write_index_R and each feed's (row, last token) index_N2.

    Rows are right-padded as export/check.py check_static_parity does: padding repeats the
    row's last real position (length-dependent RoPE reads the largest); idle rows write one
    padding token at their length.
    """
    rows, s = call.hi - call.lo, call.width
    ids = np.full((rows, s), PAD_TOKEN, np.int64)
    pos = np.empty((rows, s), np.int64)
    index = np.empty(rows, np.int64)
    pick = np.zeros((len(call.feeds), 2), np.int64)
    fed = {f.slot: (i, f) for i, f in enumerate(call.feeds)}
    for r, slot in enumerate(range(call.lo, call.hi)):
        if slot in fed:
            i, f = fed[slot]
            start, n = (0 if f.restart else lengths[slot]), len(f.tokens)
            ids[r, :n] = f.tokens
            pick[i] = (r, n - 1)
        else:
            start, n = lengths[slot], 1
        index[r] = start
        pos[r] = start + np.minimum(np.arange(s), n - 1)
    return ids, pos, index, pick


@dataclass(frozen=True)
class CallTime:
    """What one graph call of a step cost: its shape and its wall time (the server's metrics)."""

    rows: int  # R: slots the call binds
    width: int  # S: positions per row
    tokens: int  # real (fed) tokens; rows * width - tokens is padding
    seconds: float

    @property
    def kind(self) -> str:
        """'prefill' for a wide call (S > 1), 'decode' for a one-token call."""
        return "prefill" if self.width > 1 else "decode"


def advance(lengths: list[int], call: SlotCall) -> None:
    """Record the positions a finished call wrote into each fed slot."""
    for f in call.feeds:
        lengths[f.slot] = (0 if f.restart else lengths[f.slot]) + len(f.tokens)


class SlotRunner:
    """The SlotBackend step loop over an executor: lengths, validation, planning, logits order.

    Subclasses implement `_execute(call, ids, pos, index, pick) -> logits_NV` (float32, one
    row per feed of the call, in the call's feed order; arrays from `call_inputs`), may extend
    `check` with their own limits, and may split a step differently (`plan`).
    """

    name = "slots"

    def __init__(self, *, slots: int, max_context: int, vocab: int) -> None:
        if slots < 1:
            raise KilnError(f"slots={slots}: a slot backend needs at least 1 slot.")
        self.slots = slots
        self.max_context = max_context
        self.vocab = vocab
        self._lengths = [0] * slots
        self.last_calls: list[CallTime] = []  # the calls of the last step, in run order

    def length(self, slot: int) -> int:
        """Positions this slot's sequence holds now (0 when free or just restarted)."""
        if not 0 <= slot < self.slots:
            raise KilnError(
                f"Slot {slot} is out of range: this backend holds slots 0..{self.slots - 1}; "
                f"use a slot below {self.slots} or load with more slots."
            )
        return self._lengths[slot]

    def release(self, slot: int) -> None:
        """Mark a slot free; its rows are overwritten by the next sequence written there."""
        self.length(slot)  # range check
        self._lengths[slot] = 0

    def check(self, feeds: Sequence[SlotFeed]) -> None:
        """Refuse bad feeds before any buffer is touched (`check_feeds`)."""
        check_feeds(feeds, self._lengths, vocab=self.vocab, max_context=self.max_context)

    def plan(self, feeds: Sequence[SlotFeed]) -> list[SlotCall]:
        """This step's calls (`plan_calls`)."""
        return plan_calls(feeds, self._lengths, self.max_context)

    def truncate(self, slot: int, length: int) -> None:
        """Keep the slot's first `length` positions; later rows stay masked until overwritten."""
        if not 0 <= length <= self.length(slot):
            raise KilnError(
                f"Slot {slot} holds {self._lengths[slot]} positions; it cannot be truncated to "
                f"{length}. Give a length from 0 to {self._lengths[slot]}."
            )
        self._lengths[slot] = length

    def step(self, feeds: Sequence[SlotFeed]) -> np.ndarray:
        """Run the feeds (validated first, buffers untouched on error); logits_NV, feed order."""
        if not feeds:
            return np.empty((0, self.vocab), np.float32)
        return np.concatenate(self.step_tails(feeds, [1] * len(feeds)))

    def step_tails(self, feeds: Sequence[SlotFeed], tails: Sequence[int]) -> list[np.ndarray]:
        """`step` with logits_SV at each feed's last `tails[i]` tokens (a verify pass: k + 1)."""
        self.check(feeds)
        for f, t in zip(feeds, tails, strict=True):
            if not 1 <= t <= len(f.tokens):
                raise KilnError(
                    f"Slot {f.slot}: logits at the last {t} tokens were asked of a feed of "
                    f"{len(f.tokens)}; ask for 1 to {len(f.tokens)}."
                )
        out: list[np.ndarray] = [np.empty(0)] * len(feeds)
        order = {f.slot: n for n, f in enumerate(feeds)}
        self.last_calls = []
        for call in self.plan(feeds):
            ids, pos, index, pick = call_inputs(call, self._lengths)
            want = [tails[order[f.slot]] for f in call.feeds]
            if any(t > 1 for t in want):  # (row, last - t + 1 .. last) for each feed
                pick = np.array(
                    [
                        (r, j)
                        for (r, last), t in zip(pick, want, strict=True)
                        for j in range(last - t + 1, last + 1)
                    ],
                    np.int64,
                )
            t0 = time.perf_counter()
            logits = self._execute(call, ids, pos, index, pick)
            real = sum(len(f.tokens) for f in call.feeds)
            took = time.perf_counter() - t0
            self.last_calls.append(CallTime(call.hi - call.lo, call.width, real, took))
            at = 0
            for f, t in zip(call.feeds, want, strict=True):
                out[order[f.slot]] = logits[at : at + t]
                at += t
            advance(self._lengths, call)
        return out

    def _execute(
        self, call: SlotCall, ids: np.ndarray, pos: np.ndarray, index: np.ndarray, pick: np.ndarray
    ) -> np.ndarray:
        raise NotImplementedError
