"""Store a tied input embedding and LM head once.

A tied model's exported graph reads the same matrix W[V,E] twice: Gather(W, ids) for the
embedding and MatMul(x, Transpose(W)) for the head. Constant folding (ours or the exporter's,
below its size limit) can turn Transpose(W) into a second initializer W^T, storing it twice.
This pass finds initializers equal to the transpose of a gathered one and replaces each with
Transpose(W) again. (fold-constants is told not to re-fold those Transposes.)

Measured on a GPT-2-small-shaped model (optimize/NOTES.md): the ONNX then stores W once, but
TensorRT-RTX 1.7 still packs its own copy for the MatMul, whatever the layout.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kiln.optimize.base import GraphPass
from kiln.steps import Result


def _gathered_tables(graph: ir.Graph) -> list[ir.Value]:
    tables = []
    for node in graph:
        axis = node.attributes.get("axis")
        if node.op_type == "Gather" and (axis is None or axis.as_int() == 0):
            w = node.inputs[0]
            if w is not None and w.const_value is not None and len(w.shape or ()) == 2:
                tables.append(w)
    return list(dict.fromkeys(tables))


class TiedEmbeddingPass(GraphPass):
    """Replace stored transposed copies of an embedding table with Transpose(table)."""

    name = "tied-embedding"

    def run(self, model: ir.Model) -> Result[ir.Model]:
        """Find and remove W^T copies of gathered tables; note tables already stored once."""
        graph = model.graph
        removed, notes = 0, []
        for w in _gathered_tables(graph):
            rows, cols = w.shape  # type: ignore[misc]
            arr = None
            for name, other in list(graph.initializers.items()):
                if other is w or other.shape is None or list(other.shape) != [cols, rows]:
                    continue
                if other.dtype != w.dtype:
                    continue
                arr = w.const_value.numpy() if arr is None else arr  # type: ignore[union-attr]
                if not np.array_equal(other.const_value.numpy(), arr.T):  # type: ignore[union-attr]
                    continue
                t = ir.node("Transpose", [w], attributes={"perm": [1, 0]})
                t.outputs[0].name = f"{name}_from_{w.name}"
                t.outputs[0].type, t.outputs[0].shape = other.type, other.shape
                graph.insert_before(next(iter(graph)), t)
                other.replace_all_uses_with(t.outputs[0])
                del graph.initializers[name]
                removed += 1
                notes.append(f"{name} was a stored transpose of {w.name}: now Transpose({w.name})")
            if self._feeds_matmul_transposed(w):
                notes.append(f"{w.name} is tied (Gather + Transpose->MatMul) and stored once")
        return Result(
            model, changed=removed > 0, counts={"transposed_copies": removed}, notes=notes
        )

    @staticmethod
    def _feeds_matmul_transposed(w: ir.Value) -> bool:
        for user, _ in w.uses():
            if user.op_type == "Transpose" and any(
                u.op_type in ("MatMul", "Gemm") for u, _ in user.outputs[0].uses()
            ):
                return True
        return False
