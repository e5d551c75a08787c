"""The pass registry (each pass class by its name), default orders, manifest helpers.

A pass registers by being a GraphPass class with its own `name` in one of _PASS_MODULES; its
record in kiln/precisions.py or its place in an ordered tuple (CLEANUP_PASSES, FUSION_PASSES,
ORT_FUSIONS) puts it in a default list.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kiln.optimize.base import GraphPass, passes_in
from kiln.optimize.cleanup import CLEANUP_PASSES, CsePass, RemoveUnusedPass
from kiln.optimize.fusions import FUSION_PASSES
from kiln.optimize.tied_embedding import OneHotTiedEmbeddingPass
from kiln.precisions import PRECISIONS

_PASS_MODULES = (
    "kiln.optimize.cleanup",
    "kiln.optimize.tied_embedding",
    "kiln.optimize.fusions",
    "kiln.optimize.precision",
    "kiln.optimize.ort",
    "kiln.optimize.calibrated",
    "kiln.optimize.sparsity",
    "kiln.optimize.mixed",
)


def _registry() -> dict[str, type[GraphPass]]:
    passes: dict[str, type[GraphPass]] = {}
    for cls in passes_in(*_PASS_MODULES):
        assert cls.name not in passes, f"{cls} and {passes[cls.name]} are both {cls.name!r}"
        passes[cls.name] = cls
    return passes


PASSES: dict[str, type[GraphPass]] = _registry()
CLEANUP = tuple(p.name for p in CLEANUP_PASSES)
FUSIONS = tuple(p.name for p in FUSION_PASSES)


def default_pass_names(
    precision: str, source_precision: str = "fp32", *, tied_embedding: str = "shared"
) -> list[str]:
    """Cleanup, then fusions, then precision: fusions match the exporter's fp32 patterns best.

    Attention is fused only where the activations have an attention kernel (none for fp32 in
    TensorRT-RTX), so an fp32 graph keeps MatMul/Softmax attention.
    """
    p = PRECISIONS[precision]
    fusions = [f.name for f in FUSION_PASSES if p.attention_kernel or not f.needs_attention_kernel]
    names = [*CLEANUP, *fusions]
    if tied_embedding == "onehot":
        names.append(OneHotTiedEmbeddingPass.name)
    if p.cast and p.activations != source_precision:
        names.append(p.cast)
    if p.quantizer:
        names.append(p.quantizer)
    # fusions leave per-rewrite Cos/Sin copies
    return [*names, CsePass.name, RemoveUnusedPass.name]


def build_passes(
    names: list[str],
    *,
    precision: str,
    source_precision: str,
    config: Mapping[str, Any] | None = None,
) -> list[GraphPass]:
    """Instantiate the named passes for one model, each with the TOL key its drift is judged by.

    Passes before the precision pass keep the graph's precision (the source's); the precision
    pass and everything after are judged by the target precision's tolerance.
    """
    casts = {p.cast: p.activations for p in PRECISIONS.values() if p.cast}
    quantizers = {q for p in PRECISIONS.values() for q in (p.quantizer, p.ort_quantizer) if q}
    # opt-in quantizers outside the records (optimize/calibrated.py, mixed.py) say so themselves
    quantizers |= {n for n, c in PASSES.items() if getattr(c, "quantizes", False)}
    current = source_precision
    steps = []
    for name in names:
        step = PASSES[name].for_model(config or {})
        if name in casts:
            current = casts[name]
        elif name in quantizers:
            current = precision
        step.tolerance = current
        steps.append(step)
    return steps


def engine_hints(onnx_path: Path, precision: str) -> dict[str, Any]:
    """What the engine stage must know to build this graph (read from the graph itself)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    ops = {n.op_type for n in proto.graph.node if n.domain in ("", "ai.onnx")}
    record = PRECISIONS[precision]
    return {
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "fused_ops": sorted(
            ops
            & {
                "Attention",
                "RotaryEmbedding",
                "RMSNormalization",
                "LayerNormalization",
                "Gelu",
                "DequantizeLinear",
                "QuantizeLinear",
            }
        ),
        # com.microsoft contrib ops (onnxruntime target): ONNX Runtime only, never TensorRT.
        "contrib_ops": sorted({n.op_type for n in proto.graph.node if n.domain == "com.microsoft"}),
        # No dedicated IAttention kernel at these activations (fp32): set decomposable=True.
        "attention_decomposable": "Attention" in ops and not record.attention_kernel,
        "min_compute_capability": record.sm,
    }


def contrib_op_counts(onnx_path: Path) -> dict[str, int]:
    """com.microsoft ops in the graph by type: what only ONNX Runtime can run."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    counts: dict[str, int] = {}
    for n in proto.graph.node:
        if n.domain == "com.microsoft":
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))
