"""The pass registry: names -> Steps, the default order per precision, and manifest helpers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln.optimize.base import GraphPass

# Precision -> the float type activations get, and the quantization pass that follows it.
_ACTIVATIONS = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "int8": "fp16", "int4": "fp16"}
_ACTIVATIONS["fp8"] = "fp16"
_QUANT = {"int8": "int8-weight-only", "int4": "int4-weight-only", "fp8": "fp8-qdq"}
CLEANUP = (
    "fold-constants",
    "simplify",
    "remove-identity",
    "lift-constants",
    "dedup-initializers",
    "cse",
    "tied-embedding",
    "remove-unused",
)
FUSIONS = ("layer-norm", "rms-norm", "gelu", "rotary-embedding", "attention")


def _cleanup(name: str) -> Callable[..., GraphPass]:
    def make(**_: Any) -> GraphPass:
        from kiln.optimize.cleanup import cleanup_passes

        return next(p for p in cleanup_passes() if p.name == name)

    return make


def _fusion(name: str) -> Callable[..., GraphPass]:
    def make(**_: Any) -> GraphPass:
        from kiln.optimize.fusions import FUSION_PASSES

        return FUSION_PASSES[name]()

    return make


def _tied_onehot(**_: Any) -> GraphPass:
    from kiln.optimize.tied_embedding import OneHotTiedEmbeddingPass

    return OneHotTiedEmbeddingPass()


def _precision(name: str) -> Callable[..., GraphPass]:
    def make(**_: Any) -> GraphPass:
        from kiln.optimize.precision import PRECISION_PASSES

        return PRECISION_PASSES[name]()

    return make


def _ort(name: str) -> Callable[..., GraphPass]:
    """The onnxruntime target's passes; they read the export config (positions, window)."""

    def make(*, config: dict[str, Any] | None = None, **_: Any) -> GraphPass:
        from kiln.optimize.ort import passes as ort
        from kiln.optimize.ort.matmul_nbits import MatMulNBitsPass

        cfg = config or {}
        if name == "ort-norms":
            return ort.OrtNormsPass()
        if name == "ort-rotary":
            return ort.OrtRotaryPass(int(cfg.get("max_positions") or 4096))
        if name == "ort-gqa":
            return ort.OrtGqaPass(cfg.get("sliding_window"))
        if name == "ort-untie-head":
            return ort.UntieHeadPass()
        if name == "ort-pack":
            return ort.OrtPackPass()
        return MatMulNBitsPass(8 if name.endswith("int8") else 4)

    return make


_ORT = ("ort-norms", "ort-rotary", "ort-gqa", "ort-pack", "ort-untie-head")
_ORT += ("matmul-nbits-int8", "matmul-nbits-int4")
PASSES: dict[str, Callable[..., GraphPass]] = {
    **{n: _cleanup(n) for n in CLEANUP},
    **{n: _fusion(n) for n in FUSIONS},
    "tied-embedding-onehot": _tied_onehot,
    **{n: _precision(n) for n in ("fp16", "bf16", *_QUANT.values())},
    **{n: _ort(n) for n in _ORT},
}


def default_pass_names(
    precision: str, source_precision: str = "fp32", *, tied_embedding: str = "shared"
) -> list[str]:
    """Cleanup, then fusions, then precision: fusions match the exporter's fp32 patterns best.

    Attention is fused only for low-precision activations: TensorRT-RTX has no dedicated fp32
    IAttention kernel (research README), so an fp32 graph keeps MatMul/Softmax attention.
    """
    act = _ACTIVATIONS[precision]
    fusions = [f for f in FUSIONS if f != "attention" or act != "fp32"]
    names = [*CLEANUP, *fusions]
    if tied_embedding == "onehot":
        names.append("tied-embedding-onehot")
    if act != "fp32" and act != source_precision:
        names.append(act)
    if precision in _QUANT:
        names.append(_QUANT[precision])
    return [*names, "cse", "remove-unused"]  # fusions leave per-rewrite Cos/Sin copies


def build_passes(
    names: list[str],
    *,
    precision: str,
    source_precision: str,
    config: dict[str, Any] | None = None,
) -> list[GraphPass]:
    """Instantiate the named passes, each with the TOL key its drift is judged by.

    Passes before the precision pass keep the graph's precision (the source's); the precision
    pass and everything after are judged by the target precision's tolerance.
    """
    current = source_precision
    steps = []
    for name in names:
        step = PASSES[name](config=config) if name in _ORT else PASSES[name]()
        if name in ("fp16", "bf16"):
            current = name
        elif name in _QUANT.values() or name.startswith("matmul-nbits-"):
            current = precision
        step.tolerance = current
        steps.append(step)
    return steps


def engine_hints(onnx_path: Path, precision: str) -> dict[str, Any]:
    """What the engine stage must know to build this graph (read from the graph itself)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    ops = {n.op_type for n in proto.graph.node if n.domain in ("", "ai.onnx")}
    has_fp32_attention = "Attention" in ops and _ACTIVATIONS[precision] == "fp32"
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
        # fp32 IAttention has no dedicated kernel in TensorRT-RTX: set decomposable=True.
        "attention_decomposable": has_fp32_attention,
        # FP8 types cannot be compiled for SM80/SM86 (TensorRT-RTX: HW-specific datatypes).
        "min_compute_capability": "SM89" if precision == "fp8" else "SM80",
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
