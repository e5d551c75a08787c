"""int4 block-wise weight-only quantization (DequantizeLinear opset 21 on constant weights)."""

from __future__ import annotations

from kiln.optimize.precision.int8_weight_only import Int8WeightOnlyPass


class Int4WeightOnlyPass(Int8WeightOnlyPass):
    """MatMul weights -> int4 blocks of `block` along K (default 32: int4 needs small blocks)."""

    name = "int4-weight-only"
    bits = 4

    def __init__(self, block: int = 32) -> None:
        self.block = block
