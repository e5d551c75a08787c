"""The decode loop, named after its phases: `prefill`, `decode_step`, `generate`.

Backend-agnostic: a `Backend` runs the graph and owns the KV cache; this module owns the
per-row state (`Sequence`: tokens, sampler, text, stop rules) and the batch bookkeeping
(`DecodeState`: left-padded attention mask, per-row positions). Rows finish on their own; a
finished row is dropped from the batch and the cache (`KVCache.keep_rows`), and columns that
became padding in every remaining row are dropped too (`KVCache.trim_left`).

Letters in names: B batch rows, S new tokens, T attention length, V vocab.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.runtime.backend import Backend
from kiln.runtime.detokenize import IncrementalDetokenizer, StopStrings
from kiln.runtime.kv_cache import KVCache
from kiln.runtime.sampling import SamplingParams, sample_next, suppress

log = logging.getLogger(__name__)


@dataclass
class Sequence:
    """One prompt's generation: the state a batch row (or a server slot) carries."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    eos_ids: tuple[int, ...] = ()
    tokenizer: Any = None
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS, stop token or string) or "length"
    rng: np.random.Generator = field(init=False)
    stop_ids: set[int] = field(init=False)
    _detok: IncrementalDetokenizer | None = field(init=False, default=None)
    _stops: StopStrings = field(init=False)

    def __post_init__(self) -> None:
        """Seed the sampler and set up text streaming when there is a tokenizer."""
        self.rng = np.random.default_rng(self.params.seed)
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

    def choose(self, logits_V: np.ndarray) -> int:
        """Pick the next token (EOS suppressed until min_new_tokens, as transformers does)."""
        if len(self.out_ids) < self.params.min_new_tokens:
            logits_V = suppress(logits_V, self.stop_ids)
        seen = [*self.prompt_ids, *self.out_ids] if self.params.repetition_penalty != 1 else ()
        return sample_next(logits_V, self.params, seen, self.rng)

    def accept(self, token_id: int, room: int) -> str:
        """Record a token, update text and finish state; return the new text piece."""
        self.out_ids.append(token_id)
        piece = self._detok.push(token_id) if self._detok else ""
        if token_id in self.stop_ids:
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


@dataclass(frozen=True)
class Event:
    """One generated token of one sequence, with the text it completes (maybe '')."""

    index: int
    token_id: int
    text: str
    finish_reason: str | None


@dataclass
class DecodeState:
    """The running batch: rows in cache order, their attention mask and next positions."""

    rows: list[Sequence]
    mask_BT: np.ndarray
    next_pos_B: np.ndarray
    cache: KVCache
    logits_BV: np.ndarray | None = None
    pad_id: int = 0
    steps: int = 0


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids_BS and mask_BS for ragged prompts."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = p
        mask[r, width - len(p) :] = 1
    return ids, mask


def positions(mask_BT: np.ndarray) -> np.ndarray:
    """Position of every column: count of real tokens before it; padding gets 1 as in HF."""
    pos = np.cumsum(mask_BT, axis=1) - 1
    return np.where(mask_BT == 0, 1, pos).astype(np.int64)


def prefill(backend: Backend, rows: list[Sequence], *, pad_id: int = 0) -> DecodeState:
    """Run every prompt at once (past length 0) and keep the last-position logits."""
    ids, mask = left_pad([r.prompt_ids for r in rows], pad_id)
    cache = backend.new_cache(len(rows))
    logits = backend.forward(ids, mask, positions(mask), cache)
    next_pos = mask.sum(axis=1).astype(np.int64)
    return DecodeState(rows, mask, next_pos, cache, logits, pad_id)


def decode_step(backend: Backend, state: DecodeState, last_B: np.ndarray) -> None:
    """Feed each row's last token at its own position; the cache grows by one column."""
    b = len(state.rows)
    state.mask_BT = np.concatenate([state.mask_BT, np.ones((b, 1), np.int64)], axis=1)
    pos = state.next_pos_B[:, None]
    state.logits_BV = backend.forward(last_B[:, None], state.mask_BT, pos, state.cache)
    state.next_pos_B = state.next_pos_B + 1
    state.steps += 1


