"""Speculative decoding over slots: draft k tokens, verify them in one pass, keep what matches.

Each step, a decoding slot is fed its last token followed by up to k drafted tokens, and the
target model's logits come back at every one of those positions (`step_tails`). The tokens are
then chosen one position at a time exactly as plain decoding chooses them (`Sequence.choose`,
same sampler, same random draws in the same order); while the chosen token equals the draft,
the next position's logits are already computed and the loop goes on. At the first mismatch
the chosen token is kept (it is what plain decoding would have picked there) and the slot is
truncated over the rejected drafts: attention masks every position past a slot's length
(export/static_kv.py), so the stale rows cost nothing and are overwritten later.

Why this is exact: drafts here are deterministic proposals (a lookup in the context, or a draft
model's argmax), so the standard rejection rule (accept draft d with probability
min(1, p(d)/q(d)) with q a point mass) becomes "draw from the target p and accept while the draw
equals the draft". Greedy output is the target's argmax sequence, and seeded sampling draws the
same tokens as plain sampling with the same seed (up to the float rounding of a wider call).

Drafters: `NgramDrafter` (prompt lookup: the tokens that followed the latest earlier occurrence
of the context's last n-gram; free) and `DraftModelDrafter` (a smaller artifact with the same
tokenizer, run over its own slots; k cheap passes per verify pass).

Letters in names: S positions of one feed, V vocab.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np

from kiln.errors import KilnError
from kiln.runtime.decode import Event, Sequence
from kiln.runtime.slots import RewindableSlots, SlotFeed

if TYPE_CHECKING:
    from kiln.runtime.generator import Generator


class Drafter(Protocol):
    """Proposes up to k next tokens for some slots' sequences."""

    name: str

    def propose(
        self, contexts: Mapping[int, list[int]], k: Mapping[int, int]
    ) -> dict[int, list[int]]:
        """Drafts for each slot, at most `k[slot]` tokens after `contexts[slot]` (maybe none)."""
        ...


