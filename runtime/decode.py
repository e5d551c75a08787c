"""The decode loop, over slots, named after its phases: `prefill`, `decode_step`, `generate`.

Backend-agnostic: a `SlotBackend` (runtime/slots.py) runs the graph and owns the KV cache;
this module owns the per-sequence state (`Sequence`: tokens, sampler, text, stop rules) and
which sequence holds which slot (`SlotTable`). Each step feeds every busy slot its next
tokens, samples one token per slot that finished its prompt, emits an `Event`, frees a
finished sequence's slot and hands it to the next waiting prompt in the same step the others
decode. Slots are independent rows, so a sequence's tokens do not depend on what shares the
step with it.

`generate` is the whole loop for a list of prompts (the `Generator`); the server's scheduler
(runtime/server/scheduler.py) runs the same phases with its own queue, prompt chunks and
cancellation.

Letters in names: N slots fed this step, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import numpy as np

from kiln.errors import KilnError
from kiln.runtime.detokenize import IncrementalDetokenizer, StopStrings
from kiln.runtime.sampling import (
    SamplingParams,
    TokenConstraint,
    TokenLogprobs,
    adjust_logits,
    sample_next,
    sample_tempered,
    suppress,
    token_logprobs,
)
from kiln.runtime.slots import RewindableSlots, SlotBackend, SlotFeed

if TYPE_CHECKING:
    from kiln.runtime.prefix_cache import PrefixCache
    from kiln.runtime.speculate import Speculator

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Event:
    """One generated token of one sequence, with the text it completes (maybe '')."""

    index: int
    token_id: int
    text: str
    finish_reason: str | None
    logprobs: TokenLogprobs | None = None  # when the params ask for logprobs


@dataclass
class Sequence:
    """One prompt's generation: the state a slot carries while the sequence runs."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: tuple[int, ...] = ()
    tokenizer: Any = None
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS, stop token or string) or "length"
    constraint: TokenConstraint | None = None  # a grammar (runtime/structured.py)
    logprobs: TokenLogprobs | None = None  # the last chosen token's, when params.logprobs is set
    rng: np.random.Generator = field(init=False)
    stop_ids: set[int] = field(init=False)
    _detok: IncrementalDetokenizer | None = field(init=False, default=None)
    _stops: StopStrings = field(init=False)

    def __post_init__(self) -> None:
        """Seed the sampler and set up text streaming when there is a tokenizer."""
        self.rng = self.params.generator()
        self.stop_ids = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            self.stop_ids |= set(self.eos_ids)
        if self.tokenizer is not None:
            self._detok = IncrementalDetokenizer(self.tokenizer)
        self._stops = StopStrings(self.params.stop)

    @property
    def done(self) -> bool:
        """True once the sequence has a finish reason."""
        return self.finish_reason is not None

    @property
    def tokens(self) -> list[int]:
        """Prompt and generated ids: what a rebuilt cache is fed."""
        return [*self.prompt_ids, *self.out_ids]

    def choose(self, logits_V: np.ndarray) -> int:
        """Pick the next token (EOS suppressed until min_new_tokens, as transformers does).

        A constraint's mask comes first; it wins over min_new_tokens when only EOS may follow,
        and over a penalty that pushes every allowed token to -inf.
        """
        raw = logits_V
        if self.constraint is not None:
            logits_V = self.constraint.mask(logits_V)
        if len(self.out_ids) < self.params.min_new_tokens:
            kept = suppress(logits_V, self.stop_ids)
            logits_V = kept if self.constraint is None or np.isfinite(kept).any() else logits_V
        adjusted = adjust_logits(logits_V, self.params, self.prompt_ids, self.out_ids)
        if self.constraint is not None and not (adjusted > -np.inf).any():
            adjusted = logits_V  # a penalty overflowed every allowed token: the grammar wins
        token = sample_next(adjusted, self.params, self.rng)
        if self.params.logprobs is not None:
            self.logprobs = token_logprobs(raw, token, self.params.logprobs)
        return token

    def accept(self, token_id: int, room: int) -> str:
        """Record a token, update text and finish state; return the new text piece."""
        self.out_ids.append(token_id)
        piece = self._detok.push(token_id) if self._detok else ""
        complete = self.constraint is not None and self.constraint.accept(token_id)
        if token_id in self.stop_ids or complete:
            self.finish_reason = "stop"
        elif len(self.out_ids) >= min(self.params.max_new_tokens, room):
            self.finish_reason = "length"
        emitted, hit = self._stops.feed(piece)
        if hit:
            self.finish_reason = "stop"
        elif self.done:
            tail = self._detok.finish() if self._detok else ""
            more, hit = self._stops.feed(tail)
            emitted += more if hit else more + self._stops.flush()
            if hit:
                self.finish_reason = "stop"
        self.text += emitted
        return emitted


