"""One adapter over TensorRT-RTX (`tensorrt_rtx`) and full TensorRT (`tensorrt`).

The two share the API (OnnxParser, optimization profiles, memory pools,
build_serialized_network); they differ in five places, and only here
(docs/tensorrt-rtx/README.md, "API differences"):
1. the module to import;
2. the STRONGLY_TYPED network flag: only TensorRT < 11 needs it (RTX and TRT 11 always are);
3. target selection: RTX compiles ahead of time for listed compute capabilities; full TensorRT
   builds for the GPU it runs on;
4. the timing cache: meaningful only on full TensorRT (RTX ignores it);
5. precision BuilderFlags are never set: precision comes from the ONNX's types.
Only the `tensorrt_rtx` path has run here (CPU-only machine); the `tensorrt` branches follow
the documented 10.x/11.x API.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.engine.errors import EngineBuildError, ParseError
from kiln.engine.hints import parse_hint
from kiln.engine.profiles import GpuProfile
from kiln.engine.shapes import Range

log = logging.getLogger(__name__)

_MIB = 1 << 20


@dataclass
class Network:
    """A parsed network; holds the builder and parser, which own its weights."""

    builder: Any
    network: Any
    parser: Any

    def inputs(self) -> list[Any]:
        """The network's input tensors, in ONNX order."""
        return [self.network.get_input(i) for i in range(self.network.num_inputs)]

    def outputs(self) -> list[Any]:
        """The network's output tensors, in ONNX order."""
        return [self.network.get_output(i) for i in range(self.network.num_outputs)]

    def layers(self) -> list[Any]:
        """Every layer, in topological order."""
        return [self.network.get_layer(i) for i in range(self.network.num_layers)]

    def layer_types(self) -> dict[str, int]:
        """Layer count per LayerType name (KV_CACHE_UPDATE, ATTENTION_OUTPUT, ...), sorted."""
        counts = Counter(str(layer.type).rsplit(".", 1)[-1] for layer in self.layers())
        return dict(sorted(counts.items()))


class Backend:
    """TensorRT or TensorRT-RTX behind one interface; `module` is the imported library."""

    def __init__(self, profile: GpuProfile) -> None:
        try:
            self.trt = importlib.import_module(profile.module)
        except ImportError as e:
            raise EngineBuildError(_missing_backend(profile)) from e
        self.library = profile.module
        self.version = str(self.trt.__version__)
        self.is_rtx = profile.backend == "tensorrt-rtx"
        self.major = int(self.version.split(".")[0])
        self.logger = _capturing_logger(self.trt)

    def parse(self, onnx_path: Path) -> Network:
        """Parse the ONNX file (external data resolves next to it); errors name node and op."""
        t = self.trt
        flags = 0
        if not self.is_rtx and self.major < 11:  # TRT 10: weakly typed unless asked
            flags |= 1 << int(t.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        builder = t.Builder(self.logger)
        network = builder.create_network(flags)
        parser = t.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [parser.get_error(i) for i in range(parser.num_errors)]
            raise ParseError(_parse_message(onnx_path, errors, self.library, self.version))
        return Network(builder, network, parser)

    def configure(
        self,
        net: Network,
        profile: GpuProfile,
        shapes: list[dict[str, Range]],
        *,
        monitor: Any = None,
        timing_cache: bytes | None = None,
    ) -> Any:
        """A builder config: targets, optimization profiles, pools, optimization level."""
        t = self.trt
        cfg = net.builder.create_builder_config()
        if self.is_rtx:  # ahead-of-time targets; no GPU needed
            cfg.num_compute_capabilities = len(profile.compute_capabilities)
            for i, cc in enumerate(profile.compute_capabilities):
                sm = "SM" + cc.replace(".", "")
                cfg.set_compute_capability(getattr(t.ComputeCapability, sm), i)
        else:  # full TensorRT builds for the GPU in this host: it must be the profile's
            _check_local_gpu(profile)
            if timing_cache is not None:  # tactic timings are worth keeping (b"": start one)
                cache = cfg.create_timing_cache(timing_cache)
                cfg.set_timing_cache(cache, ignore_mismatch=False)
        settings = profile.builder
        cfg.builder_optimization_level = settings.optimization_level
        if settings.workspace_mib:
            cfg.set_memory_pool_limit(t.MemoryPoolType.WORKSPACE, settings.workspace_mib * _MIB)
        if settings.tactic_shared_memory_mib:
            cfg.set_memory_pool_limit(
                t.MemoryPoolType.TACTIC_SHARED_MEMORY, settings.tactic_shared_memory_mib * _MIB
            )
        if settings.sparse_weights:
            cfg.set_flag(t.BuilderFlag.SPARSE_WEIGHTS)
        for ranges in shapes:
            p = net.builder.create_optimization_profile()
            for name, (lo, opt, hi) in ranges.items():
                p.set_shape(name, lo, opt, hi)
            cfg.add_optimization_profile(p)
        if monitor is not None:
            cfg.progress_monitor = monitor
        return cfg

    def build(self, net: Network, cfg: Any) -> Any:
        """Serialize the engine; the host-memory buffer supports the buffer protocol."""
        self.logger.errors.clear()
        plan = net.builder.build_serialized_network(net.network, cfg)
        if plan is None:
            detail = "\n  ".join(self.logger.errors[-5:]) or "(no error logged)"
            raise EngineBuildError(
                f"{self.library} {self.version} could not build the engine:\n  {detail}\n"
                "If it names an Attention layer in fp32, build from an fp16/bf16 artifact "
                "(`kiln export --precision fp16` or `kiln optimize`); if it names memory, lower "
                "max_batch/max_context in the GPU profile."
            )
        return plan

    def timing_cache(self, cfg: Any) -> bytes | None:
        """The timing cache to keep for the next build (full TensorRT only)."""
        if self.is_rtx:
            return None  # RTX 1.x ignores it (release notes 1.1: slated for deprecation)
        cache = cfg.get_timing_cache()
        return None if cache is None else bytes(cache.serialize())

    def dtype_name(self, dtype: Any) -> str:
        """numpy-style name of a TensorRT DataType (float16, int64, ...)."""
        return _DTYPES.get(str(dtype).rsplit(".", 1)[-1], str(dtype).rsplit(".", 1)[-1].lower())


_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "UINT8": "uint8",
    "FP8": "float8e4m3",
    "INT4": "int4",
    "FP4": "float4e2m1",
}


