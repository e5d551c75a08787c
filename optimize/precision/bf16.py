"""bfloat16 weights and activations, with the same fp32 islands as fp16.

ONNX Runtime CPU has no bfloat16 MatMul, so drift is measured on an fp32 emulation of the
graph (bf16_emulation below): every bf16 weight and every bf16 node output is rounded to bf16
(Cast to bf16 and back), while arithmetic runs in fp32 — the same as a GPU's bf16 tensor cores,
which accumulate in fp32. It does not model kernels that keep intermediates in bf16 inside a
fused op.
"""

from __future__ import annotations

import onnx_ir as ir

from kiln.optimize.precision.fp16 import Fp16Pass

BF16 = ir.DataType.BFLOAT16


class Bf16Pass(Fp16Pass):
    """Retype fp32 to bf16."""

    name = "bf16"
    dtype = BF16

    def __init__(self, tolerance: str = "bf16") -> None:
        self.tolerance = tolerance


def bf16_emulation(model: ir.Model) -> ir.Model:
    """An fp32 copy of a bf16 graph that ONNX Runtime CPU runs, rounding where bf16 would."""
    import numpy as np

    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    g = copy.graph
    for name, v in list(g.initializers.items()):
        if v.dtype == BF16 and v.const_value is not None:
            arr = v.const_value.numpy().astype(np.float32)
            v.const_value = ir.tensor(arr, name=name)
            v.type = ir.TensorType(ir.DataType.FLOAT)
    for v in g.inputs:
        if v.dtype == BF16:
            v.type = ir.TensorType(ir.DataType.FLOAT)
    for node in list(g):
        if node.op_type == "Cast" and node.attributes["to"].as_int() == BF16:
            node.attributes["to"] = ir.AttrInt64("to", ir.DataType.FLOAT)
        for out in node.outputs:
            if out.dtype != BF16:
                continue
            out.type = ir.TensorType(ir.DataType.FLOAT)
            down = ir.node("Cast", [out], attributes={"to": BF16})
            up = ir.node("Cast", [down.outputs[0]], attributes={"to": ir.DataType.FLOAT})
            out.replace_all_uses_with(up.outputs[0], replace_graph_outputs=True)
            down.replace_input_with(0, out)
            g.insert_after(node, [down, up])
            if up.outputs[0].is_graph_output():
                out_name = out.name
                out.name = f"{out_name}_pre_bf16"
                up.outputs[0].name = out_name
    return copy