class SlotTable(Generic[T]):
    """Which slot holds what (a Sequence, or a server job); the lowest free slot goes first.

    Lowest first keeps the fed slot range short (a call binds the range it spans).
    """

    def __init__(self, backend: SlotBackend) -> None:
        self.backend = backend
        self.held: dict[int, T] = {}
        self._free = list(range(backend.slots))

    @property
    def free(self) -> int:
        """Slots that hold nothing."""
        return len(self._free)

    @property
    def free_slots(self) -> list[int]:
        """The free slots, lowest first."""
        return list(self._free)

    def take(self, item: T, slot: int | None = None) -> int:
        """Give `item` the lowest free slot (or the free `slot` given); return it."""
        slot = self._free.pop(0) if slot is None else self._free.pop(self._free.index(slot))
        self.held[slot] = item
        return slot

    def release(self, slot: int, *, keep: bool = False) -> T:
        """Free a slot (backend and table) and return what it held.

        keep: leave the backend's length, so its rows stay valid for prefix reuse
        (runtime/prefix_cache.py).
        """
        if not keep:
            self.backend.release(slot)
        item = self.held.pop(slot)
        self._free.append(slot)
        self._free.sort()
        return item


def prefill(
    table: SlotTable[Sequence], waiting: deque[Sequence], prefix_cache: PrefixCache | None = None
) -> list[SlotFeed]:
    """Give free slots to waiting sequences; each is fed its whole prompt (restart).

    With a prefix cache, a prompt that starts with a free slot's kept tokens continues there
    and is fed only the rest.
    """
    feeds = []
    while waiting and table.free:
        seq = waiting.popleft()
        if prefix_cache is None:
            feeds.append(SlotFeed(table.take(seq), seq.prompt_ids, restart=True))
        else:
            feed = prefix_cache.claim(seq.prompt_ids, table.free_slots)
            feeds.append(feed)
            table.take(seq, feed.slot)
    return feeds


# Fields that do not change which token a greedy row picks (they decide when it stops).
_NOT_CHOOSING = {"max_new_tokens", "min_new_tokens", "seed", "stop", "stop_token_ids", "ignore_eos"}


@functools.lru_cache(maxsize=4096)
def _choice_kind(p: SamplingParams) -> str:
    """'greedy' (the argmax), 'tempered' (a draw at a temperature, nothing else) or 'other'.

    Any sampling field at a value other than its default (a penalty, logprobs, or a field added
    to SamplingParams later) is 'other', so a shortcut never skips one. Params are frozen, so
    the answer is cached (a `replace` runs SamplingParams' checks: ~20 us a row a step).
    """
    defaults = type(p)()
    reset: dict[str, Any] = {name: getattr(defaults, name) for name in _NOT_CHOOSING}
    if p.greedy:
        plain = dataclasses.replace(p, **reset, temperature=0.0, top_k=0) == defaults
        return "greedy" if plain else "other"
    plain = dataclasses.replace(p, **reset, temperature=0.0) == defaults
    return "tempered" if plain else "other"


def _row_kind(seq: Sequence) -> str:
    """`_choice_kind` of the row's params this step.

    'other' under a grammar or before min_new_tokens, where `Sequence.choose` removes tokens.
    """
    if len(seq.out_ids) < seq.params.min_new_tokens or seq.constraint is not None:
        return "other"
    return _choice_kind(seq.params)


def plain_greedy(seq: Sequence) -> bool:
    """True when `seq.choose` is exactly the argmax of the raw logits this step."""
    return _row_kind(seq) == "greedy"


def choose_all(seqs: list[Sequence], logits_NV: np.ndarray) -> list[int]:
    """Each row's next token, the same as choosing row by row.

    Plain greedy rows take one argmax over the batch; rows that only set a temperature are
    divided together (runtime/sampling.py `sample_tempered`) and each draws with its own
    sampler; the rest go through `Sequence.choose`.
    """
    kinds = [_row_kind(seq) for seq in seqs]
    tokens: list[int | None] = [None] * len(seqs)
    greedy = [n for n, k in enumerate(kinds) if k == "greedy"]
    if greedy:
        for n, t in zip(greedy, np.argmax(logits_NV[greedy], axis=-1).tolist(), strict=True):
            tokens[n] = int(t)
    tempered = [n for n, k in enumerate(kinds) if k == "tempered"]
    if tempered:
        temps = [seqs[n].params.temperature for n in tempered]
        rngs = [seqs[n].rng for n in tempered]
        for n, t in zip(tempered, sample_tempered(logits_NV[tempered], temps, rngs), strict=True):
            tokens[n] = t  # None: the row's top overflowed, `choose` takes the exact path
    return [
        seq.choose(logits_NV[n]) if t is None else t
        for n, (seq, t) in enumerate(zip(seqs, tokens, strict=True))
    ]


