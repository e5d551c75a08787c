"""Retype a float32 graph to float16 or bfloat16, keeping fp32 islands where accuracy needs them.

Why not onnxruntime.transformers.float16 (onnxconverter-common's converter): it has no
bfloat16, and it leaves the model's own Cast(to=FLOAT) nodes behind, which produces Float x Half
ops that TensorRT-RTX rejects (docs/tensorrt-rtx/README.md, "llama fp32->fp16 via
onnxconverter-common").
This pass decides per node whether it computes in fp32 (an island) or in the low precision,
then inserts one Cast wherever a value crosses between the two.

Islands (fp32): the RoPE table (everything computed from integer positions: Cast(int->float),
the inv_freq product, Cos, Sin), unfused norm statistics (Pow, ReduceMean, Sqrt, Reciprocal)
and Softmax. Fused RMSNormalization / LayerNormalization keep fp32 statistics via stash_type=1.
"""

from __future__ import annotations

from typing import TypeGuard

import ml_dtypes
import numpy as np
import onnx_ir as ir

FLOAT = ir.DataType.FLOAT
_NUMPY = {ir.DataType.FLOAT16: np.float16, ir.DataType.BFLOAT16: ml_dtypes.bfloat16}
ISLAND_OPS = frozenset({"Pow", "ReduceMean", "Sqrt", "Reciprocal", "Softmax", "Cos", "Sin"})
_SMALL = 1 << 16  # constants up to this many elements may join a positional island


def _is_float(v: ir.Value | None) -> TypeGuard[ir.Value]:
    return v is not None and v.dtype == FLOAT


def _islands(graph: ir.Graph) -> set[ir.Node]:
    """Nodes that stay fp32: ISLAND_OPS, and nodes computing only from integer positions."""
    positional: set[ir.Value] = set()
    island: set[ir.Node] = set()
    for node in graph:
        if node.op_type == "Cast" and node.inputs[0] is not None and not _is_float(node.inputs[0]):
            if _is_float(node.outputs[0]):
                positional.update(node.outputs)
                island.add(node)
            continue
        floats = [v for v in node.inputs if _is_float(v)]
        feeds_from_positions = any(v in positional for v in floats)
        rest_small = all(
            v in positional or (v.const_value is not None and v.const_value.size <= _SMALL)
            for v in floats
        )
        if floats and feeds_from_positions and rest_small:
            positional.update(o for o in node.outputs if _is_float(o))
            island.add(node)
        elif node.op_type in ISLAND_OPS:
            island.add(node)
    return island


def _low_tensor(value: ir.Value, data: ir.TensorProtocol, low: ir.DataType, name: str) -> ir.Value:
    arr = data.numpy()
    if low == ir.DataType.FLOAT16:  # saturate finite values (e.g. finfo(fp32).min mask fill)
        arr = np.where(np.isfinite(arr), np.clip(arr, -65504.0, 65504.0), arr)
    arr = arr.astype(_NUMPY[low])
    return ir.Value(
        name=name, shape=value.shape, type=ir.TensorType(low), const_value=ir.tensor(arr, name=name)
    )


def lower_floats(model: ir.Model, low: ir.DataType) -> dict[str, int]:
    """Retype `model` in place from fp32 to `low`; return counts of what changed."""
    graph = model.graph
    island = _islands(graph)
    counts = {"initializers": 0, "casts_retyped": 0, "casts_inserted": 0, "fp32_nodes": len(island)}
    low_values: set[ir.Value] = set()
    for x in graph.inputs:
        if _is_float(x):
            x.type = ir.TensorType(low)
            low_values.add(x)
    converted: dict[ir.Value, ir.Value] = {}  # fp32 initializer -> its low copy
    casts: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}

    def cast(v: ir.Value, to: ir.DataType, before: ir.Node) -> ir.Value:
        if (v, to) not in casts:
            node = ir.node("Cast", [v], attributes={"to": to})
            node.outputs[0].type, node.outputs[0].shape = ir.TensorType(to), v.shape
            node.outputs[0].name = f"{v.name}_{to.name.lower()}"
            graph.insert_before(before, node)
            casts[v, to] = node.outputs[0]
            counts["casts_inserted"] += 1
        return casts[v, to]

    for node in list(graph):
        want = FLOAT if node in island else low
        for i, v in enumerate(node.inputs):
            if v is None or not (_is_float(v) or v in low_values):
                continue
            have = low if v in low_values else FLOAT
            if have == want:
                continue
            data = v.const_value
            if want == low and data is not None and not v.is_graph_input():
                if v not in converted:
                    converted[v] = _low_tensor(v, data, low, f"{v.name}_{low.name.lower()}")
                    graph.register_initializer(converted[v])
                    low_values.add(converted[v])
                    counts["initializers"] += 1
                node.replace_input_with(i, converted[v])
            else:
                node.replace_input_with(i, cast(v, want, node))
        if want == low:
            _retype_node(node, low, counts)
            low_values.update(o for o in node.outputs if o.dtype == low)
    _drop_unused_initializers(graph)
    return counts


def _retype_node(node: ir.Node, low: ir.DataType, counts: dict[str, int]) -> None:
    if node.op_type == "Cast" and node.attributes["to"].as_int() == FLOAT:
        node.attributes["to"] = ir.AttrInt64("to", low)
        counts["casts_retyped"] += 1
    if node.op_type == "ConstantOfShape" and "value" in node.attributes:
        t = node.attributes["value"].as_tensor()
        if t.dtype == FLOAT:
            node.attributes["value"] = ir.AttrTensor(
                "value", ir.tensor(t.numpy().astype(_NUMPY[low]))
            )
    for o in node.outputs:
        if o.dtype == FLOAT:
            o.type = ir.TensorType(low)


def _drop_unused_initializers(graph: ir.Graph) -> None:
    for name, v in list(graph.initializers.items()):
        if not v.uses() and not v.is_graph_output():
            del graph.initializers[name]
