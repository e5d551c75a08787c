"""Prefix reuse gives a cold prefill's tokens while feeding only the new part of each prompt.

The reference is the same artifact loaded a second time without a prefix cache (every prompt
prefilled whole into a fresh slot); comparisons are token-exact. Negative control: an index
that claims more shared tokens than the slot holds must change the output.
"""

from __future__ import annotations

import numpy as np
import pytest

from kiln.runtime import Generator, load
from kiln.runtime.prefix_cache import PrefixCache
from kiln.runtime.speculate import NgramDrafter, Speculator


@pytest.fixture(scope="module")
def art(exported):
    return exported("llama", "fp32", kv="static")


def fresh(art, slots: int = 2, cache: bool = True) -> Generator:
    gen = load(art, slots=slots, tokenizer=False, last_only=False)
    if cache:
        gen.prefix_cache = PrefixCache(gen.backend)
    return gen


def chat(gen: Generator, turns: int, seed: int) -> list[list[int]]:
    """A multi-turn exchange: each prompt is the last prompt, its answer and a new message."""
    rng = np.random.default_rng(seed)
    history = [1, *(int(t) for t in rng.integers(3, 300, 12))]
    outs = []
    for _ in range(turns):
        c = gen.generate(history, max_new_tokens=8, ignore_eos=True)
        outs.append(c.token_ids)
        history = [*history, *c.token_ids, *(int(t) for t in rng.integers(3, 300, 5))]
    return outs


def test_multi_turn_chat_matches_a_cold_prefill(art):
    warm, cold = fresh(art), fresh(art, cache=False)
    for seed in range(3):
        assert chat(warm, 6, seed) == chat(cold, 6, seed)
    st = warm.prefix_cache.stats
    assert st.lookups == 18 and st.hits == 15  # every turn but each chat's first
    # turn t + 1 reuses turn t's prompt (13 t tokens) and answer but its last token (not fed)
    assert st.tokens_saved == 3 * sum(13 * t + 7 for t in range(1, 6))


def test_shared_system_prompt_and_lru_eviction(art):
    """Two slots: prompts sharing a prefix reuse it; a stranger evicts the oldest kept slot."""
    warm, cold = fresh(art), fresh(art, cache=False)
    system = [1, *range(100, 140)]
    a, b = [*system, 5, 6], [*system, 7, 8, 9]
    c, d = [1, *range(200, 230)], [1, *range(240, 260)]
    for prompt in (a, b, c, d, [*c, 3], [*b, 3]):
        assert (
            warm.generate(prompt, max_new_tokens=6).token_ids
            == cold.generate(prompt, max_new_tokens=6).token_ids
        )
    st = warm.prefix_cache.stats
    # a: slot 0; b: a's 41 system tokens; c: the empty slot 1; d: evicts b (least recent);
    # c + [3]: all of c; b + [3]: b was evicted, so it prefills cold.
    assert (st.lookups, st.hits, st.tokens_saved) == (6, 2, 41 + len(c))
    assert warm.prefix_cache.kept()[0][: len(b)] == b


def test_batches_share_kept_slots_and_speculation(art):
    """Several prompts at once over kept slots, with n-gram speculation on top."""
    warm, cold = fresh(art, slots=3), fresh(art, slots=3, cache=False)
    warm.speculator = Speculator(NgramDrafter(), draft_tokens=4)
    rng = np.random.default_rng(7)
    base = [[1, *(int(t) for t in rng.integers(3, 300, 20))] for _ in range(4)]
    for rnd in range(3):
        batch = [[*p, *range(10 + rnd, 14 + rnd)] for p in base]
        got = [x.token_ids for x in warm.generate(batch, max_new_tokens=10, ignore_eos=True)]
        want = [x.token_ids for x in cold.generate(batch, max_new_tokens=10, ignore_eos=True)]
        assert got == want
    assert warm.prefix_cache.stats.hits > 0


def test_min_match_keeps_a_slot_from_a_bos_only_match(art):
    warm = fresh(art, slots=2)
    warm.generate([1, *range(50, 60)], max_new_tokens=3)  # slot 0 kept
    warm.generate([1, *range(70, 80)], max_new_tokens=3)  # shares only BOS: takes empty slot 1
    assert sorted(warm.prefix_cache.kept()) == [0, 1]
    assert warm.prefix_cache.stats.hits == 0


def test_a_wrong_index_changes_the_output(art):
    """Negative control: reuse rows that hold other tokens than the index says."""
    warm, cold = fresh(art, slots=1), fresh(art, slots=1, cache=False)
    first = [1, *range(30, 60)]
    warm.generate(first, max_new_tokens=4)
    lie = [1, *range(130, 160)]
    warm.prefix_cache.keep(0, lie)  # claims slot 0 holds `lie`
    prompt = [*lie, 9, 9, 9]
    got = warm.generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids
    assert warm.prefix_cache.stats.hits == 1
    assert got != cold.generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids
