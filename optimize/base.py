"""Graph passes as Steps over an in-memory `ir.Model`, and the helpers passes share."""

from __future__ import annotations

from collections import Counter
from typing import Any

import onnx_ir as ir

from kiln.steps import Result, Step


def op_counts(model: ir.Model) -> Counter[str]:
    """How many nodes of each op type the main graph holds."""
    return Counter(n.op_type for n in model.graph)


def count_delta(before: Counter[str], after: Counter[str]) -> dict[str, int]:
    """Nodes removed (negative) or added (positive) per op type, omitting unchanged ones."""
    keys = sorted(set(before) | set(after))
    return {k: after[k] - before[k] for k in keys if after[k] != before[k]}


class GraphPass(Step[ir.Model]):
    """A Step over an ONNX model held in onnx-ir form."""


class IrPass(GraphPass):
    """Wrap an onnx-ir pass (`onnx_ir.passes.common.*`) as a Step, counting nodes it removed."""

    def __init__(self, name: str, ir_pass: Any, *, tolerance: str | None = None) -> None:
        self.name = name  # type: ignore[misc]
        self._pass = ir_pass
        self.tolerance = tolerance

    def run(self, model: ir.Model) -> Result[ir.Model]:
        """Apply the wrapped pass in place and report the change by op type."""
        before = op_counts(model)
        inits = len(model.graph.initializers)
        result = self._pass(model)
        counts = count_delta(before, op_counts(model))
        removed_inits = inits - len(model.graph.initializers)
        if removed_inits:
            counts["initializers"] = -removed_inits
        return Result(result.model, changed=bool(result.modified), counts=counts)


def set_opset(model: ir.Model, version: int) -> None:
    """Raise the default-domain opset import to at least `version`.

    Safe for the exporter's graphs: the ops kiln emits (Cast, Reshape, Shape, Squeeze, ...)
    gained types, not different semantics, between opset 18 and 23 (ONNX Changelog).
    """
    if model.opset_imports.get("", 0) < version:
        model.opset_imports[""] = version
        model.graph.opset_imports[""] = version
