"""Refuse ONNX graphs with ops outside the standard ONNX domain, before TensorRT parses them.

`kiln optimize --target onnxruntime` emits ONNX Runtime's contrib ops (com.microsoft
GroupQueryAttention, SkipSimplifiedLayerNormalization, RotaryEmbedding, MatMulNBits, ...).
TensorRT-RTX's parser claims some of them (`supports_operator` is True) but the wheel ships no
plugins for them: GroupQueryAttention fails with "failed to load GroupQueryAttention plugin"
(docs/tensorrt-rtx/README.md, "Fused ops"). Reading the node domains names every
offending op at once, in milliseconds, instead of one parser error after a slow parse.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from kiln.engine.errors import ParseError
from kiln.engine.hints import parse_hint

STANDARD_DOMAINS = ("", "ai.onnx")


class ForeignOpsError(ParseError):
    """The graph holds ops of a non-standard domain (no TensorRT plugin builds them)."""


def foreign_ops(onnx_path: Path) -> list[tuple[str, str, str]]:
    """(domain, op_type, node name) of every node outside the standard domain.

    Nodes that call a model-local function are followed into the function's body (the parser
    inlines local functions), so only the ops TensorRT would actually meet count.
    """
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:  # unreadable file: TensorRT's parser reports it with the fix (hints.py)
        return []
    local = {(f.domain, f.name): f for f in model.functions}
    found: list[tuple[str, str, str]] = []
    seen: set[tuple[str, str]] = set()

    def walk(nodes: Any) -> None:
        for node in nodes:
            key = (node.domain, node.op_type)
            if key in local:
                if key not in seen:
                    seen.add(key)
                    walk(local[key].node)
            elif node.domain not in STANDARD_DOMAINS:
                found.append((node.domain, node.op_type, node.name))
            for attr in node.attribute:  # If / Loop / Scan bodies
                for g in (attr.g, *attr.graphs) if attr.HasField("g") else attr.graphs:
                    walk(g.node)

    walk(model.graph.node)
    return found


def check_standard_ops(onnx_path: Path) -> None:
    """Raise ForeignOpsError naming each non-standard op, its first node and the fix."""
    found = foreign_ops(onnx_path)
    if not found:
        return
    counts = Counter((d, op) for d, op, _ in found)
    first: dict[tuple[str, str], str] = {}
    for d, op, name in found:
        first.setdefault((d, op), name)
    summary = ", ".join(f"{d}.{op} x{n}" for (d, op), n in sorted(counts.items()))
    lines = [
        f"{onnx_path} holds ops outside the standard ONNX domain, which TensorRT cannot build "
        f"(TensorRT-RTX ships no plugins for ONNX Runtime's contrib ops): {summary}."
    ]
    for (d, op), name in sorted(first.items()):
        lines.append(f"  node {name!r} (op {op}): domain {d!r}")
        lines.append(f"    fix: {parse_hint(op, 'Plugin not found')}")
    lines.append(
        "Build engines from `kiln optimize --target tensorrt` output (standard opset-23/24 "
        "Attention, DequantizeLinear weights) or from the `kiln export` folder; the "
        "`--target onnxruntime` folder is for ONNX Runtime only."
    )
    raise ForeignOpsError("\n".join(lines))