def recompute_step(backend: Backend, state: DecodeState, last_B: np.ndarray) -> None:
    """A decode step without a cache: rerun every row's whole sequence (the reference path)."""
    b = len(state.rows)
    state.mask_BT = np.concatenate([state.mask_BT, np.ones((b, 1), np.int64)], axis=1)
    width = state.mask_BT.shape[1]
    ids = np.full((b, width), state.pad_id, dtype=np.int64)
    for r, seq in enumerate(state.rows):
        toks = [*seq.prompt_ids, *seq.out_ids]
        ids[r, width - len(toks) :] = toks
    state.cache = backend.new_cache(b)
    state.logits_BV = backend.forward(ids, state.mask_BT, positions(state.mask_BT), state.cache)
    state.next_pos_B = state.next_pos_B + 1
    state.steps += 1


def drop_finished(state: DecodeState) -> None:
    """Remove finished rows from the batch and the cache; trim all-padding columns."""
    keep = [r for r, seq in enumerate(state.rows) if not seq.done]
    if len(keep) == len(state.rows):
        return
    state.rows = [state.rows[r] for r in keep]
    if not keep:
        return
    state.cache.keep_rows(keep)
    state.mask_BT = state.mask_BT[keep]
    state.next_pos_B = state.next_pos_B[keep]
    pad_cols = int(np.argmax(state.mask_BT.any(axis=0)))  # leading columns padding in all rows
    if pad_cols and state.cache.length == state.mask_BT.shape[1]:
        state.cache.trim_left(pad_cols)
        state.mask_BT = state.mask_BT[:, pad_cols:]


def generate(
    backend: Backend,
    rows: list[Sequence],
    *,
    use_cache: bool = True,
    pad_id: int = 0,
    reprefill_at: int | None = None,
    keep_finished: bool = False,
) -> Iterator[list[Event]]:
    """Prefill, then decode until every row finishes; yield each step's events.

    keep_finished: finished rows stay in the batch (fed padding) instead of being dropped. NTK
    "dynamic" RoPE picks its frequencies from the longest row's position (in-graph, as
    transformers does), so dropping a finished row would change the others' tokens.

    reprefill_at: the position at which the cache is rebuilt from the whole sequence once
    (longrope's switch to its long factors, as transformers' Phi-3 generate() does).
    """
    for seq in rows:
        check_fits(seq, backend.max_context)
    if backend.max_batch is not None and len(rows) > backend.max_batch:
        raise KilnError(
            f"Batch of {len(rows)} prompts exceeds this engine's max batch {backend.max_batch}; "
            "split the prompts or rebuild the engine with a larger batch profile."
        )
    state = prefill(backend, rows, pad_id=pad_id)
    step = decode_step if use_cache else recompute_step
    while True:
        assert state.logits_BV is not None
        events, last = [], []
        for seq, logits_V in zip(state.rows, state.logits_BV, strict=True):
            if seq.done:  # only with keep_finished: the row idles on padding
                last.append(pad_id)
                continue
            tok = seq.choose(logits_V)
            piece = seq.accept(tok, backend.max_context - len(seq.prompt_ids))
            events.append(Event(seq.index, tok, piece, seq.finish_reason))
            last.append(tok)
        yield events
        if all(seq.done for seq in state.rows):
            return
        last_B = np.array(last, dtype=np.int64)
        if not keep_finished:
            last_B = last_B[[not seq.done for seq in state.rows]]
            drop_finished(state)
        if reprefill_at is not None and reprefill_at in state.next_pos_B:
            # A row reaches the switch: rebuild every row's cache (rows not at their switch get
            # the keys they already had, recomputed).
            log.debug("position %d: rebuilding the cache (longrope switch)", reprefill_at)
            recompute_step(backend, state, last_B)
        else:
            step(backend, state, last_B)
        if state.steps % 32 == 0:
            log.debug("decode step %d: %d rows active", state.steps, len(state.rows))


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
