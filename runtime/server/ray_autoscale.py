"""Autoscaling engine replicas on engine state, not on Ray's ongoing-request count.

Each replica reports free slots, queued jobs and its oldest job's wait (KilnEngine's
`record_autoscaling_stats`, averaged by Serve over `look_back_period_s`); the handles report
requests waiting in Serve's queues (`total_queued_requests`). Demand is the slots in use plus
everything waiting; the policy asks for enough replicas to keep slot use at `target_use`, and
for one more replica whenever the oldest wait passes `max_wait_s` (requests queue on a full
replica before the use average shows it). Serve applies min/max replicas and the up/down delays
(AutoscalingConfig) around it.
"""

from __future__ import annotations

import math
from typing import Any

POLICY_PATH = "kiln.runtime.server.ray_autoscale:SlotPressurePolicy"


def replicas_wanted(
    *,
    slots: int,
    replicas: int,
    free: float,
    queued: float,
    oldest_wait_s: float,
    target_use: float = 0.8,
    max_wait_s: float = 1.0,
) -> int:
    """Replicas for `replicas` x `slots` slots with `free` free and `queued` jobs waiting."""
    demand = slots * replicas - free + queued
    wanted = math.ceil(demand / (slots * target_use)) if demand > 0 else 0
    return max(wanted, replicas + 1) if oldest_wait_s > max_wait_s else wanted


class SlotPressurePolicy:
    """A Serve class-callable autoscaling policy (`policy_kwargs` go to the constructor)."""

    def __init__(self, target_use: float = 0.8, max_wait_s: float = 1.0) -> None:
        if not 0 < target_use <= 1:
            raise ValueError(f"target_use={target_use}: must be in (0, 1].")
        self.target_use = target_use
        self.max_wait_s = max_wait_s

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        """`ctx`: Serve's AutoscalingContext; returns (replicas, policy state)."""
        metrics = ctx.aggregated_metrics or {}
        slots = metrics.get("slots", {})
        if ctx.current_num_replicas == 0 or not slots:  # nothing reported yet
            return ctx.target_num_replicas, ctx.policy_state
        free = sum(metrics.get("free_slots", {}).values())
        queued = sum(metrics.get("queued", {}).values()) + float(ctx.total_queued_requests or 0)
        oldest = max(metrics.get("oldest_wait_s", {}).values(), default=0.0)
        wanted = replicas_wanted(
            slots=round(max(slots.values())),
            replicas=len(slots),
            free=free,
            queued=queued,
            oldest_wait_s=oldest,
            target_use=self.target_use,
            max_wait_s=self.max_wait_s,
        )
        return wanted, {**ctx.policy_state, "free_slots": free, "queued": queued}
