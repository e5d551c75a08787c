"""Engine stage: an ONNX artifact folder and a GPU profile become engine.plan + engine.json.

`build_engine` hashes the ONNX, and skips the build when engine.json already records the same
ONNX, profile and library version (content-addressed). Otherwise it parses the ONNX through one
TensorRT / TensorRT-RTX adapter (builder.py), checks the graph's precision against the profile's,
sets the prefill/decode optimization profiles from the GPU profile's shape ranges, builds with a
progress monitor, and publishes the folder atomically with engine.json written last.
Graphs with non-standard-domain ops are refused before parsing (guard.py); static-KV artifacts
get slot/new-token profiles with their fixed max_context (kv_layout.py); fp32 attention is
marked decomposable (attention.py). The skeleton (reuse check, locked staging that removes dead
builds' folders, engine.json last, atomic publish) is kiln/publish.py's, shared by every stage.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import resource
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

from kiln.artifacts import cache_key, copy_carried_files, sha256_file, tool_versions
from kiln.engine.attention import NO_ATTENTION_KERNEL, mark_decomposable
from kiln.engine.builder import Backend
from kiln.engine.errors import EngineBuildError, EngineMismatchError, ParseError, ProfileError
from kiln.engine.guard import ForeignOpsError, check_standard_ops
from kiln.engine.kv_layout import (
    check_kv_updates,
    kv_layout,
    kv_record,
    kv_updates,
    layout_record,
    static_shapes,
)
from kiln.engine.manifest import (
    MANIFEST,
    PLAN,
    check_engine_compatible,
    engine_mismatches,
    read_engine,
)
from kiln.engine.precision import check_precision, precision_of
from kiln.engine.profiles import GpuProfile, available_profiles, load_profile
from kiln.engine.progress import heartbeat, progress_monitor
from kiln.engine.shapes import fit_to_model, input_ranges, tensor_ranges
from kiln.errors import ArtifactError
from kiln.manifests import EngineManifest, OnnxManifests, OptimizeManifest, newest_manifest
from kiln.publish import publishing

__all__ = [
    "MANIFEST",
    "PLAN",
    "EngineBuildError",
    "EngineMismatchError",
    "ForeignOpsError",
    "GpuProfile",
    "ParseError",
    "ProfileError",
    "available_profiles",
    "build_engine",
    "check_engine_compatible",
    "engine_mismatches",
    "load_profile",
    "read_engine",
]

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"


def build_engine(
    artifact: Path, profile: GpuProfile | str | Path, out: Path, *, force: bool = False
) -> Path:
    """Build the engine of `artifact` (an export or optimize folder) for `profile` into `out`.

    Returns `out`, holding engine.plan and engine.json. Unchanged inputs reuse it.
    """
    artifact, out = Path(artifact), Path(out)
    gpu = profile if isinstance(profile, GpuProfile) else load_profile(profile)
    source = newest_manifest(artifact)
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    onnx_files = {p.name: p for p in sorted(artifact.glob(f"{MODEL_FILE}*")) if p.is_file()}
    backend = Backend(gpu)
    with ThreadPoolExecutor(1, thread_name_prefix="kiln-hash") as pool:
        # Hash the ONNX beside the parse and build; the key waits for it only when an existing
        # engine.json could make the build unnecessary, or when the manifest is written.
        hashing = pool.submit(_hash_files, onnx_files, times)
        key = partial(_cache_key, hashing, gpu, backend)
        with publishing(out, EngineManifest, key=key, force=force) as stage:
            if stage.reused:
                return out
            log.info(
                "engine %s: %s -> %s [%s, %s %s, targets %s]", gpu.name, artifact / MODEL_FILE,
                out, gpu.precision, backend.library, backend.version,
                ", ".join(gpu.compute_capabilities),
            )  # fmt: skip
            facts = _build_plan(backend, gpu, source, stage.dir / PLAN, times)
            times["total"] = round(time.perf_counter() - t0, 3)
            facts["build"]["elapsed_s"] = times
            facts["build"]["versions"] = tool_versions("kiln")  # the tool record, as export.json
            # Config and tokenizer travel with the plan: a serving host may not have the ONNX.
            copy_carried_files(artifact, stage.dir)
            stage.finish(_manifest(source, hashing.result(), gpu, backend, stage.key, facts))
    log.info(
        "engine %s done in %.1f s (build %.1f s): %.1f MB -> %s", gpu.name, times["total"],
        times["build"], facts["plan"]["bytes"] / 1e6, out / PLAN,
    )  # fmt: skip
    return out


def _manifest(
    source: OnnxManifests,
    onnx_sha: dict[str, str],
    gpu: GpuProfile,
    backend: Backend,
    key: str,
    facts: dict[str, Any],
) -> EngineManifest:
    artifact = source.folder
    onnx = {
        n: {"sha256": sha, "bytes": (artifact / n).stat().st_size} for n, sha in onnx_sha.items()
    }
    return EngineManifest(
        cache_key=key,
        source={
            "artifact": str(artifact),
            "stage": source.stage,
            "config": source.config,
            "onnx": onnx,
        },
        profile={**gpu.to_dict(), "file": gpu.source},
        library={"name": backend.library, "version": backend.version},
        compute_capabilities=list(gpu.compute_capabilities),
        **facts,
    )


def _build_plan(
    backend: Backend,
    gpu: GpuProfile,
    source: OnnxManifests,
    plan_path: Path,
    times: dict[str, float],
) -> dict[str, Any]:
    """Check, parse, check precision and I/O, build, write the plan; return manifest entries."""
    what = f"engine {gpu.name}"
    artifact = source.folder
    onnx_path = artifact / MODEL_FILE
    _check_min_compute_capability(source, gpu)
    io, layout, shapes = _plan_shapes(gpu, source)
    check_standard_ops(onnx_path)  # before the parse: names every foreign op at once
    t = time.perf_counter()
    net = backend.parse(onnx_path)
    times["parse"] = round(time.perf_counter() - t, 3)
    found = precision_of(backend, net)
    check_precision(found, gpu, str(artifact))
    _check_io(io, net, onnx_path)
    types, aliases = net.layer_types(), kv_updates(backend, net)
    check_kv_updates(layout, aliases, io, f"{backend.library} {backend.version}: {onnx_path}")
    newest = source.newest
    hint = newest.attention_decomposable if isinstance(newest, OptimizeManifest) else None
    attention = mark_decomposable(backend, net, hint)
    monitor = progress_monitor(backend.trt, what)
    ranges = [input_ranges(io["inputs"], s) for s in shapes]
    # Full TensorRT's tactic timings hold per library version and GPU; kept beside the engines.
    sm = "+".join(gpu.compute_capabilities)
    cache_file = plan_path.parent.parent / f".timing-cache-{backend.library}-{backend.version}-{sm}"
    cache = None if backend.is_rtx else (cache_file.read_bytes() if cache_file.is_file() else b"")
    cfg = backend.configure(net, gpu, ranges, monitor=monitor, timing_cache=cache)
    t = time.perf_counter()
    with heartbeat(what) if monitor is None else nullcontext():
        try:
            plan = backend.build(net, cfg)
        except EngineBuildError as e:  # engine/attention.py: some shapes have no fused kernel
            all_decomposed = attention["decomposable"] == attention["layers"]
            if NO_ATTENTION_KERNEL not in str(e) or all_decomposed:
                raise
            log.warning("%s: no attention kernel for this shape; building it decomposed", what)
            attention = mark_decomposable(backend, net, True)
            attention["why"] = "no dedicated kernel for this attention shape (first build failed)"
            plan = backend.build(net, cfg)
    times["build"] = round(time.perf_counter() - t, 3)
    if (new_cache := backend.timing_cache(cfg)) is not None:
        _write_bytes_atomic(cache_file, new_cache)
    layers = net.network.num_layers
    del net, cfg  # release the network's weights before writing the plan
    t = time.perf_counter()
    size, digest = plan.nbytes, _write_plan(plan_path, plan)
    times["write"] = round(time.perf_counter() - t, 3)
    return {
        "precision": {
            "label": found.label,
            "activations": found.activations,
            "quantized": found.quantized,
        },
        "io": io,
        "kv_cache": kv_record(layout, shapes, aliases),
        "attention": attention,
        "optimization_profiles": [
            {"index": i, "name": s.name, "axes": s.axes(), "tensors": tensor_ranges(io, s)}
            for i, s in enumerate(shapes)
        ],
        "plan": {"file": PLAN, "bytes": size, "sha256": digest},
        "build": {
            "process_peak_rss_mib": _peak_rss_mib(),
            "network_layers": layers,
            "layer_types": types,
            "host": platform.node(),
            "sparse_weights": {
                "flag": gpu.builder.sparse_weights,
                "log": backend.logger.sparsity if gpu.builder.sparse_weights else [],
                "speed": "not measured",
            },
        },
    }


def _plan_shapes(
    gpu: GpuProfile, source: OnnxManifests
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any], list[Any]]:
    """The graph's I/O, its KV layout and the optimization profiles' shape ranges."""
    io = {"inputs": list(source.io["inputs"]), "outputs": list(source.io["outputs"])}
    layout = kv_layout(source, io)
    if layout_record(layout).has_slots:
        return io, layout, static_shapes(gpu, layout["max_context"])
    return io, layout, fit_to_model(gpu.shapes, source.config["max_positions"])


def _check_min_compute_capability(source: OnnxManifests, gpu: GpuProfile) -> None:
    """An optimized graph's types need a GPU generation (optimize.json engine_hints)."""
    if not isinstance(source.newest, OptimizeManifest):
        return  # an export's types (fp32/fp16/bf16) compile for every target kiln builds for
    need = source.newest.min_compute_capability  # "SM89"
    want = (int(need[2:-1]), int(need[-1]))
    older = [cc for cc in gpu.compute_capabilities if tuple(map(int, cc.split("."))) < want]
    if older:
        raise ProfileError(
            f"{source.folder / OptimizeManifest.FILE} needs compute capability >= "
            f"{want[0]}.{want[1]} ({source.newest.precision}), but GPU profile {gpu.name!r} "
            f"targets {', '.join(older)}; pick a profile for newer GPUs (models/gpus/)."
        )


