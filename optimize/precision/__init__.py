"""Precision passes by name (one pass per file)."""

from __future__ import annotations

from collections.abc import Callable

from kiln.optimize.base import GraphPass
from kiln.optimize.precision.bf16 import Bf16Pass
from kiln.optimize.precision.fp8_qdq import Fp8QdqPass
from kiln.optimize.precision.fp16 import Fp16Pass
from kiln.optimize.precision.int4_weight_only import Int4WeightOnlyPass
from kiln.optimize.precision.int8_weight_only import Int8WeightOnlyPass

PRECISION_PASSES: dict[str, Callable[[], GraphPass]] = {
    "fp16": Fp16Pass,
    "bf16": Bf16Pass,
    "int8-weight-only": Int8WeightOnlyPass,
    "int4-weight-only": Int4WeightOnlyPass,
    "fp8-qdq": Fp8QdqPass,
}
