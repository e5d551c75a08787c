"""The adaptive controller: its rules, bounds and hysteresis (state in, decision out)."""

from __future__ import annotations

from kiln.runtime.server.adaptive import LoadState, Policy, Settings, decide

POLICY = Policy(ttft_target_s=0.5, slots=8, max_chunk=256, min_chunk=16)
NOW = Settings(prefill_chunk=64, active_slots=2)


def test_slow_first_tokens_with_a_queue_admit_more_and_feed_more() -> None:
    d = decide(LoadState(queue_depth=5, busy_slots=2, ttft_s=[0.9, 1.1, 1.0]), NOW, POLICY)
    assert d.changed and d.settings == Settings(128, 4)
    assert "prefill chunk 64 -> 128" in d.reason and "active slots 2 -> 4" in d.reason


def test_fast_first_tokens_and_no_queue_shrink_the_chunk_only() -> None:
    d = decide(LoadState(queue_depth=0, busy_slots=2, ttft_s=[0.1, 0.2]), NOW, POLICY)
    assert d.changed and d.settings == Settings(32, 2)


def test_inside_the_band_or_slow_without_a_queue_keeps() -> None:
    """Negative controls: near the target, or slow with nobody waiting, nothing changes."""
    assert not decide(LoadState(3, 2, [0.55]), NOW, POLICY).changed
    assert not decide(LoadState(0, 2, [2.0]), NOW, POLICY).changed
    assert not decide(LoadState(3, 2, []), NOW, POLICY).changed


def test_bounds_hold() -> None:
    top = Settings(256, 8)
    assert decide(LoadState(9, 8, [3.0]), top, POLICY).settings == top
    low = Settings(16, 1)
    d = decide(LoadState(0, 1, [0.01]), low, POLICY)
    assert not d.changed and "at the bound" in d.reason


def test_same_state_same_decision() -> None:
    state = LoadState(4, 2, [0.7, 0.9, 0.8])
    assert decide(state, NOW, POLICY) == decide(state, NOW, POLICY)
