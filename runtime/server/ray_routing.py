"""Request routing between engine replicas: session affinity by header, power of two otherwise.

A request carrying `x-session-id` (the ingress passes it as the handle's session id) goes to the
replica a consistent-hash ring assigns to that session, so a conversation returns to the replica
that served its earlier turns; when that replica is full, Ray's ConsistentHashRouter falls back
to its ring successors. Without a session, two random replicas are probed and the one with the
shorter queue wins (Ray's power-of-two choices). Set through `RequestRouterConfig`
(runtime/server/ray_app.py).
"""

from __future__ import annotations

import random

from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter
from ray.serve.request_router import PendingRequest, RunningReplica


class SessionAffinityRouter(ConsistentHashRouter):
    """Consistent hash on the session id when there is one, power of two choices otherwise."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Ranks of candidates: the session's ring order, or one rank of two random replicas."""
        if pending_request is not None and pending_request.metadata.session_id:
            ranks: list[list[RunningReplica]] = await super().choose_replicas(
                candidate_replicas, pending_request
            )
            return ranks
        if len(candidate_replicas) <= 2:
            return [list(candidate_replicas)]
        # One rank of two: Serve probes both queue lengths and takes the shorter.
        return [random.sample(candidate_replicas, 2)]
