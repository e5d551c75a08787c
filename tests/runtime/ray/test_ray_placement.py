"""Engine placement on a simulated 2-node cluster: replicas start only where their engine loads.

Nodes carry the `kiln.io/engine-target` label of runtime/server/ray_placement.py (no GPU is
needed: the label is what Ray schedules on): the head plays an Ada node, a second node a Hopper
one. A probe deployment with the replica's actor options reports the node it landed on; each
case is the other's negative control (the driver's node would take every replica otherwise).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from kiln.manifests import EngineManifest
from kiln.runtime.server.ray_placement import (
    ENGINE_TARGET_LABEL,
    engine_label_selector,
    node_labels,
)

pytestmark = pytest.mark.ray
ADA = node_labels("8.9", "tensorrt_rtx", "1.7.1.116")
HOPPER = node_labels("9.0", "tensorrt", "10.13.0")


def _manifest(ccs: list[str], library: str, version: str) -> EngineManifest:
    return EngineManifest(
        cache_key="",
        source={},
        profile={"name": "test"},
        compute_capabilities=ccs,
        library={"name": library, "version": version},
        precision={},
        io={},
        kv_cache={"layout": "static"},
        attention={},
        optimization_profiles=[],
        plan={},
        build={},
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """The head as an Ada node, a Hopper node; label name -> node id."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "labels": ADA})
    try:
        hopper = c.add_node(num_cpus=1, labels=HOPPER)
        ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
        yield {"ada": c.head_node.node_id, "hopper": hopper.node_id}
    finally:
        serve.shutdown()
        ray.shutdown()
        c.shutdown()


def _nodes_of(selector: dict[str, str], name: str, replicas: int = 2) -> set[str]:
    """Deploy a probe with the replicas' label selector; the node ids its replicas report."""
    import ray
    from ray import serve

    @serve.deployment(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": 0.1, "label_selector": selector},
    )
    class Probe:
        def __call__(self) -> str:
            return ray.get_runtime_context().get_node_id()

    handle = serve.run(Probe.bind(), name=name, route_prefix=None)
    seen = {handle.remote().result(timeout_s=30) for _ in range(12)}
    serve.delete(name)
    return seen


@pytest.mark.parametrize(
    ("ccs", "library", "version", "node"),
    [
        (["8.9"], "tensorrt_rtx", "1.7.1.116", "ada"),
        (["8.6", "8.9"], "tensorrt_rtx", "1.7.1.116", "ada"),  # selector `in(...)`
        (["9.0"], "tensorrt", "10.13.0", "hopper"),
    ],
)
def test_replicas_start_only_on_nodes_that_load_their_engine(cluster, ccs, library, version, node):
    selector = engine_label_selector([_manifest(ccs, library, version)])
    assert _nodes_of(selector, f"probe-{node}-{len(ccs)}") == {cluster[node]}


def test_an_engine_no_node_can_load_never_starts(cluster):
    from ray import serve
    from ray.serve.schema import ReplicaState

    # built for the Ada GPU, but with another TensorRT-RTX version than the node has
    selector = engine_label_selector([_manifest(["8.9"], "tensorrt_rtx", "1.8.0")])

    @serve.deployment(ray_actor_options={"num_cpus": 0.1, "label_selector": selector})
    class Probe:
        def __call__(self) -> str:
            return "ran"

    # serve.run waits until the app is RUNNING, which never happens here: deploy without waiting
    serve._run(Probe.bind(), name="nowhere", route_prefix=None, _blocking=False)
    time.sleep(5)
    states = serve.status().applications["nowhere"].deployments["Probe"].replica_states
    assert states.get(ReplicaState.RUNNING, 0) == 0, states
    serve.delete("nowhere")


def test_label_values_are_valid_ray_labels():
    from ray._private.label_utils import validate_label_selector

    assert ADA == {ENGINE_TARGET_LABEL: "sm89.tensorrt_rtx-1.7.1.116"}
    two = engine_label_selector(
        [
            _manifest(["8.6", "8.9"], "tensorrt_rtx", "1.7.1.116"),
            _manifest(["9.0"], "tensorrt", "10.13.0"),
        ]
    )
    targets = "sm86.tensorrt_rtx-1.7.1.116,sm89.tensorrt_rtx-1.7.1.116,sm90.tensorrt-10.13.0"
    assert two == {ENGINE_TARGET_LABEL: f"in({targets})"}
    assert validate_label_selector(two) is None
