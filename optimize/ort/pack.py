"""Sibling projections -> one MatMul: Q/K/V and gate/up read the same input.

One [K, N1+N2+...] weight instead of two or three [K, Ni] ones halves the kernel launches of a
decode step (each MatMul/MatMulNBits call costs a thread-pool dispatch on 2 cores), and on the
static layout lets GroupQueryAttention take the packed QKV with do_rotary (pack_gqa_rotary).
This is what onnxruntime-genai's builder emits (qkv_proj); no onnxscript rule does it for an
exported graph, so it is written here on onnx-ir.
Letters: B batch, S new tokens, K input features, N output features.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

_MS = "com.microsoft"


def _const_weight(node: ir.Node) -> np.ndarray | None:
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.inputs[1] is None:
        return None
    w = node.inputs[1].const_value
    return w.numpy() if w is not None and len(w.shape) == 2 else None


def pack_sibling_matmuls(model: ir.Model) -> int:
    """Replace MatMuls that share an input and have constant 2-D weights by MatMul + Split."""
    graph, packed = model.graph, 0
    for x in list(_inputs_with_siblings(graph)):
        nodes = [u for u, _ in x.uses() if u.op_type == "MatMul" and u.inputs[0] is x]
        weights = [_const_weight(n) for n in nodes]
        group = [(n, w) for n, w in zip(nodes, weights, strict=True) if w is not None]
        if len(group) < 2 or len({w.shape[0] for _, w in group}) != 1:
            continue
        group.sort(key=lambda nw: _order(graph, nw[0]))
        first = group[0][0]
        arr = np.concatenate([w for _, w in group], axis=1)
        name = f"{_weight_name(first)}_packed"
        wv = ir.val(name, const_value=ir.tensor(arr))
        graph.register_initializer(wv)
        widths = np.array([w.shape[1] for _, w in group], np.int64)
        sizes = ir.val(f"{name}_split", const_value=ir.tensor(widths))
        graph.register_initializer(sizes)
        mm = ir.node("MatMul", [x, wv])
        split = ir.node(
            "Split", [mm.outputs[0], sizes], attributes={"axis": -1}, num_outputs=len(group)
        )
        graph.insert_before(first, [mm, split])
        for (node, _), out in zip(group, split.outputs, strict=True):
            old = node.outputs[0]
            out_name, out.shape, out.type = old.name, old.shape, old.type
            old.replace_all_uses_with(out, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            out.name = out_name
        packed += 1
    return packed


def _weight_name(node: ir.Node) -> str | None:
    weight = node.inputs[1]
    assert weight is not None  # _const_weight kept only MatMuls with a constant weight
    return weight.name


def _inputs_with_siblings(graph: ir.Graph) -> list[ir.Value]:
    seen: dict[ir.Value, int] = {}
    for node in graph:
        if (
            node.op_type == "MatMul"
            and node.inputs[0] is not None
            and _const_weight(node) is not None
        ):
            seen[node.inputs[0]] = seen.get(node.inputs[0], 0) + 1
    return [v for v, n in seen.items() if n > 1]


def _order(graph: ir.Graph, node: ir.Node) -> int:
    return next(i for i, n in enumerate(graph) if n is node)


def fold_rotary_into_gqa(model: ir.Model) -> int:
    """Static layout: GQA(Rope(q), Rope(k), v) over one packed QKV -> GQA(qkv, do_rotary=1).

    Only where the rotary position of every real row is write_index + i, which GQA computes
    itself (P + s) when position_ids is absent: true of the static layout (padding rows get
    other positions, but they are masked until overwritten). Not for the concat layout, whose
    left-padded rows start at position 0 after P padding columns.
    """
    if "write_index" not in {v.name for v in model.graph.inputs}:
        return 0
    folded = 0
    for gqa in list(model.graph):
        if gqa.op_type != "GroupQueryAttention" or gqa.domain != _MS:
            continue
        q, k, v = (gqa.inputs[i] for i in range(3))
        ropes = [r for x in (q, k) if x is not None and (r := x.producer()) is not None]
        if len(ropes) != 2 or any(r.op_type != "RotaryEmbedding" for r in ropes):
            continue
        if any(r.attributes.get_int("interleaved", 0) for r in ropes):
            continue
        q_rope_in = ropes[0].inputs[0]
        split = q_rope_in.producer() if q_rope_in is not None else None
        if (
            split is None
            or split.op_type != "Split"
            or len(split.outputs) != 3
            or [q_rope_in, ropes[1].inputs[0], v] != list(split.outputs)
            or ropes[0].inputs[2:4] != ropes[1].inputs[2:4]
            or any(len(o.uses()) != 1 for o in split.outputs)
        ):
            continue
        cos, sin = ropes[0].inputs[2], ropes[0].inputs[3]
        gqa.replace_input_with(0, split.inputs[0])
        gqa.replace_input_with(1, None)
        gqa.replace_input_with(2, None)
        gqa.replace_input_with(7, cos)
        gqa.replace_input_with(8, sin)
        gqa.attributes["do_rotary"] = ir.AttrInt64("do_rotary", 1)
        for node in (*ropes, split):
            if all(not o.uses() for o in node.outputs):
                model.graph.remove(node, safe=True)
        folded += 1
    return folded
