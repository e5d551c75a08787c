"""`kiln serve --adaptive`: prefill chunk and active slots chosen from the load, one pure function.

`decide(state, current, policy)` reads what the scheduler observed (queue depth, busy slots,
recent time to first token) and returns the settings for the next steps with the reason in
words. It holds no state and touches nothing, so the scheduler stays the only owner of its
loop and every decision is a unit-testable line for logs and metrics.

Rules (a band of `hysteresis` around the target keeps it from flapping):
- TTFT above target with requests queued: prompts wait too long for a slot or for their
  chunks. Admit more (active slots x2, up to the physical slots) and feed more prompt per
  step (chunk x2, up to `max_chunk`).
- TTFT below target with nothing queued: the streams already decoding pay for every prompt
  token fed beside them. Halve the chunk (down to `min_chunk`); active slots stay (a lower
  cap would only make the next burst queue).
- Otherwise: keep.
Neither setting changes what a request computes: the chunk only splits a prompt's prefill
over steps and the cap only delays admission (runtime/server/scheduler.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LoadState:
    """What the scheduler observed since the last decision."""

    queue_depth: int
    busy_slots: int
    ttft_s: Sequence[float]  # times to first token of the requests that got one lately


@dataclass(frozen=True)
class Settings:
    """The two knobs: prompt tokens fed per step beside decoding streams, slots admitted."""

    prefill_chunk: int
    active_slots: int


@dataclass(frozen=True)
class Policy:
    """Targets and bounds (`kiln serve --ttft-target`, the backend's slots and context)."""

    ttft_target_s: float
    slots: int
    max_chunk: int
    min_chunk: int = 16
    hysteresis: float = 0.2


@dataclass(frozen=True)
class Decision:
    """The settings to use next and why (the log line); `changed` when they differ."""

    settings: Settings
    changed: bool
    reason: str


def decide(state: LoadState, current: Settings, policy: Policy) -> Decision:
    """The settings for the next steps; see the module docstring for the rules."""
    if not state.ttft_s:
        return Decision(current, False, "no first token observed yet: keep")
    ttft = float(np.median(state.ttft_s))
    target = policy.ttft_target_s
    seen = f"TTFT p50 {ttft:.3f} s vs target {target:.3f} s, {state.queue_depth} queued"
    if ttft > target * (1 + policy.hysteresis) and state.queue_depth > 0:
        new = Settings(
            prefill_chunk=min(current.prefill_chunk * 2, policy.max_chunk),
            active_slots=min(current.active_slots * 2, policy.slots),
        )
    elif ttft < target * (1 - policy.hysteresis) and state.queue_depth == 0:
        new = Settings(max(current.prefill_chunk // 2, policy.min_chunk), current.active_slots)
    else:
        return Decision(current, False, f"{seen}: keep")
    if new == current:
        return Decision(current, False, f"{seen}: keep (at the bound)")
    return Decision(
        new,
        True,
        f"{seen}: prefill chunk {current.prefill_chunk} -> {new.prefill_chunk}, "
        f"active slots {current.active_slots} -> {new.active_slots}",
    )
