"""float16 weights and activations, with fp32 islands for the RoPE table and norm statistics."""

from __future__ import annotations

import onnx_ir as ir

from kiln.optimize.base import GraphPass
from kiln.optimize.precision.low_float import lower_floats
from kiln.optimize.typecheck import check_types
from kiln.steps import Result


class Fp16Pass(GraphPass):
    """Retype fp32 to fp16 (see low_float.py for where fp32 is kept and why)."""

    name = "fp16"
    dtype = ir.DataType.FLOAT16

    def __init__(self, tolerance: str = "fp16") -> None:
        self.tolerance = tolerance

    def requires(self, model: ir.Model) -> None:
        """Nothing to do on a graph that is already low precision; the pass then is a no-op."""

    def run(self, model: ir.Model) -> Result[ir.Model]:
        """Retype in place; a graph with no fp32 weights (an fp16 export) is left unchanged."""
        if not any(v.dtype == ir.DataType.FLOAT for v in model.graph.initializers.values()):
            return Result(model, changed=False, notes=["graph has no fp32 weights; unchanged"])
        counts = lower_floats(model, self.dtype)
        return Result(model, changed=True, counts=counts)

    def ensures(self, model: ir.Model) -> None:
        """The result must pass strict ONNX type checking."""
        check_types(model, what=f"the graph after {self.name}")
