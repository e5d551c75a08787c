"""Where an engine replica may start: a Ray node label derived from engine.json.

A TensorRT plan loads only on the compute capabilities it was built for and only with the exact
library version that built it (engine/manifest.py). Each GPU node carries one label naming what
it can run, `kiln.io/engine-target=sm89.tensorrt_rtx-1.2.0` (`ray start --labels ...`, or
`rayStartParams.labels` under KubeRay); a replica of an engine artifact gets a label selector
listing the targets of its engine folders, so Ray never schedules it on a node whose GPU or
library cannot load any of them. ONNX artifacts run anywhere and get no selector.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.errors import ArtifactError

if TYPE_CHECKING:
    from kiln.manifests import EngineManifest

ENGINE_TARGET_LABEL = "kiln.io/engine-target"


def engine_target(compute_capability: str, library: str, version: str) -> str:
    """The label value for one (GPU, library) pair: `sm89.tensorrt_rtx-1.2.0`.

    Ray label values allow letters, digits, '_', '.', '-' (63 at most, alphanumeric ends).
    """
    value = f"sm{compute_capability.replace('.', '')}.{library}-{version}"
    value = re.sub(r"[^A-Za-z0-9_.-]", "-", value).strip("-_.")
    if not value or len(value) > 63:
        raise ArtifactError(
            f"Engine target {value!r} (compute capability {compute_capability}, {library} "
            f"{version}) is not a valid Ray label value (1-63 letters, digits, '_.-')."
        )
    return value


def node_labels(compute_capability: str, library: str, version: str) -> dict[str, str]:
    """The labels a GPU node starts with so replicas of engines built for it land there."""
    return {ENGINE_TARGET_LABEL: engine_target(compute_capability, library, version)}


def artifact_label_selector(artifact: Path) -> dict[str, str]:
    """Ray `label_selector` for replicas of `artifact` (empty for an ONNX artifact)."""
    from kiln.manifests import EngineManifest
    from kiln.runtime.artifact import inspect_artifact

    info = inspect_artifact(artifact)
    if info.kind != "engine":
        return {}
    return engine_label_selector([EngineManifest.read(folder) for folder in info.engines])


def engine_label_selector(manifests: list[EngineManifest]) -> dict[str, str]:
    """The selector matching a node that can load any of these engines."""
    targets = {
        engine_target(cc, m.library["name"], m.library["version"])
        for m in manifests
        for cc in m.compute_capabilities
    }
    ordered = sorted(targets)
    value = ordered[0] if len(ordered) == 1 else f"in({','.join(ordered)})"
    return {ENGINE_TARGET_LABEL: value}