def _cache_key(hashing: Future[dict[str, str]], gpu: GpuProfile, backend: Backend) -> str:
    profile = gpu.to_dict()
    profile.pop("description")  # words about the profile do not change the engine
    return cache_key(
        "kiln.engine",
        inputs=hashing.result(),
        options={"profile": profile},
        versions={backend.library: backend.version},
    )


def _check_io(io: dict[str, list[dict[str, Any]]], net: Any, onnx_path: Path) -> None:
    """The manifest's I/O must be the parsed network's: same names, same ranks."""
    got = {t.name: len(t.shape) for t in (*net.inputs(), *net.outputs())}
    want = {v["name"]: len(v["shape"]) for v in (*io["inputs"], *io["outputs"])}
    if got != want:
        raise ArtifactError(
            f"{onnx_path}'s inputs/outputs {sorted(got)} differ from its manifest's "
            f"{sorted(want)}; the folder was edited by hand: rerun the stage that made it."
        )


def _write_plan(path: Path, plan: Any) -> str:
    """Write the serialized plan and return its sha256, hashed from memory while it writes."""
    view = memoryview(plan)
    with ThreadPoolExecutor(1, thread_name_prefix="kiln-hash") as pool:
        digest = pool.submit(lambda: hashlib.sha256(view).hexdigest())
        with open(path, "wb") as f:
            f.write(view)
        return digest.result()


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _hash_files(files: dict[str, Path], times: dict[str, float]) -> dict[str, str]:
    t = time.perf_counter()
    digests = {n: sha256_file(p) for n, p in files.items()}
    times["hash"] = round(time.perf_counter() - t, 3)
    return digests


def _peak_rss_mib() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
