"""kiln's OpenAI server as a Ray Serve application: an ingress and N engine replicas.

`build_app` wires the deployments: KilnIngress (runtime/server/ray_ingress.py: retries, SSE
error events, 429) in front of KilnEngine (runtime/server/ray_replica.py: one artifact load and
one continuous-batching scheduler per replica, running app.py's API). Engine options:

- `max_ongoing_requests` = slots + `EngineSpec.queue`: waiting requests stay in Serve's queue at
  the ingress, where they can still go to any replica (and to another one if theirs dies);
- `max_queued_requests` = `max_queue`: beyond it, the ingress answers 429 with Retry-After;
- the router of runtime/server/ray_routing.py (x-session-id affinity, power of two otherwise);
- fixed `replicas`, or `autoscale=(min, max)` with the policy of runtime/server/ray_autoscale.py;
- a label selector from engine.json (runtime/server/ray_placement.py);
- `graceful_shutdown_timeout_s` = `drain_timeout_s`: `serve shutdown` or SIGTERM lets running
  requests finish first.

`app_builder(args)` is the entry point of a Serve config file (`import_path:
kiln.runtime.server.ray_app:app_builder`); `serve_config` writes such a file; `run` is
`kiln serve ARTIFACT --ray`.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError
from kiln.runtime.server.ray_replica import EngineSpec

log = logging.getLogger(__name__)

APP_NAME = "kiln"
BUILDER_PATH = "kiln.runtime.server.ray_app:app_builder"


@dataclass(frozen=True)
class ScaleOptions:
    """How many replicas, how much queue, how long a drain."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max); replaces `replicas`
    max_queue: int = 64  # requests waiting at the ingress beyond every replica's slots: 429
    drain_timeout_s: float = 30.0
    engine_cpus: float = 1.0  # Ray CPUs per engine replica (its ONNX Runtime threads)
    engine_gpus: float = 0.0  # Ray GPUs per engine replica (1 for an engine or device=cuda)
    attempts: int = 3  # replicas tried for a request that has sent nothing yet
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 120.0


def build_app(spec: EngineSpec, scale: ScaleOptions) -> Any:
    """The Serve Application (`serve.run(build_app(...))`)."""
    from ray import serve
    from ray.serve.config import (
        AutoscalingConfig,
        AutoscalingPolicy,
        BackpressureConfig,
        RequestRouterConfig,
    )

    from kiln.runtime.server.ray_autoscale import POLICY_PATH
    from kiln.runtime.server.ray_ingress import KilnIngress
    from kiln.runtime.server.ray_placement import artifact_label_selector
    from kiln.runtime.server.ray_replica import KilnEngine
    from kiln.runtime.server.ray_routing import SessionAffinityRouter

    actor: dict[str, Any] = {"num_cpus": scale.engine_cpus, "num_gpus": scale.engine_gpus}
    selector = artifact_label_selector(Path(spec.artifact))
    if selector:
        actor["label_selector"] = selector
    router: dict[str, Any] = {"request_router_class": SessionAffinityRouter}
    options: dict[str, Any] = {
        "name": "KilnEngine",
        "max_ongoing_requests": spec.slots + spec.queue,
        "max_queued_requests": scale.max_queue,
        "request_router_config": RequestRouterConfig(**router),
        # The ingress answers BackPressureError itself (OpenAI shape); this is Serve's own.
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=1),
        "graceful_shutdown_timeout_s": scale.drain_timeout_s,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
        "ray_actor_options": actor,
    }
    if scale.autoscale is None:
        options["num_replicas"] = scale.replicas
    else:
        lo, hi = scale.autoscale
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=lo,
            max_replicas=hi,
            initial_replicas=max(lo, 1),
            look_back_period_s=5.0,
            upscale_delay_s=scale.upscale_delay_s,
            downscale_delay_s=scale.downscale_delay_s,
            policy=AutoscalingPolicy(policy_function=POLICY_PATH),
        )
    engine = serve.deployment(**options)(KilnEngine).bind(spec)
    ingress = serve.deployment(
        name="KilnIngress",
        num_replicas=1,
        # Requests wait at the engine's handle (where 429 is decided), not in front of this.
        max_ongoing_requests=100_000,
        graceful_shutdown_timeout_s=scale.drain_timeout_s,
        ray_actor_options={"num_cpus": 0},
    )(serve.ingress()(KilnIngress))
    return ingress.bind(engine, attempts=scale.attempts)