def ngram_draft(tokens: Seq[int], k: int, *, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n-gram.

    Tries n = max_n down to min_n and takes the first n that matches (prompt lookup decoding,
    as transformers' `prompt_lookup_num_tokens` and vLLM's n-gram proposer do). The latest
    occurrence with k tokens after it wins; without one, the earliest (the longest draft): in a
    repeating run the latest occurrence ends one token before the end and would draft 1.
    """
    if k <= 0:
        return []
    arr = np.asarray(tokens, np.int64)
    for n in range(min(max_n, len(arr) - 1), min_n - 1, -1):
        # windows starting at 0..len-n-1: every n-gram that has at least one token after it
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
        hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
        if hits.size:
            full = hits[hits + n + k <= len(arr)]
            start = int(full[-1] if full.size else hits[0]) + n
            return [int(t) for t in arr[start : start + k]]
    return []


@dataclass
class NgramDrafter:
    """Prompt-lookup drafting: no model, the context itself proposes the continuation."""

    max_n: int = 3
    min_n: int = 1
    name: str = "ngram"

    def propose(
        self, contexts: Mapping[int, list[int]], k: Mapping[int, int]
    ) -> dict[int, list[int]]:
        """The n-gram lookup for each slot."""
        return {
            s: ngram_draft(t, k[s], max_n=self.max_n, min_n=self.min_n) for s, t in contexts.items()
        }


class DraftModelDrafter:
    """A draft artifact over its own slots (same indices as the target's): greedy k tokens.

    The draft slot keeps the tokens whose K/V it holds; before drafting it is cut back to the
    longest prefix it shares with the sequence and fed the rest, so after a verify pass only
    the tokens that were not drafted (and a new prompt) are fed again.
    """

    def __init__(self, backend: RewindableSlots, name: str = "draft-model") -> None:
        self.backend = backend
        self.name = name
        self._held: list[list[int]] = [[] for _ in range(backend.slots)]
        self.passes = 0  # draft-model calls

    def propose(
        self, contexts: Mapping[int, list[int]], k: Mapping[int, int]
    ) -> dict[int, list[int]]:
        """Greedy drafts from the draft model, max(k) calls over every slot that drafts."""
        be = self.backend
        drafts: dict[int, list[int]] = {s: [] for s in contexts}
        feeds: list[SlotFeed] = []
        for s, tokens in contexts.items():
            room = be.max_context - len(tokens)
            if k[s] <= 0 or room < k[s]:
                continue
            held = self._held[s]
            keep = _common_prefix(held, tokens, be.length(s))
            keep = min(keep, len(tokens) - 1)  # feed at least one token to get its logits
            be.truncate(s, keep)
            self._held[s] = tokens[:keep]
            feeds.append(SlotFeed(s, tokens[keep:], restart=keep == 0))
        while feeds:
            logits_NV = be.step(feeds)
            self.passes += 1
            nxt = []
            for f, logits_V in zip(feeds, logits_NV, strict=True):
                self._held[f.slot] += list(f.tokens)
                drafts[f.slot].append(int(np.argmax(logits_V)))
                if len(drafts[f.slot]) < k[f.slot]:
                    nxt.append(SlotFeed(f.slot, [drafts[f.slot][-1]]))
            feeds = nxt
        return drafts


def _common_prefix(a: Seq[int], b: Seq[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    x, y = np.asarray(a[:n], np.int64), np.asarray(b[:n], np.int64)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


@dataclass
class SpecStats:
    """What speculation did: verify passes (one per decoding slot per step), drafts, tokens."""

    passes: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafted tokens over drafted tokens (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens a decoding slot gained per target pass (1.0 is plain decoding)."""
        return self.emitted / self.passes if self.passes else 0.0


class Speculator:
    """Adds drafts to a step's decode feeds and turns a verify pass into accepted tokens."""

    def __init__(self, drafter: Drafter, *, draft_tokens: int = 4) -> None:
        if draft_tokens < 1:
            raise KilnError(
                f"draft_tokens={draft_tokens}: speculation drafts at least 1 token per pass; "
                "give --draft-tokens 1 or more, or leave --speculate off."
            )
        self.drafter = drafter
        self.k = draft_tokens
        self.stats = SpecStats()

    def draft(
        self,
        backend: RewindableSlots,
        feeds: list[SlotFeed],
        held: Mapping[int, Sequence],
        decoding: set[int] | None = None,
    ) -> tuple[list[SlotFeed], list[int]]:
        """Each decode feed gets its drafts appended; the feeds and their tails.

        A tail is the number of positions whose logits are wanted: drafts + 1 for a decode
        feed, 1 for a prompt. `decoding`: the slots whose feed is a sequence's last token
        (default: every one-token feed that is not a restart; a caller that feeds prompts in
        chunks names them, since a one-token middle chunk is not one).
        """
        if decoding is None:
            decoding = {f.slot for f in feeds if not f.restart and len(f.tokens) == 1}
        contexts = {s: held[s].tokens for s in decoding}
        k = {s: min(self.k, _room(backend, held[s]) - 1) for s in decoding}
        drafts = self.drafter.propose(contexts, k) if contexts else {}
        out, tails = [], []
        for f in feeds:
            d = drafts.get(f.slot, [])[: k.get(f.slot, 0)]
            out.append(SlotFeed(f.slot, [*f.tokens, *d]) if d else f)
            tails.append(len(d) + 1 if f.slot in decoding else 1)
        return out, tails

    def verify(
        self, backend: RewindableSlots, feed: SlotFeed, seq: Sequence, logits_SV: np.ndarray
    ) -> tuple[list[Event], SlotFeed | None]:
        """Choose tokens along the fed drafts while they match; the events and the next feed.

        The slot is truncated over the rejected drafts; the next feed is the last chosen token
        (its drafts are added by the next `draft`).
        """
        drafts = list(feed.tokens[len(feed.tokens) - len(logits_SV) + 1 :])
        events = []
        for i, logits_V in enumerate(logits_SV):
            token = seq.choose(logits_V)
            text = seq.accept(token, backend.max_context - len(seq.prompt_ids))
            events.append(Event(seq.index, token, text, seq.finish_reason, seq.logprobs))
            if seq.done or i == len(drafts) or token != drafts[i]:
                break
        if len(logits_SV) > 1 or (not feed.restart and len(feed.tokens) == 1):
            st = self.stats
            st.passes += 1
            st.drafted += len(drafts)
            st.accepted += sum(e.token_id == d for e, d in zip(events, drafts, strict=False))
            st.emitted += len(events)
        unused = len(logits_SV) - len(events)
        if unused:
            backend.truncate(feed.slot, backend.length(feed.slot) - unused)
        if seq.done:
            return events, None
        return events, SlotFeed(feed.slot, [events[-1].token_id])


def _room(backend: RewindableSlots, seq: Sequence) -> int:
    """Tokens the sequence may still emit (its max_new_tokens and the slot's context)."""
    limit = min(seq.params.max_new_tokens, backend.max_context - len(seq.prompt_ids))
    return limit - len(seq.out_ids)


def load_speculator(
    target: Generator, spec: str, *, draft_tokens: int = 4, **load_options: Any
) -> Speculator:
    """`ngram`, or a draft artifact folder loaded with the target's slot count (`load` options).

    The draft must share the target's vocabulary (the same tokenizer): its ids are fed to the
    target as they are.
    """
    from kiln.runtime.concat_slots import ConcatSlotBackend
    from kiln.runtime.generator import load

    if isinstance(target.backend, ConcatSlotBackend):
        raise _needs_static(target.info.path)
    if getattr(target.backend, "last_only", False):
        raise KilnError(
            f"{target.info.path} was loaded with logits at each row's last position only; "
            "a verify pass needs every position: load it with last_only=False."
        )
    if spec == "ngram":
        return Speculator(NgramDrafter(), draft_tokens=draft_tokens)
    if not Path(spec).is_dir():
        raise KilnError(
            f"--speculate {spec!r} is neither 'ngram' nor an artifact folder; give 'ngram' or "
            "the folder of a draft artifact made with the target's tokenizer."
        )
    draft = load(spec, slots=target.backend.slots, **load_options)
    if isinstance(draft.backend, ConcatSlotBackend):
        raise _needs_static(draft.info.path)
    probe = "The quick brown fox, 12 apples; naïve café."
    same_ids = (
        draft.tokenizer is None
        or target.tokenizer is None
        or draft.tokenizer.encode(probe) == target.tokenizer.encode(probe)
    )
    if draft.backend.vocab != target.backend.vocab or not same_ids:
        raise KilnError(
            f"Draft {draft.info.path} does not share the target's tokenizer (vocab "
            f"{draft.backend.vocab} vs {target.backend.vocab}); draft with an artifact of the "
            "same model family and tokenizer (e.g. an int4 `kiln optimize` of the target)."
        )
    drafter = DraftModelDrafter(cast(RewindableSlots, draft.backend), name=str(draft.info.path))
    return Speculator(drafter, draft_tokens=draft_tokens)


def _needs_static(path: Path) -> KilnError:
    return KilnError(
        f"{path} is a concat-KV artifact; speculative decoding rewinds slots, which needs a "
        "static one: re-export with `kiln export MODEL --kv static --max-context N`."
    )
