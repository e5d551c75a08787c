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


def _gathered_tables(graph: ir.Graph) -> dict[ir.Value, ir.TensorProtocol]:
    """Constant 2-D tables read by Gather along axis 0, each with its data."""
    tables: dict[ir.Value, ir.TensorProtocol] = {}
    for node in graph:
        axis = node.attributes.get("axis")
        if node.op_type == "Gather" and (axis is None or axis.as_int() == 0):
            w = node.inputs[0]
            data = w.const_value if w is not None else None
            if w is not None and data is not None and len(w.shape or ()) == 2:
                tables[w] = data
    return tables


class TiedEmbeddingPass(GraphPass):
    """Replace stored transposed copies of an embedding table with Transpose(table)."""

    name = "tied-embedding"

    def run(self, model: ir.Model) -> Result[ir.Model]:
        """Find and remove W^T copies of gathered tables; note tables already stored once."""
        graph = model.graph
        removed, notes = 0, []
        for w, table in _gathered_tables(graph).items():
            rows, cols = table.shape.numpy()
            arr = None
            for name, other in list(graph.initializers.items()):
                if other is w or other.shape is None or list(other.shape) != [cols, rows]:
                    continue
                if other.dtype != w.dtype or other.const_value is None:
                    continue
                arr = table.numpy() if arr is None else arr
                if not np.array_equal(other.const_value.numpy(), arr.T):
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


class OneHotTiedEmbeddingPass(GraphPass):
    """Opt-in: read a tied table through MatMul(OneHot(ids), W) so TensorRT stores W once.

    TensorRT-RTX packs a constant for every MatMul but keeps a Gather's table as is, so a tied
    GPT-2-small engine holds the [50257, 768] table twice (+77 MB). With the embedding also a
    MatMul on W, the engine drops to the size of the weights (NOTES.md: 330.7 -> 253.8 MB).
    The price is a [tokens, V] one-hot and a second V x E GEMM per token (unmeasured on a GPU),
    so it is not in the default pass list (`--tied-embedding onehot`).
    """

    name = "tied-embedding-onehot"

    def run(self, model: ir.Model) -> Result[ir.Model]:
        """Replace Gather(W, ids) by MatMul(OneHot(ids, V), W) for each tied table W."""
        graph, done = model.graph, 0
        for node in list(graph):
            axis = node.attributes.get("axis")
            if node.op_type != "Gather" or (axis is not None and axis.as_int() != 0):
                continue
            w, ids = node.inputs[0], node.inputs[1]
            table = w.const_value if w is not None else None
            if w is None or ids is None or table is None or len(w.shape or ()) != 2:
                continue
            if not TiedEmbeddingPass._feeds_matmul_transposed(w):
                continue
            np_dtype = table.numpy().dtype
            depth = ir.val(
                f"{w.name}_depth", const_value=ir.tensor(np.array(table.shape.numpy()[0], np.int64))
            )
            values = ir.val(
                f"{w.name}_onehot_values", const_value=ir.tensor(np.array([0, 1], np_dtype))
            )
            for v in (depth, values):
                graph.register_initializer(v)
            onehot = ir.node("OneHot", [ids, depth, values], attributes={"axis": -1})
            matmul = ir.node("MatMul", [onehot.outputs[0], w])
            out = node.outputs[0]
            matmul.outputs[0].type, matmul.outputs[0].shape = out.type, out.shape
            graph.insert_after(node, [onehot, matmul])
            out.replace_all_uses_with(matmul.outputs[0], replace_graph_outputs=True)
            graph.remove(node, safe=True)
            done += 1
        return Result(model, changed=done > 0, counts={"onehot_embeddings": done})