# --- Serve config files ------------------------------------------------------------------------

_SPEC_KEYS = {f.name for f in dataclasses.fields(EngineSpec)}
_SCALE_KEYS = {f.name for f in dataclasses.fields(ScaleOptions)}


def specs_from_args(args: dict[str, Any]) -> tuple[EngineSpec, ScaleOptions]:
    """EngineSpec and ScaleOptions from a Serve config's `args` (autoscale as "MIN:MAX")."""
    unknown = set(args) - _SPEC_KEYS - _SCALE_KEYS
    if unknown:
        raise ConfigError(
            f"Unknown key(s) {', '.join(sorted(unknown))} in the Serve config's args for "
            f"{BUILDER_PATH}; known: {', '.join(sorted(_SPEC_KEYS | _SCALE_KEYS))}."
        )
    if "artifact" not in args:
        raise ConfigError(f"The Serve config's args for {BUILDER_PATH} need 'artifact': PATH.")
    spec = EngineSpec(**{k: v for k, v in args.items() if k in _SPEC_KEYS})
    scale_args = {k: v for k, v in args.items() if k in _SCALE_KEYS}
    if isinstance(scale_args.get("autoscale"), str):
        scale_args["autoscale"] = parse_autoscale(scale_args["autoscale"])
    elif scale_args.get("autoscale") is not None:
        scale_args["autoscale"] = tuple(scale_args["autoscale"])
    scale = ScaleOptions(**scale_args)
    check_options(spec, scale)
    return spec, scale


def check_options(spec: EngineSpec, scale: ScaleOptions) -> None:
    """Raise ConfigError for a value Serve or the scheduler cannot run with."""
    for name, value in (
        ("slots", spec.slots),
        ("replicas", scale.replicas),
        ("max_queue", scale.max_queue),
    ):
        if value < 1:
            raise ConfigError(f"{name}={value}: must be >= 1.")
    if scale.autoscale is not None:
        lo, hi = scale.autoscale
        if not 0 <= lo <= hi or hi < 1:
            raise ConfigError(f"autoscale {lo}:{hi}: need 0 <= MIN <= MAX and MAX >= 1.")


def parse_autoscale(text: str) -> tuple[int, int]:
    """'MIN:MAX' as two ints, or ConfigError naming the value."""
    try:
        lo, hi = (int(part) for part in text.split(":"))
    except ValueError:
        raise ConfigError(f"--autoscale {text!r}: expected MIN:MAX, e.g. 1:4.") from None
    return lo, hi


def app_builder(args: dict[str, Any]) -> Any:
    """The application of a Serve config (`import_path: ...ray_app:app_builder`, `args`)."""
    spec, scale = specs_from_args(dict(args))
    return build_app(spec, scale)


def serve_config(
    spec: EngineSpec, scale: ScaleOptions, *, host: str = "0.0.0.0", port: int = 8000
) -> dict[str, Any]:
    """A Serve config file (`serve deploy`, KubeRay's `serveConfigV2`) for this deployment."""
    args: dict[str, Any] = {}
    for obj in (spec, scale):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value != f.default:
                args[f.name] = f"{value[0]}:{value[1]}" if f.name == "autoscale" else value
    args["artifact"] = spec.artifact
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [
            {"name": APP_NAME, "route_prefix": "/", "import_path": BUILDER_PATH, "args": args}
        ],
    }


# --- `kiln serve --ray` --------------------------------------------------------------------------


def run(spec: EngineSpec, scale: ScaleOptions, *, host: str, port: int) -> None:
    """Start (or join: RAY_ADDRESS) a Ray cluster, deploy, serve until SIGTERM/SIGINT, drain."""
    import ray
    from ray import serve

    ray.init(include_dashboard=False, log_to_driver=False)
    # After ray.init (its core worker installs a C handler that dies on SIGTERM) and before
    # serve.run: the app answers before serve.run returns, and a signal then must drain too.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(spec, scale), name=APP_NAME, route_prefix="/", blocking=False)
        log.info("serving %s on http://%s:%d (Ray Serve)", spec.artifact, host, port)
        stop.wait()
        log.info("draining: running requests get up to %.0f s", scale.drain_timeout_s)
        serve.delete(APP_NAME)  # waits for each replica's graceful shutdown
    finally:
        serve.shutdown()
        ray.shutdown()
