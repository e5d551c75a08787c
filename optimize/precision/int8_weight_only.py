"""int8 block-wise weight-only quantization (DequantizeLinear opset 21 on constant weights)."""

from __future__ import annotations

import onnx_ir as ir

from kiln.optimize.base import GraphPass
from kiln.optimize.precision.weight_only import quantize_weights
from kiln.optimize.typecheck import check_types
from kiln.steps import Result


class Int8WeightOnlyPass(GraphPass):
    """MatMul weights -> int8 blocks of `block` along K with one scale each."""

    name = "int8-weight-only"
    bits = 8

    def __init__(self, block: int = 128) -> None:
        self.block = block

    def run(self, model: ir.Model) -> Result[ir.Model]:
        """Quantize in place; counts say how many weights and the bytes before/after."""
        counts, notes = quantize_weights(model, bits=self.bits, block=self.block)
        return Result(model, changed=counts["weights"] > 0, counts=counts, notes=notes)

    def ensures(self, model: ir.Model) -> None:
        """The result must pass strict ONNX type checking."""
        check_types(model, what=f"the graph after {self.name}")
