"""Weight-only int4/int8 for the CPU: constant MatMul weights -> com.microsoft MatMulNBits.

ONNX Runtime's own quantizer (onnxruntime.quantization MatMulNBitsQuantizer, RTN, symmetric)
does the work. accuracy_level 4 lets the CPU kernel quantize activations to int8 per block and
run int8 dot products: the fastest MatMulNBits path on x86 (ORT docs, MatMulNBits), at the cost
of activation rounding, judged by the int8/int4 tolerances like every weight-only pass.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import onnx_ir as ir

from kiln.optimize.base import GraphPass, count_delta, op_counts
from kiln.steps import Result

log = logging.getLogger(__name__)


class MatMulNBitsPass(GraphPass):
    """Quantize every constant MatMul weight to `bits` in blocks of `block` along K."""

    bits: ClassVar[int]

    def __init__(self, *, block: int = 32, accuracy_level: int = 4) -> None:
        self.block, self.accuracy_level = block, accuracy_level

    def run(self, model: ir.Model) -> Result[ir.Model]:
        """Round-trip through ModelProto: the quantizer works on protobuf graphs."""
        from onnxruntime.quantization import matmul_nbits_quantizer as mnq

        before = op_counts(model)
        weight_bytes = sum(
            v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value
        )
        config = mnq.DefaultWeightOnlyQuantConfig(
            block_size=self.block,
            is_symmetric=True,
            accuracy_level=self.accuracy_level,
            bits=self.bits,
        )
        proto = ir.serde.serialize_model(model)
        quantizer = mnq.MatMulNBitsQuantizer(proto, algo_config=config)
        logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
        quantizer.process()
        out = ir.serde.deserialize_model(quantizer.model.model)
        counts = count_delta(before, op_counts(out))
        counts["bytes_before"] = weight_bytes
        counts["bytes_after"] = sum(
            v.const_value.nbytes for v in out.graph.initializers.values() if v.const_value
        )
        return Result(out, changed=counts.get("MatMulNBits", 0) > 0, counts=counts)


class MatMulNBitsInt8Pass(MatMulNBitsPass):
    """int8 MatMulNBits weights (kiln/precisions.py INT8 on the onnxruntime target)."""

    name = "matmul-nbits-int8"
    bits = 8


class MatMulNBitsInt4Pass(MatMulNBitsPass):
    """int4 MatMulNBits weights (kiln/precisions.py INT4 on the onnxruntime target)."""

    name = "matmul-nbits-int4"
    bits = 4
