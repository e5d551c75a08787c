"""Fixtures of the Ray Serve tests: one local Ray cluster and one kiln app per test module."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the 'ray' extra is not installed")


@pytest.fixture(scope="module")
def zen_static(exported: Callable[..., Path]) -> Path:
    """The bundled model with static KV (384-position slots)."""
    return exported("zen", "fp32", kv="static")


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A local Ray cluster (4 logical CPUs on this machine's cores), shut down after the module."""
    import ray
    from ray import serve

    for attempt in (1, 2):  # a loaded host may miss Ray's 30 s raylet start window once
        try:
            # "local": a new cluster even where another one runs on this machine
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def kiln_ray(ray_local: None, zen_static: Path) -> Iterator[str]:
    """The bundled model on 2 engine replicas (4 slots each, 40 requests may queue); its URL.

    A burst of 32 streams must never see a 429: Serve counts a request as queued until its
    router assigns it to a replica, so at a burst nearly all 32 can be queued at once.
    """
    from ray import serve

    from kiln.runtime.server.ray_app import APP_NAME, ScaleOptions, build_app
    from kiln.runtime.server.ray_replica import EngineSpec
    from kiln.runtime.server.serve import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    spec = EngineSpec(str(zen_static), slots=4, prefill_chunk=8, device="cpu", threads=1)
    scale = ScaleOptions(replicas=2, max_queue=40, drain_timeout_s=30)
    serve.run(build_app(spec, scale), name=APP_NAME, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