def decode_step(
    backend: SlotBackend,
    slot: int,
    seq: Sequence,
    logits_V: np.ndarray,
    *,
    use_cache: bool = True,
    reprefill_at: int | None = None,
) -> tuple[Event, SlotFeed | None]:
    """Sample the slot's next token: its Event, and the feed that continues it (None: done)."""
    token = seq.choose(logits_V)
    return follow(backend, slot, seq, token, use_cache=use_cache, reprefill_at=reprefill_at)


def follow(
    backend: SlotBackend,
    slot: int,
    seq: Sequence,
    token: int,
    *,
    use_cache: bool = True,
    reprefill_at: int | None = None,
) -> tuple[Event, SlotFeed | None]:
    """Accept a chosen token: its Event, and the feed that continues it (None: done).

    The next feed is the token just chosen, or the whole sequence (restart) without a cache
    (`use_cache=False`, the reference path) or when the slot reaches `reprefill_at`.
    """
    text = seq.accept(token, backend.max_context - len(seq.prompt_ids))
    event = Event(seq.index, token, text, seq.finish_reason, seq.logprobs)
    if seq.done:
        return event, None
    if not use_cache or backend.length(slot) == reprefill_at:
        return event, SlotFeed(slot, seq.tokens, restart=True)
    return event, SlotFeed(slot, [token])


def generate(
    backend: SlotBackend,
    rows: list[Sequence],
    *,
    use_cache: bool = True,
    reprefill_at: int | None = None,
    speculator: Speculator | None = None,
    prefix_cache: PrefixCache | None = None,
) -> Iterator[list[Event]]:
    """Run every row to completion over the backend's slots; yield each step's events.

    use_cache=False refeeds each sequence whole at every step (restart): the reference path.
    reprefill_at: the position at which a sequence's cache is rebuilt from all its tokens once
    (longrope's switch to its long factors, as transformers' Phi-3 generate() does).
    speculator: draft tokens and verify them in the same pass (runtime/speculate.py); a step
    may then yield several events per sequence.
    prefix_cache: keep finished sequences' rows for prompts that start with their tokens
    (runtime/prefix_cache.py); it outlives this call (the next call's prompts can hit).
    """
    for seq in rows:
        check_fits(seq, backend.max_context)
    if (speculator or prefix_cache) and (not use_cache or reprefill_at is not None):
        raise KilnError(
            "Speculative decoding and prefix reuse need the cache kept as fed; they cannot "
            "run with use_cache=False or a cache rebuild (longrope's reprefill_at). Turn "
            "them off for this artifact."
        )
    waiting = deque(rows)
    table: SlotTable[Sequence] = SlotTable(backend)
    feeds: list[SlotFeed] = []
    steps = 0
    while True:
        fed = feeds + prefill(table, waiting, prefix_cache)
        events, feeds = [], []
        if speculator is not None:
            rewind = cast("RewindableSlots", backend)
            fed, tails = speculator.draft(rewind, fed, table.held)
            outs = rewind.step_tails(fed, tails)
            steps += 1
            for feed, logits_SV in zip(fed, outs, strict=True):
                new, feed_next = speculator.verify(rewind, feed, table.held[feed.slot], logits_SV)
                events += new
                _finish(table, feed.slot, feed_next, feeds, prefix_cache)
        else:
            logits_NV = backend.step(fed)
            steps += 1
            tokens = choose_all([table.held[f.slot] for f in fed], logits_NV)
            for feed, token in zip(fed, tokens, strict=True):
                event, feed_next = follow(
                    backend,
                    feed.slot,
                    table.held[feed.slot],
                    token,
                    use_cache=use_cache,
                    reprefill_at=reprefill_at,
                )
                events.append(event)
                _finish(table, feed.slot, feed_next, feeds, prefix_cache)
        yield events
        if not table.held and not waiting:
            return
        if steps % 32 == 0:
            log.debug("step %d: %d slots busy, %d waiting", steps, len(table.held), len(waiting))


def _finish(
    table: SlotTable[Sequence],
    slot: int,
    feed_next: SlotFeed | None,
    feeds: list[SlotFeed],
    prefix_cache: PrefixCache | None,
) -> None:
    """Queue the slot's next feed, or free it (kept for prefix reuse when there is a cache)."""
    if feed_next is not None:
        feeds.append(feed_next)
    elif prefix_cache is None:
        table.release(slot)
    else:
        prefix_cache.keep(slot, table.held[slot].tokens)
        table.release(slot, keep=True)


def check_fits(seq: Sequence, max_context: int) -> None:
    """Refuse an empty prompt or one that leaves no room for a new token."""
    n = len(seq.prompt_ids)
    if n == 0:
        raise KilnError(
            "Empty prompt: there is nothing to continue. Give a non-empty prompt "
            "(a tokenizer with a BOS token adds it to any text)."
        )
    if n >= max_context:
        raise KilnError(
            f"Prompt of {n} tokens does not fit this artifact's max context of {max_context} "
            "tokens (prompt plus at least one new token); shorten the prompt or export/build "
            "with a longer context."
        )