# TensorRT's 2:4 lines: "(Sparsity) Layers eligible for sparse math: ...", "... picked sparse
# implementation for layers: ..." (not file names that merely contain "sparse").
_SPARSITY = re.compile(
    r"\(sparsity\)|eligible for sparse|sparse (math|implementation|tactic)", re.I
)


def _capturing_logger(trt: Any) -> Any:
    """A TensorRT logger that forwards to `logging` and keeps errors for the failure message."""

    # tensorrt ships no type stubs: ILogger is Any to mypy, so subclassing it is "subclassing Any".
    class _Logger(trt.ILogger):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.sparsity: list[str] = []  # 2:4 eligibility lines, for engine.json

        def log(self, severity: Any, msg: str) -> None:
            if _SPARSITY.search(msg):
                self.sparsity.append(msg)
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(msg)
                log.debug("tensorrt: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.debug("tensorrt warning: %s", msg)

    return _Logger()


def _parse_message(path: Path, errors: list[Any], library: str, version: str) -> str:
    lines = [f"{library} {version} cannot parse {path}:"]
    for e in errors[:5]:
        op, node = e.node_operator(), e.node_name() or (f"#{e.node()}" if e.node() >= 0 else "")
        where = f"node {node!r} (op {op})" if op or node else "the file"
        # Drop the CUDA probe failure every CPU-only parse error carries (cudaError 35).
        desc = [ln for ln in e.desc().strip().splitlines() if "cudaError 35" not in ln]
        lines.append(f"  {where}: " + "\n    ".join(desc))
        lines.append(f"    fix: {parse_hint(op, e.desc())}")
    if len(errors) > 5:
        lines.append(f"  ... and {len(errors) - 5} more errors")
    return "\n".join(lines)


def _check_local_gpu(profile: GpuProfile) -> None:
    """Full TensorRT tunes for the local GPU: refuse to label its engine with another one."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError) as e:
        raise EngineBuildError(
            f"GPU profile {profile.name!r} uses full TensorRT, which builds on the GPU it targets, "
            f"but no GPU answers here (nvidia-smi: {e}); build it on a "
            f"{profile.compute_capabilities[0]} host or pick a tensorrt-rtx profile."
        ) from e
    if profile.compute_capabilities[0] not in out:
        raise EngineBuildError(
            f"GPU profile {profile.name!r} targets compute capability "
            f"{profile.compute_capabilities[0]}, but this host's GPUs are {', '.join(out)}; "
            "build it on a matching host (full TensorRT tunes for the local GPU)."
        )


def _missing_backend(profile: GpuProfile) -> str:
    if profile.backend == "tensorrt":
        return (
            f"GPU profile {profile.name!r} needs full TensorRT (Python module `tensorrt`), which "
            "is not installed. Full TensorRT builds on the GPU it targets: run `kiln build` on a "
            f"{'/'.join(profile.compute_capabilities)} host with `pip install tensorrt`, or pick a "
            "tensorrt-rtx profile (models/gpus/rtx-*.toml), which builds on any machine."
        )
    return (
        f"GPU profile {profile.name!r} needs TensorRT-RTX (Python module `tensorrt_rtx`), which is "
        "not installed: `pip install -e '.[engine]'` (or `make setup`)."
    )
