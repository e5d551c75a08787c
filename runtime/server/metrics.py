"""Prometheus metrics of one server: requests, latency, tokens, queue and batch.

Each server gets its own registry (not prometheus_client's global one), so several servers in
one process (the tests) never collide. Names follow Prometheus conventions (units in the name,
`_total` counters); the histograms' buckets span a tiny CPU model to a large GPU one.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The server's counters, gauges and histograms, registered in a private registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "kiln_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "kiln_time_to_first_token_seconds",
            "Request arrival to its first generated token",
            buckets=_LATENCY_S,
            registry=r,
        )
        self.token_latency = Histogram(
            "kiln_time_per_output_token_seconds",
            "Time between a stream's consecutive tokens",
            buckets=_LATENCY_S,
            registry=r,
        )
        self.step_time = Histogram(
            "kiln_step_seconds",
            "Duration of one graph call over the fed slots",
            buckets=_LATENCY_S,
            registry=r,
        )
        self.engine_seconds = Counter(
            "kiln_engine_seconds",
            "Engine-thread wall time by phase: plan, graph_prefill, graph_decode (inside ONNX "
            "Runtime or TensorRT), graph_host (feeds and logits around the calls), sample, "
            "accept (detokenize and stop rules), emit (hand-off to the event loop), idle",
            ["phase"],
            registry=r,
        )
        self.graph_calls = Counter(
            "kiln_graph_calls", "Graph calls by kind (prefill: width > 1)", ["kind"], registry=r
        )
        self.graph_positions = Counter(
            "kiln_graph_positions",
            "Positions computed by graph calls (rows x width, padding included), by kind",
            ["kind"],
            registry=r,
        )
        self.generated = Counter(
            "kiln_generated_tokens", "Tokens generated (all requests)", registry=r
        )
        self.prompt_tokens = Counter(
            "kiln_prompt_tokens", "Prompt tokens prefilled (all requests)", registry=r
        )
        self.queue_depth = Gauge("kiln_queue_depth", "Requests waiting for a free slot", registry=r)
        self.active = Gauge(
            "kiln_active_sequences",
            "Sequences holding a slot (prefilling or decoding)",
            registry=r,
        )
        self.batch_size = Histogram(
            "kiln_batch_size", "Slots fed per step", buckets=_BATCH, registry=r
        )
        self.finished = Counter(
            "kiln_sequences_finished",
            "Sequences ended, by reason (stop, length, cancelled, error)",
            ["reason"],
            registry=r,
        )
        # kiln serve --adaptive (runtime/server/adaptive.py)
        self.prefill_budget = Gauge(
            "kiln_prefill_budget_tokens",
            "Prompt tokens fed per step beside decoding streams, as adaptive last set it",
            registry=r,
        )
        self.active_cap = Gauge(
            "kiln_active_slot_cap", "Slots adaptive lets hold a sequence at once", registry=r
        )
        self.adaptive_decisions = Counter(
            "kiln_adaptive_decisions",
            "Adaptive decisions by rule (slow_first_tokens, fast_first_tokens, keep)",
            ["reason"],
            registry=r,
        )
        # kiln serve --prefix-cache (runtime/prefix_cache.py)
        self.prefix_lookups = Counter(
            "kiln_prefix_lookups", "Prompts placed in a slot by the prefix cache", registry=r
        )
        self.prefix_hits = Counter(
            "kiln_prefix_hits", "Prompts that continued in a slot holding their start", registry=r
        )
        self.prefix_tokens_saved = Counter(
            "kiln_prefix_tokens_saved", "Prompt tokens not prefilled thanks to reuse", registry=r
        )
        # kiln serve --speculate (runtime/speculate.py); acceptance rate: accepted / drafted
        self.spec_passes = Counter(
            "kiln_spec_verify_passes", "Verify passes (one per decoding slot per step)", registry=r
        )
        self.spec_drafted = Counter("kiln_spec_drafted_tokens", "Tokens drafted", registry=r)
        self.spec_accepted = Counter(
            "kiln_spec_accepted_tokens", "Drafted tokens the target accepted", registry=r
        )

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)
