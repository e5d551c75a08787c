"""engine.json: what an engine is, and whether a GPU and library can run it.

A TensorRT-RTX plan cannot be deserialized or inspected without a GPU (cudaError 35 on this
machine), so the manifest written at build time is the runtime's source of truth: targets,
library and version, precision, every I/O tensor's dtype and shape range per optimization
profile. TensorRT plans run only on the exact library version that built them (TensorRT-RTX
docs, "Engine Compatibility"; kiln does not build version-compatible plans), and only on the
compute capabilities they were built for.
"""

from __future__ import annotations

from pathlib import Path

from kiln.artifacts import sha256_file
from kiln.engine.errors import EngineMismatchError
from kiln.errors import ArtifactError
from kiln.manifests import EngineManifest

MANIFEST = EngineManifest.FILE
PLAN = "engine.plan"


def read_engine(folder: Path, *, verify: bool = True) -> EngineManifest:
    """Load `folder/engine.json`; with `verify`, check the plan file is the one it describes."""
    folder = Path(folder)
    try:
        manifest = EngineManifest.read(folder)
    except ArtifactError as e:
        if not (folder / MANIFEST).is_file():
            raise
        raise EngineMismatchError(str(e)) from e
    if verify:
        plan = folder / PLAN
        want = manifest.plan
        if not plan.is_file() or plan.stat().st_size != want["bytes"]:
            raise EngineMismatchError(
                f"{plan} is missing or not the {want['bytes']}-byte plan {MANIFEST} describes; "
                "rebuild with `kiln build --force`."
            )
        if sha256_file(plan) != want["sha256"]:
            raise EngineMismatchError(
                f"{plan} does not match the sha256 in {MANIFEST} (modified or corrupt); rebuild "
                "with `kiln build --force`."
            )
    return manifest


def engine_mismatches(
    manifest: EngineManifest, compute_capability: str | tuple[int, int], library: str, version: str
) -> list[str]:
    """Every reason this engine cannot run on the given GPU and library (empty: it can)."""
    cc = _cc(compute_capability)
    problems = []
    targets = manifest.compute_capabilities
    if cc not in targets:
        problems.append(
            f"it was built for compute capabilities {', '.join(targets)}, not this GPU's {cc}; "
            "build a profile that targets it (models/gpus/)"
        )
    lib = manifest.library
    if lib["name"] != library:
        problems.append(f"it was built with {lib['name']}, but the runtime uses {library}")
    elif lib["version"] != version:
        problems.append(
            f"it was built with {lib['name']} {lib['version']}, but {version} is installed; "
            "TensorRT plans run only on the version that built them: rebuild with this version"
        )
    return problems


def check_engine_compatible(
    manifest: EngineManifest, compute_capability: str | tuple[int, int], library: str, version: str
) -> None:
    """Raise EngineMismatchError naming every mismatch between the engine and this GPU/library.

    Args:
        manifest: engine.json as loaded by `read_engine`.
        compute_capability: the GPU's, as "8.9" or (8, 9).
        library: the runtime's module, "tensorrt_rtx" or "tensorrt".
        version: the runtime library's `__version__`.
    """
    problems = engine_mismatches(manifest, compute_capability, library, version)
    if problems:
        raise EngineMismatchError(
            f"Engine for GPU profile {manifest.profile_name!r} cannot run here: "
            + "; ".join(problems)
            + "."
        )


def _cc(value: str | tuple[int, int]) -> str:
    if isinstance(value, tuple):
        return f"{value[0]}.{value[1]}"
    return str(value)
